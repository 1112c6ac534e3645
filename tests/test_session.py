"""One study session per command: each store is opened once, however much the command does."""

from __future__ import annotations

from collections import Counter

import pytest
from support import run_cli

from ablate.study import studies
from ablate.tracking import client as tracking

TINY = ["--epochs", "2", "--set", "data.source=pairs.npz", "--set", "model.hidden=[16]", "--set", "batch_size=16"]


@pytest.fixture
def opened(monkeypatch):
    """Counts of Optuna storages and MLflow trackers constructed in this process."""
    counts: Counter[str] = Counter()
    open_storage, tracker_init = studies.open_storage, tracking.Tracker.__init__

    def counting_open_storage(*args, **kwargs):
        counts["storage"] += 1
        return open_storage(*args, **kwargs)

    def counting_tracker_init(self, *args, **kwargs):
        counts["tracker"] += 1
        tracker_init(self, *args, **kwargs)

    monkeypatch.setattr(studies, "open_storage", counting_open_storage)
    monkeypatch.setattr(tracking.Tracker, "__init__", counting_tracker_init)
    return counts


@pytest.mark.slow
def test_run_suite_report_and_tune_confirm_open_each_store_once(workdir, monkeypatch, capsys, opened):
    code, out, err = run_cli(["run-suite", "baseline-vs-multistage", "--seeds", "0", *TINY], monkeypatch, capsys)
    assert code == 0, err + out
    assert opened == {"storage": 1, "tracker": 1}

    opened.clear()
    code, out, err = run_cli(["report", "baseline-vs-multistage", "--out", "elsewhere"], monkeypatch, capsys)
    assert code == 0, err + out
    assert opened == {"storage": 1, "tracker": 1}

    opened.clear()  # the same report again: read back from its report.json, MLflow is not needed
    code, out, err = run_cli(["report", "baseline-vs-multistage", "--out", "elsewhere"], monkeypatch, capsys)
    assert code == 0, err + out
    assert opened == {"storage": 1}

    opened.clear()
    code, out, err = run_cli(["tune", "weights", "--n-trials", "2", "--confirm", "1", "--set", "confirm_seeds=[7,8]",
                              "--set", "pruner.type=none", *TINY], monkeypatch, capsys)
    assert code == 0, err + out
    assert "confirming the top 1" in out
    assert opened == {"storage": 1, "tracker": 1}

    opened.clear()
    code, out, err = run_cli(["studies", "show", "weights"], monkeypatch, capsys)
    assert code == 0, err + out
    assert opened == {"storage": 1}  # showing a study never needs MLflow


def test_auto_jobs_start_every_worker_at_once_only_when_the_queue_holds_real_work():
    from ablate.study.launch import SPAWN_AFTER_SECONDS, plan
    from ablate.training.devices import available_cpus

    if available_cpus() < 2:
        pytest.skip("needs 2 CPUs")
    suite = plan(None, [], pending=15, epochs=300)  # the README suite: minutes of work
    assert suite.workers == 2 and suite.spawn_after == 0.0
    quick = plan(None, [], pending=4, epochs=3)  # seconds: a second process would cost more than it saves
    assert quick.workers == 2 and quick.spawn_after == SPAWN_AFTER_SECONDS
    assert plan(None, [], pending=1, epochs=300).workers == 1
    assert plan(2, [], pending=15, epochs=300).spawn_after == 0.0  # an explicit --jobs starts all at once
    # never more workers than trials, whatever --jobs or --devices ask
    assert [plan(jobs, [], pending=2).workers for jobs in (1, 6, 1000)] == [1, 2, 2]
    assert plan(None, ["cuda:0", "cuda:1", "cuda:2"], pending=2).devices == ["cuda:0", "cuda:1"]


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
def test_the_queue_is_read_a_few_trials_at_a_time_continuations_first(store, tmp_path, request):
    """A worker reads the first trials of the queue (continuations of interrupted trials first, then by number), not
    every queued trial, and a trial's record is written whole; a finished trial's record cannot be changed."""
    import optuna
    from optuna.trial import TrialState

    from ablate.study import records

    url = f"sqlite:///{tmp_path / 'optuna.db'}" if store == "sqlite" else request.getfixturevalue("postgres_url")
    storage = studies.open_storage(url, heartbeat_seconds=None)
    study = optuna.create_study(study_name="queue", storage=storage)
    for x in range(6):
        study.enqueue_trial({"x": x}, user_attrs={records.QUEUED: True})
    study.enqueue_trial({"x": 9}, user_attrs={records.QUEUED: True, records.RESUMES: 2})  # number 6
    study_id = storage.get_study_id_from_name("queue")
    assert [t.number for t in studies.waiting(storage, study, study_id, 3)] == [6, 0, 1]
    assert [t.params for t in studies.waiting(storage, study, study_id, 1)] == [{}]  # drawn when taken, as queued
    assert [t.user_attrs[records.RESUMES] for t in studies.waiting(storage, study, study_id, 1)] == [2]
    assert len(studies.waiting(storage, study, study_id, 100)) == 7 == studies.queued(storage, study_id)

    trial = study.ask()  # takes #0
    records.write_result(trial, final={"val/mrr": 0.5, "val/top1": float("nan")}, selected={"val/mrr": 0.6},
                         best_epoch=3, epochs=5, diverged=False, stop=None, test={"test/mrr": 0.4}, split="s")
    attrs = storage.get_trial(trial._trial_id).user_attrs
    assert {k: attrs[k] for k in ("final", "selected", "test", "best_epoch", "epochs_trained", "split")} == {
        "final": {"val/mrr": 0.5}, "selected": {"val/mrr": 0.6}, "test": {"test/mrr": 0.4}, "best_epoch": 3,
        "epochs_trained": 5, "split": "s"}
    assert trial.user_attrs["final"] == {"val/mrr": 0.5}
    records.write_attrs(trial, {"best_epoch": 4, "label": "x=0"})  # an attribute written again is replaced
    assert storage.get_trial(trial._trial_id).user_attrs["best_epoch"] == 4
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        records.write_attrs(trial, {"best_epoch": 5, "label": "y"})
    assert storage.get_trial(trial._trial_id).state == TrialState.COMPLETE
    assert [t.number for t in studies.waiting(storage, study, study_id, 2)] == [6, 1]
    assert studies.queued(storage, study_id) == 6
