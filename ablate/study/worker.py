"""The trial loop shared by run-suite, tune and worker: take a trial, fit, log, report, prune.

``work`` takes trials from a study's queue until none is left, in whichever process runs it: the
command's own, a worker process it started, or ``ablate worker`` on another machine.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from ablate.errors import AblateError
from ablate.specs import RunSpec
from ablate.stores import Stores, mask_url, release_interrupted, signals_held
from ablate.study import records, studies
from ablate.study.designs import StudySpec
from ablate.study.ends import end_abandoned_runs, end_stale_run
from ablate.study.records import EpochEnded, Event, Note, TrialEnded, TrialStarted
from ablate.study.schedulers import slurm_job
from ablate.tracking.client import Tracker
from ablate.training import stability
from ablate.training.stability import Instability
from ablate.vocabulary import Outcome, Tag, is_test

if TYPE_CHECKING:  # the trainer (and torch) load only where a trial trains: `studies show` needs neither
    from ablate.tracking.runs import EpochHook, RunOutcome
    from ablate.training.selection import Best, EpochResult

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
    known: list[int] = field(default_factory=lambda: [-1], compare=False)  # the newest trial its cache has read

    @property
    def name(self) -> str:
        """The Optuna study name."""
        return self.study.study_name

    @cached_property
    def study_id(self) -> int:
        """The study's id in the storage."""
        return self.storage.get_study_id_from_name(self.study.study_name)

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
    array: int | None = 1,
    keep_checkpoints: bool = False,
    workers: int = 1,
) -> None:
    """Take trials of the study until none is left to take, then return (``workers``: how many processes of
    this command take them, which ``--array auto`` plans for).

    A worker takes only trials the study has queued, so a study never has more trials than its
    budget; with ``array`` other than 1 (None: auto, see ``ablate.training.arrays``) it takes several
    compatible trials at once and trains them as one array. While other workers' trials are still
    running, it waits for them (when heartbeats are on): a trial whose worker died is failed after
    the grace period and put back in the queue. A trial that fails on an error is recorded and the
    worker goes on; a user's mistake (AblateError: a device that does not exist, a batch larger
    than the data) stops it. ``keep_going`` is asked before each array (a worker process stops when
    its parent is gone). The worker that finds the study done ends its MLflow parent run.
    """
    emit = on_event or (lambda e: None)
    objective = _Objective(ctx, device, emit, keep_checkpoints)
    study = ctx.study
    said: set[str] = set()
    while keep_going is None or keep_going():
        optuna.storages.fail_stale_trials(study)
        group = take(ctx, array, device, say=lambda text: _say_once(emit, said, text), workers=workers)
        if group:
            _run(ctx, group, objective)
        elif study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) and wait_for_running \
                and ctx.heartbeat_seconds:
            time.sleep(POLL_SECONDS)
        else:
            end_parent_if_done(ctx)
            break


def _say_once(emit: OnEvent, said: set[str], text: str) -> None:
    if text not in said:
        said.add(text)
        emit(Note(text))


def take(ctx: Context, array: int | None = 1, device: str | None = None,
         say: Callable[[str], None] | None = None, workers: int = 1) -> list[optuna.Trial]:
    """Queued (WAITING) trials that can train together, now RUNNING for this worker; [] when none.

    Marking a trial RUNNING succeeds for one worker only (a row lock on PostgreSQL, a write
    transaction on SQLite), so no two workers take the same trial; unlike ``Study.ask`` this never
    creates a trial past the queue. The first waiting trial decides the kind of run; more are taken
    while they train with the same shapes, up to the array size (``arrays.choose``).
    """
    while True:  # continuations first (a search goes on as if never interrupted); other workers may race for them
        window = max(studies.TAKE_WINDOW, array or 0) if array != 1 else 8
        waiting = studies.waiting(ctx.storage, ctx.study, ctx.study_id, window)
        if not waiting:
            return []
        if max(t.number for t in waiting) > ctx.known[0]:  # Optuna's trial cache must have read a trial before
            # it takes a parameter: it reads the study once, and again only once a newer trial (a continuation) exists
            ctx.known[0] = max(t.number for t in ctx.study.get_trials(deepcopy=False))
        taken = _take(ctx, waiting, array, device, say, workers, full=len(waiting) == window)
        if taken:
            return taken  # else every trial read was taken by other workers meanwhile: read the queue again


