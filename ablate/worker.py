"""The trial loop shared by run-suite, tune and worker: take a trial, fit, log, report, prune.

``train_and_log`` is the one place where a RunSpec is trained and tracked (``ablate train`` uses
it too). ``work`` takes trials from a study's queue until the study is done. ``execute`` starts a
study's workers on this machine: in this process, or one process per job or device.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue as queue_mod
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from ablate import stability, studies
from ablate.data import load_split
from ablate.errors import AblateError
from ablate.models import build_model
from ablate.specs import (
    DEFAULT_HEARTBEAT_SECONDS,
    SUMMARY_METRICS,
    RunSpec,
    SearchSpec,
    StabilitySpec,
    StudySpec,
    SuiteSpec,
    better,
    mask_url,
    spec_document,
)
from ablate.stability import Instability
from ablate.tracking import MetricBatch, Tracker, environment_tags
from ablate.trainer import EpochResult, Trainer, check_batch, resolve_device

Event = dict[str, Any]
OnEvent = Callable[[Event], None]
EpochHook = Callable[[EpochResult, list[dict[str, float]]], Instability | None]

POLL_SECONDS = 2.0


# --------------------------------------------------------------------------------------
# One run: fit and track
# --------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    """What a tracked training run produced."""

    run_id: str
    history: list[dict[str, float]]
    trainer: Trainer
    stopped: Instability | None = None

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}

    @property
    def diverged(self) -> bool:
        """Whether a loss or the validation embeddings became non-finite."""
        return bool(self.stopped and self.stopped.rule == "nonfinite")

    def best(self, keys: Sequence[str] = SUMMARY_METRICS) -> dict[str, float]:
        """The best value of each metric over the epochs (in the metric's direction)."""
        return {key: v for key in keys if not math.isnan(v := best_value(self.history, key))}


def best_value(history: Sequence[Mapping[str, float]], key: str) -> float:
    """The best finite value of a metric over epochs, in the metric's direction; NaN if none."""
    values = [h[key] for h in history if key in h and math.isfinite(h[key])]
    if not values:
        return float("nan")
    return max(values) if better(key) == "maximize" else min(values)


def train_and_log(
    spec: RunSpec,
    tracker: Tracker,
    experiment_id: str,
    run_name: str,
    *,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    on_start: Callable[[str, Trainer], None] | None = None,
    on_epoch: EpochHook | None = None,
    save_best: str | Path | None = None,
) -> RunOutcome:
    """Train one RunSpec and log it as one MLflow run (a child run when a parent is given).

    Inputs are checked before the run is created, so a mistake leaves no RUNNING run behind. The
    run ends FINISHED (also when ``on_epoch`` stops it early), FAILED on an error and KILLED on
    Ctrl-C or SIGTERM; metrics logged before the end are kept.
    """
    train, val = check_run(spec)
    trainer = Trainer(spec, train, val)
    run_tags = {
        "ablate.loss": spec.loss,
        "ablate.device": str(trainer.device),
        "ablate.amp": trainer.amp.label,
        "ablate.data": spec.data.source,
        "ablate.data_fingerprint": _fingerprint(spec),
        **environment_tags(),
        **(tags or {}),
    }
    run_id = tracker.start_run(experiment_id, run_name, run_tags, parent_run_id)
    outcome = RunOutcome(run_id, [], trainer)
    with tracker.run_status(run_id):
        tracker.log_params(run_id, {**spec.flat(), "train_pairs": len(train), "val_pairs": len(val)})
        tracker.log_dict(run_id, spec.model_dump(mode="json"), "spec.json")
        if on_start is not None:
            on_start(run_id, trainer)
        batch = MetricBatch(tracker, run_id, background=True)
        try:
            for result in trainer.epochs():
                outcome.history.append(result.metrics)
                batch.add(result.metrics, step=result.epoch)
                if result.diverged:
                    outcome.stopped = stability.check(outcome.history, _NONFINITE_ONLY) or Instability(
                        "nonfinite", f"non-finite validation output at epoch {result.epoch}",
                        {"epoch": result.epoch},
                    )
                    break
                if on_epoch is not None:
                    outcome.stopped = on_epoch(result, outcome.history)
                    if outcome.stopped is not None:
                        break
        finally:
            batch.close()
            _finish(tracker, outcome, batch, save_best)
    return outcome


_NONFINITE_ONLY = StabilitySpec(enabled=False)


def check_run(spec: RunSpec) -> tuple[Any, Any]:
    """Load a run's data, check that the batch fits, the device exists and the model can be built.

    Returns (train, val). Everything here fails the same way for every trial, so it is checked
    before any run or trial starts.
    """
    train, val = load_split(spec.data)
    check_batch(spec, len(train))
    resolve_device(spec.device)
    build_model(spec.model, train.pocket_dim, train.ligand_dim)
    return train, val


def _finish(tracker: Tracker, outcome: RunOutcome, batch: MetricBatch, save_best: Any) -> None:
    run_id, trainer = outcome.run_id, outcome.trainer
    end_tags: dict[str, Any] = {"ablate.epochs_trained": len(outcome.history)}
    if batch.nonfinite:
        end_tags["ablate.diverged"] = ", ".join(f"{k}@epoch{v}" for k, v in batch.nonfinite.items())
    if outcome.stopped is not None:
        end_tags["ablate.stopped_by"] = outcome.stopped.rule
        end_tags["ablate.stop_reason"] = outcome.stopped.message
    if trainer.best.epoch >= 0:
        end_tags["ablate.best_epoch"] = trainer.best.epoch
    tracker.set_tags(run_id, end_tags)
    if outcome.history:
        tracker.log_dict(
            run_id,
            {"final": _finite(outcome.final), "best": outcome.best(),
             "best_epoch": trainer.best.epoch, "select_metric": trainer.spec.select_metric},
            "final_metrics.json",
        )
    if save_best is not None and trainer.best.state is not None:
        trainer.save_best(save_best)


def _finite(m: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in m.items() if math.isfinite(v)}


def _fingerprint(spec: RunSpec) -> str:
    train, val = load_split(spec.data)
    return f"{train.fingerprint()}+{val.fingerprint()}"


# --------------------------------------------------------------------------------------
# The trial loop
# --------------------------------------------------------------------------------------


class _BudgetTaken(Exception):
    """A trial created after the queue ran dry (another worker took the last one)."""


class TrialError(Exception):
    """A trial failed on an error; it is recorded (FAIL) and the worker goes on."""


@dataclass
class WorkerReport:
    """What one worker did."""

    states: dict[str, int] = field(default_factory=dict)

    def add(self, state: str) -> None:
        """Count one finished trial."""
        self.states[state] = self.states.get(state, 0) + 1


def ensure_parent(ref: studies.StudyRef, tracker: Tracker) -> tuple[str, str]:
    """(experiment id, parent run id) of a study in MLflow, created on first use."""
    study, spec = ref.study, ref.spec
    exp_id = tracker.experiment_id(spec.name)
    parent = study.user_attrs.get(studies.PARENT_RUN_ATTR)
    if parent:
        try:
            tracker.client.get_run(parent)
            return exp_id, str(parent)
        except Exception:  # kept by a study whose MLflow store was another one
            pass
    parent = tracker.start_run(
        exp_id,
        study.study_name,
        {"ablate.study": study.study_name, "ablate.kind": spec.kind, **environment_tags()},
    )
    tracker.log_dict(parent, spec_document(spec), "study_spec.json")
    study.set_user_attr(studies.PARENT_RUN_ATTR, parent)
    return exp_id, parent


def work(
    name: str,
    *,
    storage: str | None = None,
    tracking_uri: str | None = None,
    device: str | None = None,
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    on_event: OnEvent | None = None,
    wait_for_running: bool = True,
    keep_going: Callable[[], bool] | None = None,
) -> WorkerReport:
    """Take trials of study ``name`` until none is left to take, then return.

    While other workers' trials are still running, a worker waits for them (when heartbeats are
    on): a trial whose worker died is failed after the grace period and put back in the queue.
    A trial that fails on an error is recorded and the worker goes on; a user's mistake
    (AblateError: a device that does not exist, a batch larger than the data) stops it.
    ``keep_going`` is asked before each trial (a worker process stops when its parent is gone).
    The worker that finds the study done ends its MLflow parent run.
    """
    emit = on_event or (lambda e: None)
    tracker = Tracker(tracking_uri)
    store = studies.open_storage(storage, heartbeat_seconds=heartbeat_seconds,
                                 on_stale=lambda trial: _end_stale_run(tracker, trial))
    ref = studies.load(name, store)
    exp_id, parent = ensure_parent(ref, tracker)
    report = WorkerReport()
    objective = _Objective(ref, tracker, exp_id, parent, device, emit, report)
    study = ref.study
    while keep_going is None or keep_going():
        optuna.storages.fail_stale_trials(study)
        states = [t.state for t in study.get_trials(deepcopy=False, states=_OPEN)]
        if TrialState.WAITING in states:
            study.optimize(objective, n_trials=1, catch=(TrialError, _BudgetTaken))
        elif TrialState.RUNNING in states and wait_for_running and heartbeat_seconds:
            time.sleep(POLL_SECONDS)
        else:
            end_parent_if_done(ref, tracker, parent)
            break
    return report


def end_parent_if_done(ref: studies.StudyRef, tracker: Tracker, parent: str) -> bool:
    """End the MLflow parent run once no trial is waiting or running: FINISHED, or FAILED when a
    suite has failed trials; returns whether the study is done."""
    trials = ref.study.get_trials(deepcopy=False)
    if any(t.state in _OPEN for t in trials):
        return False
    status = "FINISHED"
    if isinstance(ref.spec, SuiteSpec):  # every (experiment, seed) must have a result
        done = {(t.params.get("experiment"), t.params.get("seed")) for t in trials
                if t.state in (TrialState.COMPLETE, TrialState.PRUNED)}
        if any((e, s) not in done for e in ref.spec.experiments for s in ref.spec.seeds):
            status = "FAILED"
    if tracker.client.get_run(parent).info.status != status:
        tracker.end_run(parent, status)
    return True


_OPEN = (TrialState.WAITING, TrialState.RUNNING)


def _end_stale_run(tracker: Tracker, trial: optuna.trial.FrozenTrial) -> None:
    """A trial whose worker died: its MLflow run ends FAILED, saying why."""
    run_id = trial.user_attrs.get("mlflow_run_id")
    if not run_id:
        return
    try:
        tracker.set_tags(run_id, {"ablate.state": "FAIL",
                                  "ablate.stop_reason": "the worker stopped sending heartbeats"})
        tracker.end_run(run_id, "FAILED")
    except Exception:  # the run lives in another MLflow store; the trial is re-queued anyway
        pass


class _Objective:
    def __init__(
        self,
        ref: studies.StudyRef,
        tracker: Tracker,
        exp_id: str,
        parent: str,
        device: str | None,
        emit: OnEvent,
        report: WorkerReport,
    ):
        self.ref, self.tracker, self.exp_id, self.parent = ref, tracker, exp_id, parent
        self.device, self.emit, self.report = device, emit, report

    def __call__(self, trial: optuna.Trial) -> float:
        spec = self.ref.spec
        if not studies.is_queued(trial):
            trial.set_user_attr(studies.SKIPPED_ATTR, "created after the study's queue ran dry")
            raise _BudgetTaken
        run, values, label = studies.suggest(trial, spec)
        if self.device:
            run = run.model_copy(update={"device": self.device})
        trial.set_user_attr("label", label)
        trial.set_user_attr("values", values)
        self.emit({"kind": "start", "trial": trial.number, "label": label, "epochs": run.epochs,
                   "pid": os.getpid()})
        metric = spec.metric if isinstance(spec, SuiteSpec) else spec.objective
        tags = {"ablate.study": self.ref.name, "ablate.trial": trial.number,
                **{f"ablate.{k}": v for k, v in values.items()}}
        state = "FAIL"
        reason = ""
        outcome = None
        try:
            outcome = train_and_log(
                run, self.tracker, self.exp_id, f"{self.ref.name}#{trial.number} {label}",
                tags=tags, parent_run_id=self.parent,
                on_start=lambda run_id, trainer: trial.set_user_attr("mlflow_run_id", run_id),
                on_epoch=self._hook(trial, spec, metric),
            )
            self._record(trial, outcome)
            value = self._value(outcome, spec, metric)
            if outcome.stopped is not None or value is None:
                state = "PRUNED"
                stop = outcome.stopped or Instability("nonfinite", f"{metric} is not finite")
                trial.set_user_attr("pruned_by", {"rule": stop.rule, "message": stop.message,
                                                  **stop.values})
                raise optuna.TrialPruned(stop.message)
            state = "COMPLETE"
            return value
        except KeyboardInterrupt:
            reason = "interrupted"
            raise
        except optuna.TrialPruned as e:
            reason = str(e)
            raise
        except AblateError as e:  # a user's mistake: every trial would fail the same way
            reason = mask_url(str(e))
            trial.set_user_attr("error", reason)
            raise
        except Exception as e:
            reason = mask_url(f"{type(e).__name__}: {e}")[:2000]
            trial.set_user_attr("error", reason)
            raise TrialError(reason) from e
        finally:
            if outcome is not None:
                self.tracker.set_tags(outcome.run_id, {"ablate.state": state})
            self.report.add(state)
            self.emit({"kind": "end", "trial": trial.number, "label": label, "state": state,
                       "reason": reason, "value": (outcome.final.get(metric) if outcome else None)})

    def _hook(self, trial: optuna.Trial, spec: StudySpec, metric: str) -> EpochHook:
        def hook(result: EpochResult, history: list[dict[str, float]]) -> Instability | None:
            value = result.metrics.get(metric, float("nan"))
            self.emit({"kind": "epoch", "trial": trial.number, "epoch": result.epoch,
                       "metric": metric, "value": value})
            if isinstance(spec, SuiteSpec):
                return None
            # Optuna compares intermediate values at the same step. When a trial is judged by its
            # best epoch, the value at epoch e is the best so far: the objective if it stopped here.
            reported = best_value(history, metric) if spec.objective_at == "best" else value
            found = stability.check(history, spec.stability)
            if found is not None:
                return found
            if result.epoch % spec.pruner.interval_steps or not math.isfinite(reported):
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
        trial.set_user_attr("final", _finite(outcome.final))
        trial.set_user_attr("best", outcome.best())
        trial.set_user_attr("epochs_trained", len(outcome.history))
        trial.set_user_attr("best_epoch", outcome.trainer.best.epoch)
        if outcome.diverged:
            trial.set_user_attr("diverged", True)
        if outcome.stopped is not None:
            self.tracker.set_tags(outcome.run_id, {
                "ablate.pruned_by": outcome.stopped.rule,
                "ablate.pruned_reason": outcome.stopped.message,
            })

    @staticmethod
    def _value(outcome: RunOutcome, spec: StudySpec, metric: str) -> float | None:
        if isinstance(spec, SearchSpec) and spec.objective_at == "best":
            value = outcome.best([metric]).get(metric)
        else:
            value = outcome.final.get(metric)
        return value if value is not None and math.isfinite(value) else None


# --------------------------------------------------------------------------------------
# Running a study's workers on this machine
# --------------------------------------------------------------------------------------


@dataclass
class Execution:
    """What ``execute`` did: the study, and whether every trial it owes has finished."""

    study: optuna.Study
    spec: StudySpec
    parent_run_id: str
    complete: bool
    interrupted: bool = False


def prepare(
    spec: StudySpec, *, storage: str | None, tracking_uri: str | None, n_trials: int | None = None,
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS, devices: Sequence[str] = (),
) -> tuple[studies.StudyRef, Tracker, str]:
    """Check the inputs, then create or resume the study and its MLflow parent run."""
    for device in devices:
        resolve_device(device)
    runs = spec.experiments if isinstance(spec, SuiteSpec) else dict(studies.corner_runs(spec))
    for label, run in runs.items():
        try:
            check_run(run)
        except AblateError as e:
            raise AblateError(f"{spec.name}: {label}: {e}") from None
    store = studies.open_storage(storage, heartbeat_seconds=heartbeat_seconds)
    tracker = Tracker(tracking_uri)
    study = studies.create_or_load(spec, store, n_trials)
    ref = studies.StudyRef(study, spec)
    _, parent = ensure_parent(ref, tracker)
    tracker.set_status(parent, "RUNNING")
    return ref, tracker, parent


def execute(
    ref: studies.StudyRef,
    *,
    storage: str | None,
    tracking_uri: str | None,
    jobs: int = 1,
    devices: Sequence[str] | None = None,
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    on_event: OnEvent | None = None,
) -> bool:
    """Run the study's trials with ``jobs`` workers (one per device when devices are given).

    One worker runs in this process; more run as separate processes, each with an equal share
    of the CPU threads. Returns False when interrupted (Ctrl-C or SIGTERM).
    """
    devs = list(devices or [])
    n = len(devs) if devs else jobs
    if n <= 1:
        with sigterm_as_interrupt():
            try:
                work(ref.name, storage=storage, tracking_uri=tracking_uri,
                     device=devs[0] if devs else None, heartbeat_seconds=heartbeat_seconds,
                     on_event=on_event)
            except KeyboardInterrupt:
                return False
        return True
    return _execute_processes(ref, storage, tracking_uri, n, devs, heartbeat_seconds, on_event)


def _execute_processes(
    ref: studies.StudyRef,
    storage: str | None,
    tracking_uri: str | None,
    n: int,
    devs: list[str],
    heartbeat_seconds: int | None,
    on_event: OnEvent | None,
) -> bool:
    ctx = mp.get_context("spawn")
    events: Any = ctx.Queue()
    threads = max(1, (os.cpu_count() or 1) // n)
    procs = [
        ctx.Process(
            target=_process_main,
            args=(ref.name, storage, tracking_uri, devs[i] if devs else None, threads,
                  heartbeat_seconds, events),
            daemon=False,
        )
        for i in range(n)
    ]
    stop_reader = threading.Event()
    errors: list[str] = []
    reader = threading.Thread(target=_relay, args=(events, on_event, stop_reader, errors), daemon=True)
    reader.start()
    interrupted = False
    with sigterm_as_interrupt():
        try:
            for p in procs:
                p.start()
            for p in procs:
                p.join()
        except KeyboardInterrupt:
            interrupted = True
            _stop_processes(procs)
    stop_reader.set()
    reader.join(timeout=5)
    codes = [p.exitcode for p in procs]
    if errors:
        raise AblateError(errors[0])
    if interrupted or 130 in codes:
        return False
    failed = [c for c in codes if c not in (0, None)]
    if failed:
        raise RuntimeError(f"{len(failed)} worker process(es) exited with codes {failed}")
    return True


def _stop_processes(procs: list[Any], grace_seconds: float = 60.0) -> None:
    """SIGTERM every worker process (each ends its trial cleanly), then SIGKILL what is left."""
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_seconds
    for p in procs:
        p.join(timeout=max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive() and p.pid is not None:
            os.kill(p.pid, signal.SIGKILL)
            p.join()


def _relay(events: Any, on_event: OnEvent | None, stop: threading.Event, errors: list[str]) -> None:
    while not stop.is_set():
        try:
            event = events.get(timeout=0.2)
        except queue_mod.Empty:
            continue
        except (EOFError, OSError):
            return
        if event.get("kind") == "error":
            errors.append(event["message"])
        elif on_event is not None:
            on_event(event)


def _process_main(
    name: str,
    storage: str | None,
    tracking_uri: str | None,
    device: str | None,
    threads: int,
    heartbeat_seconds: int | None,
    events: Any,
) -> None:
    # Signals come from the parent only: its own process group keeps the terminal's Ctrl-C away
    # (the parent forwards one SIGTERM), and SIGINT works even where the parent ignored it.
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    parent = os.getppid()
    import torch

    torch.set_num_threads(threads)
    try:
        with sigterm_as_interrupt():
            work(name, storage=storage, tracking_uri=tracking_uri, device=device,
                 heartbeat_seconds=heartbeat_seconds, on_event=events.put,
                 keep_going=lambda: os.getppid() == parent)
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    except AblateError as e:
        events.put({"kind": "error", "message": str(e)})
        raise SystemExit(2) from None


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM like Ctrl-C (Optuna fails a running trial cleanly only on KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
