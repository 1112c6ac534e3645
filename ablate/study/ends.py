"""A study's MLflow runs ended as its trials did: runs whose worker was stopped before it could end them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from optuna.trial import FrozenTrial, TrialState

from ablate.study import records
from ablate.vocabulary import Outcome, Tag

if TYPE_CHECKING:
    import optuna

    from ablate.tracking.client import Tracker


def end_abandoned_runs(study: optuna.Study, tracker: Tracker, experiment_id: str, parent_run_id: str | None
                       ) -> None:
    """End KILLED the MLflow runs still RUNNING of trials that failed or wait to be retried: their
    worker was stopped before it could end them (a second Ctrl-C, or kill -9 between creating a trial's
    run and recording it on the trial). A run a running trial continues is left alone."""
    trials = study.get_trials(deepcopy=False)
    live = {t.user_attrs.get(records.RUN_ID) for t in trials if t.state == TrialState.RUNNING}
    running = {t.number for t in trials if t.state == TrialState.RUNNING}
    ended = {t.user_attrs.get(records.RUN_ID) for t in trials if t.state in (TrialState.FAIL, TrialState.WAITING)}
    for run_id in sorted(str(r) for r in ended - live if r):
        try:
            if tracker.client.get_run(run_id).info.status == "RUNNING":
                tracker.end_run(run_id, "KILLED")
        except Exception:  # the run lives in another MLflow store
            continue
    try:  # runs no trial records: their worker died before it could say which run it had started
        orphans = tracker.client.search_runs(
            [experiment_id], f"tags.`{Tag.STUDY}` = '{study.study_name}' and attributes.status = 'RUNNING'")
    except Exception:
        return
    for run in orphans:
        trial = run.data.tags.get(Tag.TRIAL)
        if run.info.run_id in live or run.info.run_id == parent_run_id or trial is None \
                or not trial.isdigit() or int(trial) in running:
            continue
        tracker.end_run(run.info.run_id, "KILLED")


def end_stale_run(tracker: Tracker, trial: FrozenTrial) -> None:
    """A trial whose worker died: its MLflow run ends FAILED, saying why."""
    run_id = trial.user_attrs.get(records.RUN_ID)
    if not run_id:
        return
    try:
        tracker.set_tags(run_id, {Tag.STATE: Outcome.FAIL,
                                  Tag.STOP_REASON: "the worker stopped sending heartbeats"})
        tracker.end_run(run_id, "FAILED")
    except Exception:  # the run lives in another MLflow store; the trial is re-queued anyway
        pass