def _take(ctx: Context, waiting: list[FrozenTrial], array: int | None, device: str | None,
          say: Callable[[str], None] | None, workers: int, full: bool) -> list[optuna.Trial]:
    from ablate.training.arrays import choose
    from ablate.training.preflight import fusion_key

    storage, study, spec = ctx.storage, ctx.study, ctx.spec

    def shaped(t: FrozenTrial) -> RunSpec | None:
        run = spec.shape_of(t)
        return run.model_copy(update={"device": device}) if run is not None and device else run

    first = None if records.resumable(waiting[0]) else shaped(waiting[0])  # a resumed trial trains alone
    key = None if first is None else fusion_key(first)
    alike = [t for t in waiting if key is not None and not records.resumable(t)
             and (run := shaped(t)) is not None and fusion_key(run) == key]
    limit = 1
    if first is not None and len(alike) > 1 and array != 1:
        # arrays are planned for every worker only when all of them are free for this kind of trial: nothing of the
        # study runs yet and no other kind waits (a busy worker, or one that takes the other kind, shares nothing)
        kinds = {fusion_key(run) for t in waiting if not records.resumable(t) and (run := shaped(t)) is not None}
        idle = len(kinds) == 1 and not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        queued = studies.queued(storage, ctx.study_id) if full and len(alike) == len(waiting) else len(alike)
        choice = choose(first, queued, array, workers if idle else 1)  # (measuring is paid for by all of the queue)
        limit = choice.size
        if choice.reason and say is not None:
            say(choice.reason)
    out: list[optuna.Trial] = []
    try:
        for t in (alike or waiting[:1]) if limit > 1 else waiting:
            trial_id = t._trial_id
            if ctx.heartbeat_seconds:
                # a beat before the trial is RUNNING: a worker that dies at any moment after taking it leaves a trial
                # that goes stale and is retried (Optuna never fails a running trial that has no beat at all)
                storage.record_heartbeat(trial_id)
            try:
                with signals_held():  # taken and recorded as taken, or not taken at all
                    if storage.set_trial_state_values(trial_id, state=TrialState.RUNNING):
                        out.append(optuna.Trial(study, trial_id))
            except optuna.exceptions.UpdateFinishedTrialError:
                continue
            if len(out) == limit:
                break
    except KeyboardInterrupt as e:  # Ctrl-C or SIGTERM while taking: what was taken goes back to the queue as it was
        release_interrupted(e)
        with suppress(Exception):
            studies.give_back(storage, out)
        raise
    except BaseException:  # a lost database while taking: what was taken goes back as FAIL
        for trial in out:
            with suppress(Exception):
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        raise
    return out


def _run(ctx: Context, group: list[optuna.Trial],
         objective: Callable[[list[optuna.Trial]], Collection[int] | None]) -> None:
    """Train a group of taken trials with heartbeats; a trial the objective did not end (it returns those it did)
    ends FAIL, unless an interruption came before its run started: then it goes back to the queue as it was."""
    interrupted, ended = False, set()
    try:
        with studies.heartbeats(ctx.storage, ctx.study, group, ctx.heartbeat_seconds):
            ended = set(objective(group) or ())
    except TrialError:
        pass
    except KeyboardInterrupt as e:
        interrupted = True
        release_interrupted(e)
        raise
    finally:  # also on Ctrl-C, SIGTERM or a user's mistake, which then stop the worker
        for t in group:
            if t.number in ended:
                continue
            frozen = ctx.storage.get_trial(t._trial_id)
            if frozen.state != TrialState.RUNNING:
                continue
            if interrupted and not frozen.user_attrs.get(records.RUN_ID):
                studies.give_back(ctx.storage, [t])
            else:
                ctx.study.tell(t, state=TrialState.FAIL, skip_if_finished=True)


def end_parent_if_done(ctx: Context) -> bool:
    """End the MLflow parent run once no trial is waiting or running: FINISHED, or FAILED when the
    study owes trials without a result, at the time the study's last trial ended; returns whether
    the study is done."""
    trials = ctx.study.get_trials(deepcopy=False)
    if any(t.state in studies.OPEN for t in trials):
        return False
    finished = [t for t in trials if t.state in studies.FINISHED and not t.user_attrs.get(records.SKIPPED)]
    status = "FAILED" if ctx.spec.missing(finished) else "FINISHED"
    end = studies.span_ms(ctx.study)[1]  # the study's end, not the moment this worker noticed it
    # nothing of the study runs any more: no child run may stay RUNNING
    end_abandoned_runs(ctx.study, ctx.tracker, ctx.experiment_id, ctx.parent_run_id)
    run = ctx.tracker.client.get_run(ctx.parent_run_id).info
    if run.status != status or (end is not None and run.end_time != end):
        ctx.tracker.end_run(ctx.parent_run_id, status, end)
    return True


