"""The trial loop shared by run-suite, tune and worker: take a trial, fit, log, report, prune.

``work`` takes trials from a study's queue until none is left, in whichever process runs it: the
command's own, a worker process it started, or ``ablate worker`` on another machine.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ablate import records, stability, studies
from ablate.designs import StudySpec
from ablate.errors import AblateError
from ablate.records import EpochEnded, Event, TrialEnded, TrialStarted
from ablate.runs import EpochHook, RunOutcome, train_and_log
from ablate.stability import Instability
from ablate.stores import Stores, mask_url
from ablate.tracking import Tracker
from ablate.trainer import Best, EpochResult, Trainer

OnEvent = Callable[[Event], None]

POLL_SECONDS = 2.0


@dataclass(frozen=True)
class Context:
    """What a worker needs: the study with its spec, the MLflow store, and the study's parent run."""

    study: optuna.Study
    spec: StudySpec
    tracker: Tracker
    experiment_id: str
    parent_run_id: str
    heartbeat_seconds: int | None
    storage: RDBStorage

    @property
    def name(self) -> str:
        """The Optuna study name."""
        return self.study.study_name

    @classmethod
    def open(cls, name: str, stores: Stores) -> Context:
        """Open a study's stores in a worker process (the command that started it made the parent run)."""
        tracker = Tracker(stores.tracking_uri)
        storage = studies.open_storage(stores.storage, heartbeat_seconds=stores.heartbeat_seconds,
                                       on_stale=lambda trial: end_stale_run(tracker, trial))
        ref = studies.load(name, storage)
        parent = ref.study.user_attrs.get(records.PARENT_RUN)
        if not parent:
            raise AblateError(f"study {name!r} has no MLflow parent run yet; open it with `ablate worker {name}`")
        return cls(ref.study, ref.spec, tracker, tracker.experiment_id(ref.spec.name), str(parent),
                   stores.heartbeat_seconds, storage)


class TrialError(Exception):
    """A trial failed on an error; it is recorded (FAIL) and the worker goes on."""


def work(
    ctx: Context,
    *,
    device: str | None = None,
    on_event: OnEvent | None = None,
    wait_for_running: bool = True,
    keep_going: Callable[[], bool] | None = None,
) -> None:
    """Take trials of the study until none is left to take, then return.

    A worker takes only trials the study has queued, so a study never has more trials than its
    budget. While other workers' trials are still running, it waits for them (when heartbeats are
    on): a trial whose worker died is failed after the grace period and put back in the queue.
    A trial that fails on an error is recorded and the worker goes on; a user's mistake
    (AblateError: a device that does not exist, a batch larger than the data) stops it.
    ``keep_going`` is asked before each trial (a worker process stops when its parent is gone).
    The worker that finds the study done ends its MLflow parent run.
    """
    objective = _Objective(ctx, device, on_event or (lambda e: None))
    study = ctx.study
    while keep_going is None or keep_going():
        optuna.storages.fail_stale_trials(study)
        trial = take(ctx)
        if trial is not None:
            _run(ctx, trial, objective)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and wait_for_running \
                and ctx.heartbeat_seconds:
            time.sleep(POLL_SECONDS)
        else:
            end_parent_if_done(ctx)
            break


def take(ctx: Context) -> optuna.Trial | None:
    """A queued (WAITING) trial, now RUNNING for this worker; None when the queue is empty.

    Marking a trial RUNNING succeeds for one worker only (a row lock on PostgreSQL, a write
    transaction on SQLite), so no two workers take the same trial; unlike ``Study.ask`` this never
    creates a trial past the queue.
    """
    storage, study = ctx.storage, ctx.study
    study_id = storage.get_study_id_from_name(study.study_name)
    for t in study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, t.number)
        try:
            if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                return optuna.Trial(study, trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue
    return None


def _run(ctx: Context, trial: optuna.Trial, objective: Callable[[optuna.Trial], float]) -> None:
    """Run the objective on a taken trial with heartbeats, and tell Optuna how it ended."""
    with _heartbeat(ctx, trial.number):
        try:
            value = objective(trial)
        except optuna.TrialPruned:
            ctx.study.tell(trial, state=TrialState.PRUNED)
            return
        except TrialError:
            ctx.study.tell(trial, state=TrialState.FAIL)
            return
        except BaseException:  # Ctrl-C, SIGTERM, a user's mistake: the trial fails and the worker stops
            ctx.study.tell(trial, state=TrialState.FAIL)
            raise
    ctx.study.tell(trial, value)


@contextmanager
def _heartbeat(ctx: Context, number: int) -> Iterator[None]:
    """Record the trial's heartbeat every ``heartbeat_seconds`` while it runs."""
    if not ctx.heartbeat_seconds:
        yield
        return
    storage, interval = ctx.storage, ctx.heartbeat_seconds
    trial_id = storage.get_trial_id_from_study_id_trial_number(
        storage.get_study_id_from_name(ctx.study.study_name), number)
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial_id)
            if stop.wait(interval):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def end_parent_if_done(ctx: Context) -> bool:
    """End the MLflow parent run once no trial is waiting or running: FINISHED, or FAILED when the
    study owes trials without a result; returns whether the study is done."""
    trials = ctx.study.get_trials(deepcopy=False)
    if any(t.state in studies.OPEN for t in trials):
        return False
    finished = [t for t in trials if t.state in studies.FINISHED and not t.user_attrs.get(records.SKIPPED)]
    status = "FAILED" if ctx.spec.missing(finished) else "FINISHED"
    if ctx.tracker.client.get_run(ctx.parent_run_id).info.status != status:
        ctx.tracker.end_run(ctx.parent_run_id, status)
    return True