class _Taken:
    """A group of taken trials in a worker: what each trains, and how each one's end is told to Optuna."""

    def __init__(self, ctx: Context, trials: list[optuna.Trial], device: str | None, emit: OnEvent,
                 objective: _Objective):
        self.ctx, self.trials, self.emit, self.objective = ctx, trials, emit, objective
        self.assignments = [ctx.spec.suggest(t) for t in trials]
        self.runs = [a.run.model_copy(update={"device": device}) if device else a.run for a in self.assignments]
        for t, a, run in zip(trials, self.assignments, self.runs, strict=True):
            records.write_start(t, a.label, a.values, slurm_job())
            emit(TrialStarted(t.number, a.label, run.epochs, os.getpid()))
        self.ended: set[int] = set()
        self.outcomes: dict[int, RunOutcome] = {}
        self.run_ids: dict[int, str] = {}

    def end(self, k: int, state: str, reason: str, tagged: bool = False) -> None:
        """Trial k ended in ``state``: tag its run, if it has one (unless ``tagged`` already), and say so."""
        self.ended.add(k)
        out = self.outcomes.get(k)
        if k in self.run_ids and not tagged:
            self.ctx.tracker.set_tags(self.run_ids[k], {Tag.STATE: state})
        last = out.final.get(self.ctx.spec.watched) if out is not None else None
        self.emit(TrialEnded(self.trials[k].number, self.assignments[k].label, state, reason, last))

    def on_start(self, k: int, run_id: str) -> None:
        """Trial k's MLflow run exists."""
        self.run_ids[k] = run_id
        records.write_run(self.trials[k], run_id)

    def state_of(self, outcome: RunOutcome) -> tuple[str, str, float | None]:
        """The state an ended run gives its trial, why, and its value: FAIL (its loss failed), PRUNED (stopped, or no
        finite objective) or COMPLETE (the only state with a value)."""
        if outcome.error is not None:  # the run's own loss failed: this trial fails, the others go on
            return Outcome.FAIL, outcome.error, None
        if outcome.stopped is not None:
            return Outcome.PRUNED, outcome.stopped.message, None
        value = self.objective.value(outcome)
        if value is None:
            return Outcome.PRUNED, f"{self.ctx.spec.objective} is not finite", None
        return Outcome.COMPLETE, "", value

    def end_tags(self, k: int, outcome: RunOutcome) -> dict[str, Any]:
        """What trial k's run is tagged with as it ends (its state), in the same request as its other end tags."""
        return {Tag.STATE: self.state_of(outcome)[0]}

    def on_end(self, k: int, outcome: RunOutcome) -> None:
        """Trial k's run ended (tagged with its state by ``end_tags``): record it and tell Optuna."""
        self.outcomes[k] = outcome
        trial, study = self.trials[k], self.ctx.study
        self.objective.record(trial, outcome)
        state, reason, value = self.state_of(outcome)
        if state == Outcome.FAIL:
            records.write_error(trial, reason)
        study.tell(trial, value, state=TrialState[state])
        self.end(k, state, reason, tagged=True)

    def failed(self, reason: str) -> None:
        """Every trial not ended yet ends FAIL with ``reason``."""
        for k, t in enumerate(self.trials):
            if k not in self.ended:  # its run, tagged COMPLETE or PRUNED if it ended before this, is tagged FAIL
                with suppress(optuna.exceptions.UpdateFinishedTrialError):  # failed meanwhile as stale
                    records.write_error(t, reason)
                self.ctx.study.tell(t, state=TrialState.FAIL, skip_if_finished=True)
                self.end(k, Outcome.FAIL, reason)


class _Objective:
    """Train a group of taken trials as one array: each its own MLflow run, pruner and end."""

    def __init__(self, ctx: Context, device: str | None, emit: OnEvent, keep_checkpoints: bool = False):
        self.ctx, self.device, self.emit, self.keep_checkpoints = ctx, device, emit, keep_checkpoints

    def __call__(self, trials: list[optuna.Trial]) -> set[int]:
        """Train the trials; returns the numbers of those told to Optuna (all of them, unless it raises)."""
        group = _Taken(self.ctx, trials, self.device, self.emit, self)  # interrupted here: _run gives them back
        try:
            self._train(group)
        except KeyboardInterrupt as e:
            release_interrupted(e)
            with suppress(Exception):  # queued again at once: another worker (or the next command) continues them
                studies.continue_stopped(self.ctx.study, [t.number for k, t in enumerate(trials)
                                                          if k not in group.ended])
            group.failed(records.INTERRUPTED)
            raise
        except AblateError as e:  # a user's mistake: every trial would fail the same way
            group.failed(mask_url(str(e)))
            raise
        except Exception as e:
            reason = mask_url(f"{type(e).__name__}: {e}")[:2000]
            group.failed(reason)
            raise TrialError(reason) from e
        return {trials[k].number for k in group.ended}

    def _train(self, group: _Taken) -> None:
        from ablate.tracking.runs import train_and_log_members
        from ablate.training.trainer import Trainer

        ctx, spec, trials, runs = self.ctx, self.ctx.spec, group.trials, group.runs
        trainer = Trainer.from_spec(runs)
        resume = self._resume(trials)
        if trainer.fallback:
            self.emit(Note(f"{runs[0].model.factory}: cannot run members vmapped ({trainer.fallback}); "
                           "they train one after another"))
        hooks = [self._hook(t, trainer.every[k].best) for k, t in enumerate(trials)]
        for k, (_, state) in resume.items():  # the pruner sees what the trial reported before it stopped
            self._report_history(trials[k], state["history"], runs[k].select_metric)
        pairs = list(zip(trials, group.assignments, strict=True))
        train_and_log_members(
            trainer, ctx.tracker, ctx.experiment_id, [spec.run_name(t.number, a.label) for t, a in pairs],
            tags=[{Tag.STUDY: ctx.name, Tag.TRIAL: t.number, **{f"ablate.{k}": v for k, v in a.values.items()},
                   **({Tag.SLURM_JOB: job} if (job := slurm_job()) else {})} for t, a in pairs],
            parent_run_id=ctx.parent_run_id, on_start=group.on_start,
            on_epoch=lambda k, result, history: hooks[k](result, history), on_end=group.on_end,
            end_tags=group.end_tags,
            resume=resume, keep_checkpoints=self.keep_checkpoints,
            on_checkpoint=lambda k, epoch: records.write_checkpoint(trials[k], epoch),
        )

    def _resume(self, trials: list[optuna.Trial]) -> dict[int, tuple[str, dict[str, Any]]]:
        """The checkpoints of trials that continue an earlier run (by member), loaded from that run."""
        out = {}
        for k, t in enumerate(trials):
            run_id = t.user_attrs.get(records.RUN_ID)
            if run_id and t.user_attrs.get(records.CHECKPOINT) is not None:
                from ablate.tracking import checkpoints
                from ablate.training.snapshots import CHECKPOINT_FORMAT

                state = checkpoints.load(self.ctx.tracker, str(run_id))
                if state is not None and state.get("format") == CHECKPOINT_FORMAT:  # an older one: start afresh
                    out[k] = (str(run_id), state)
        return out

    def _report_history(self, trial: optuna.Trial, history: list[dict[str, float]], select: str) -> None:
        """Report again what a resumed trial reported before it stopped, replayed through a fresh ``Best``."""
        from ablate.training.selection import Best

        interval = self.ctx.spec.report_interval
        if interval is None:
            return
        best = Best(select)
        for epoch, metrics in enumerate(history):
            best.update(epoch, metrics)
            reported = self._reported(best, metrics)
            if epoch % interval == 0 and math.isfinite(reported):
                trial.report(reported, epoch)

    def _reported(self, best: Best, metrics: dict[str, float]) -> float:
        """The value a trial reports to the pruner at an epoch. Optuna compares intermediate values at the
        same step; when a trial is judged by its best epoch, that is the best so far (its objective if it
        stopped here), else the epoch's own value."""
        metric = self.ctx.spec.objective
        if self.ctx.spec.judged_at == "best":
            return best.metrics.get(metric, float("nan"))
        return metrics.get(metric, float("nan"))

    def _hook(self, trial: optuna.Trial, best: Best) -> EpochHook:
        spec = self.ctx.spec
        metric, rules, interval = spec.watched, spec.stability_rules, spec.report_interval

        def hook(result: EpochResult, history: list[dict[str, float]]) -> Instability | None:
            value = result.metrics.get(metric, float("nan"))
            self.emit(EpochEnded(trial.number, result.epoch, metric, value))
            if rules is not None and (found := stability.check(history, rules)) is not None:
                return found
            if interval is None or result.epoch % interval:
                return None
            reported = self._reported(best, result.metrics)
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

    def record(self, trial: optuna.Trial, outcome: RunOutcome) -> None:
        """Write a finished run's results onto its trial."""
        records.write_result(trial, final=outcome.final, selected=outcome.selected,
                             best_epoch=outcome.best_run.epoch, epochs=len(outcome.history),
                             diverged=outcome.diverged, stop=outcome.stopped, floors=outcome.floors,
                             test=outcome.test, stopped_early_at=outcome.stopped_early_at, split=outcome.split)

    def value(self, outcome: RunOutcome) -> float | None:
        """The value a run reports as its trial's objective (None when not finite)."""
        spec = self.ctx.spec
        if is_test(spec.objective):  # a suite's test headline: the value Optuna keeps; nothing samples by it
            source = outcome.test
        else:
            source = outcome.selected if spec.judged_at == "best" else outcome.final
        value = source.get(spec.objective)
        return value if value is not None and math.isfinite(value) else None