def end_stale_run(tracker: Tracker, trial: FrozenTrial) -> None:
    """A trial whose worker died: its MLflow run ends FAILED, saying why."""
    run_id = trial.user_attrs.get(records.RUN_ID)
    if not run_id:
        return
    try:
        tracker.set_tags(run_id, {"ablate.state": "FAIL",
                                  "ablate.stop_reason": "the worker stopped sending heartbeats"})
        tracker.end_run(run_id, "FAILED")
    except Exception:  # the run lives in another MLflow store; the trial is re-queued anyway
        pass


class _Objective:
    """Optuna's objective: train the trial's run, track it, report to the pruner, return its value."""

    def __init__(self, ctx: Context, device: str | None, emit: OnEvent):
        self.ctx, self.device, self.emit = ctx, device, emit

    def __call__(self, trial: optuna.Trial) -> float:
        ctx, spec = self.ctx, self.ctx.spec
        assignment = spec.suggest(trial)
        run = assignment.run
        if self.device:
            run = run.model_copy(update={"device": self.device})
        records.write_start(trial, assignment.label, assignment.values)
        self.emit(TrialStarted(trial.number, assignment.label, run.epochs, os.getpid()))
        tags = {"ablate.study": ctx.name, "ablate.trial": trial.number,
                **{f"ablate.{k}": v for k, v in assignment.values.items()}}
        state, reason = "FAIL", ""
        outcome: RunOutcome | None = None
        try:
            trainer = Trainer.from_spec(run)
            outcome = train_and_log(
                trainer, ctx.tracker, ctx.experiment_id, f"{ctx.name}#{trial.number} {assignment.label}",
                tags=tags, parent_run_id=ctx.parent_run_id,
                on_start=lambda run_id: records.write_run(trial, run_id),
                on_epoch=self._hook(trial, trainer.best),
            )
            self._record(trial, outcome)
            value = self._value(outcome)
            if outcome.stopped is not None or value is None:
                state = "PRUNED"
                raise optuna.TrialPruned(outcome.stopped.message if outcome.stopped else
                                          f"{spec.objective} is not finite")
            state = "COMPLETE"
            return value
        except KeyboardInterrupt:
            reason = "interrupted (Ctrl-C or SIGTERM)"
            records.write_error(trial, reason)
            raise
        except optuna.TrialPruned as e:
            reason = str(e)
            raise
        except AblateError as e:  # a user's mistake: every trial would fail the same way
            reason = mask_url(str(e))
            records.write_error(trial, reason)
            raise
        except Exception as e:
            reason = mask_url(f"{type(e).__name__}: {e}")[:2000]
            records.write_error(trial, reason)
            raise TrialError(reason) from e
        finally:
            if outcome is not None:
                ctx.tracker.set_tags(outcome.run_id, {"ablate.state": state})
            last = outcome.final.get(spec.objective) if outcome else None
            self.emit(TrialEnded(trial.number, assignment.label, state, reason, last))

    def _hook(self, trial: optuna.Trial, best: Best) -> EpochHook:
        spec = self.ctx.spec
        metric, rules, interval = spec.objective, spec.stability_rules, spec.report_interval

        def hook(result: EpochResult, history: list[dict[str, float]]) -> Instability | None:
            value = result.metrics.get(metric, float("nan"))
            self.emit(EpochEnded(trial.number, result.epoch, metric, value))
            if rules is not None and (found := stability.check(history, rules)) is not None:
                return found
            if interval is None or result.epoch % interval:
                return None
            # Optuna compares intermediate values at the same step. When a trial is judged by its
            # best epoch, the value at epoch e is the best so far: the objective if it stopped here.
            reported = best.values.get(metric, float("nan")) if spec.judged_at == "best" else value
            if not math.isfinite(reported):
                return None
            trial.report(reported, result.epoch)
            if trial.should_prune():
                return Instability(
                    "median",
                    f"{metric} {reported:.4g} at epoch {result.epoch} is below the median of "
                    "earlier trials at that epoch",
                    {"epoch": result.epoch, metric: reported},
                )
            return None

        return hook

    def _record(self, trial: optuna.Trial, outcome: RunOutcome) -> None:
        records.write_result(trial, final=outcome.final, best=outcome.best, best_epoch=outcome.trainer.best.epoch,
                             epochs=len(outcome.history), diverged=outcome.diverged, stop=outcome.stopped)
        if outcome.stopped is not None:
            self.ctx.tracker.set_tags(outcome.run_id, {
                "ablate.pruned_by": outcome.stopped.rule,
                "ablate.pruned_reason": outcome.stopped.message,
            })

    def _value(self, outcome: RunOutcome) -> float | None:
        spec = self.ctx.spec
        source = outcome.best if spec.judged_at == "best" else outcome.final
        value = source.get(spec.objective)
        return value if value is not None and math.isfinite(value) else None
