"""Tracked runs: train runs with the trainer and log each one's epochs to its own MLflow run.

``train_and_log_members`` is the only place where runs are trained and tracked: an array's members
each get their own MLflow run, metric history and end, exactly as a run trained alone;
``train_and_log`` is the array of one (``ablate train`` and the tests use it).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ablate.specs import RunSpec, StabilitySpec
from ablate.stores import release_interrupted
from ablate.tracking import checkpoints
from ablate.tracking.batches import MetricBatch
from ablate.tracking.client import Tracker, environment_tags
from ablate.training import stability
from ablate.training.selection import Best, EpochResult
from ablate.training.splits import load_split, split_fingerprint
from ablate.training.stability import Instability
from ablate.training.trainer import Member, Trainer
from ablate.vocabulary import Tag

EpochHook = Callable[[EpochResult, list[dict[str, float]]], Instability | None]
"""Called after each epoch with its result and the run's history; a returned Instability stops the run."""


@dataclass
class RunOutcome:
    """What a tracked training run produced."""

    run_id: str
    history: list[dict[str, float]]
    member: Member
    stopped: Instability | None = None
    floors: dict[str, float] = field(default_factory=dict)
    """What a random ranking scores on the validation and test sets (val/ef1 -> 1.0, test/ef1 -> 1.0, ...)."""
    test: dict[str, float] = field(default_factory=dict)
    """The selected model's metrics on the test split (``test/...``), measured once when the run ended."""
    stopped_early_at: int | None = None
    """The epoch after which early stopping ended the run (``patience``)."""
    split: str = ""
    """How the run's pairs were split (``splits.Split.how``)."""
    error: str | None = None
    """Why the run failed (its loss raised or returned no usable value); such a run ends FAILED."""

    @property
    def spec(self) -> RunSpec:
        """The run's spec."""
        return self.member.spec

    @property
    def final(self) -> dict[str, float]:
        """The last epoch's metrics."""
        return self.history[-1] if self.history else {}

    @property
    def selected(self) -> dict[str, float]:
        """Every metric at the selected epoch (the best validation value of the run's selection metric)."""
        return dict(self.member.best.metrics)

    @property
    def best_run(self) -> Best:
        """The run's selected epoch and model."""
        return self.member.best

    @property
    def diverged(self) -> bool:
        """Whether a loss or the validation embeddings became non-finite."""
        return bool(self.stopped and self.stopped.rule == "nonfinite")


_NONFINITE_ONLY = StabilitySpec(enabled=False)


def train_and_log(
    run: RunSpec | Trainer,
    tracker: Tracker,
    experiment_id: str,
    run_name: str,
    *,
    tags: dict[str, Any] | None = None,
    parent_run_id: str | None = None,
    on_start: Callable[[str], None] | None = None,
    on_epoch: EpochHook | None = None,
) -> RunOutcome:
    """Train one run and log it as one MLflow run (a child run when a parent is given).

    The trainer is built (data, batch, device and model checked) before the MLflow run is
    created, so a mistake leaves no RUNNING run behind. The run ends FINISHED (also when
    ``on_epoch`` stops it early), FAILED on an error and KILLED on Ctrl-C or SIGTERM; metrics
    logged before the end are kept. ``on_start`` receives the MLflow run id.
    """
    trainer = run if isinstance(run, Trainer) else Trainer.from_spec(run)
    (outcome,) = train_and_log_members(
        trainer, tracker, experiment_id, [run_name], tags=[tags or {}], parent_run_id=parent_run_id,
        on_start=None if on_start is None else (lambda k, run_id: on_start(run_id)),
        on_epoch=None if on_epoch is None else (lambda k, result, history: on_epoch(result, history)),
    )
    return outcome


def train_and_log_members(
    trainer: Trainer,
    tracker: Tracker,
    experiment_id: str,
    run_names: Sequence[str],
    *,
    tags: Sequence[dict[str, Any]],
    parent_run_id: str | None = None,
    on_start: Callable[[int, str], None] | None = None,
    on_epoch: Callable[[int, EpochResult, list[dict[str, float]]], Instability | None] | None = None,
    on_end: Callable[[int, RunOutcome], None] | None = None,
    end_tags: Callable[[int, RunOutcome], dict[str, Any]] | None = None,
    resume: dict[int, tuple[str, dict[str, Any]]] | None = None,
    on_checkpoint: Callable[[int, int], None] | None = None,
    keep_checkpoints: bool = False,
) -> list[RunOutcome]:
    """Train every member of ``trainer`` and log member k as the MLflow run ``run_names[k]``.

    A member's run ends FINISHED as soon as the member stops (its epochs done, stopped by
    ``on_epoch``, or diverged) and ``on_end`` is called for it then; on Ctrl-C or SIGTERM the runs
    still training end KILLED, on an error FAILED. NaN or inf never reaches MLflow. ``end_tags(k, outcome)`` gives
    tags that go with the run's other end tags (in the same request).

    With ``on_checkpoint`` the members are checkpointed into their runs' artifacts (see
    ``ablate.tracking.checkpoints``; ``on_checkpoint(k, epoch)`` follows each write), also when stopped, and a
    finished member's checkpoint is removed unless ``keep_checkpoints``. ``resume`` maps a member to
    (its earlier MLflow run, a checkpoint): the member continues that run from the checkpoint's epoch.
    """
    hooks = _Hooks(on_start, on_epoch, on_end, on_checkpoint, keep_checkpoints, end_tags)
    array = _TrackedArray(trainer, tracker, hooks, resume or {})
    array.open(experiment_id, run_names, tags, parent_run_id)
    return array.run()


@dataclass
class _Hooks:
    """What ``train_and_log_members`` calls back (see there)."""

    on_start: Callable[[int, str], None] | None
    on_epoch: Callable[[int, EpochResult, list[dict[str, float]]], Instability | None] | None
    on_end: Callable[[int, RunOutcome], None] | None
    on_checkpoint: Callable[[int, int], None] | None
    keep_checkpoints: bool
    end_tags: Callable[[int, RunOutcome], dict[str, Any]] | None = None


class _TrackedArray:
    """An array's members as MLflow runs: opened (or resumed), sent each epoch, checkpointed, ended one by one."""

    def __init__(self, trainer: Trainer, tracker: Tracker, hooks: _Hooks,
                 resume: dict[int, tuple[str, dict[str, Any]]]):
        self.trainer, self.tracker, self.hooks, self.resume = trainer, tracker, hooks, resume
        self.outcomes: list[RunOutcome] = []
        self.logged: dict[int, int] = {}
        """A resumed run's last epoch already in MLflow: it is not logged twice."""
        self.batches: dict[int, MetricBatch] = {}
        self.open_runs: set[int] = set()
        self.clock = checkpoints.Clock()
        self.snapshots: dict[int, dict[str, Any]] = {}
        """Each open member's state at its last finished epoch."""
        self.written: dict[int, int] = {}
        self.experiment_id: str | None = None

    def open(self, experiment_id: str, run_names: Sequence[str], tags: Sequence[dict[str, Any]],
             parent_run_id: str | None) -> None:
        """Start each member's MLflow run, or continue the run it resumes."""
        self.experiment_id = experiment_id
        trainer, tracker = self.trainer, self.tracker
        how = load_split(trainer.spec.data).how
        for k, member in enumerate(trainer.every):
            if k in self.resume:
                run_id, state = self.resume[k]
                trainer.restore(k, state)
                tracker.set_status(run_id, "RUNNING")
                tracker.set_tags(run_id, {Tag.RESUMED_FROM_EPOCH: trainer.start_epoch})
                self.outcomes.append(RunOutcome(run_id, list(state["history"]), member, split=how))
                self.logged[k] = max((m.step for m in tracker.client.get_metric_history(run_id, "train/loss")),
                                     default=-1)
                continue
            run_tags = {**self._tags(member, how), **tags[k]}
            run_id = tracker.start_run(experiment_id, run_names[k], run_tags, parent_run_id)
            self.outcomes.append(RunOutcome(run_id, [], member, split=how))
        self.open_runs = set(range(len(self.outcomes)))

    def _tags(self, member: Member, how: str) -> dict[str, Any]:
        trainer, size = self.trainer, len(self.trainer.every)
        return {
            Tag.LOSS: member.spec.loss, Tag.DEVICE: str(trainer.device), Tag.AMP: trainer.amp.label,
            Tag.DATA: member.spec.data.source, Tag.DATA_FINGERPRINT: split_fingerprint(trainer.spec.data),
            Tag.SPLIT: how, **({Tag.ARRAY_SIZE: size, Tag.FUSION: trainer.models.fusion} if size > 1 else {}),
            **environment_tags(),
        }

    def run(self) -> list[RunOutcome]:
        """Train the array to its end; on Ctrl-C or an error end the open runs KILLED or FAILED and re-raise."""
        writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics")
        try:
            self._start_logging(writer)
            for results in self.trainer.array():
                ended = [k for k, result in results.items() if self._epoch(k, result)]
                for k in ended:
                    self._end(k)
                if self.snapshots and self.clock.due():
                    self._write(sorted(self.snapshots))
        except BaseException as e:
            self._abort(e)
            raise
        finally:
            writer.shutdown(wait=True)
        return self.outcomes

    def _start_logging(self, writer: ThreadPoolExecutor) -> None:
        trainer, tracker = self.trainer, self.tracker
        for k, outcome in enumerate(self.outcomes):
            if k not in self.resume:
                spec = outcome.spec
                tracker.log_params(outcome.run_id, {**spec.applicable(), "train_pairs": len(trainer.train),
                                                    "val_pairs": len(trainer.val),
                                                    "test_pairs": 0 if trainer.test is None else len(trainer.test)})
                tracker.log_dict(outcome.run_id, spec.model_dump(mode="json"), "spec.json")
            self.batches[k] = MetricBatch(tracker, outcome.run_id, background=writer)
            for epoch in range(self.logged.get(k, -1) + 1, len(outcome.history) if k in self.resume else 0):
                self.batches[k].add(outcome.history[epoch], step=epoch)  # epochs the stopped run had not sent yet
            if self.hooks.on_start is not None:
                self.hooks.on_start(k, outcome.run_id)

    def _epoch(self, k: int, result: EpochResult) -> bool:
        """Take in member k's epoch; returns whether its run ends here."""
        outcome, trainer = self.outcomes[k], self.trainer
        if result.error is not None:  # the epoch's numbers are not the run's: it ends here, FAILED
            outcome.error = result.error
            trainer.stop(k)
            return True
        outcome.history.append(result.metrics)
        if result.epoch > self.logged.get(k, -1):  # the stopped run may have sent epochs it then lost
            self.batches[k].add(result.metrics, step=result.epoch)
        if result.diverged:
            outcome.stopped = stability.check(outcome.history, _NONFINITE_ONLY) or Instability(
                "nonfinite", f"non-finite validation output at epoch {result.epoch}", {"epoch": result.epoch})
        elif self.hooks.on_epoch is not None:
            outcome.stopped = self.hooks.on_epoch(k, result, outcome.history)
        if result.stopped_early:
            outcome.stopped_early_at = result.epoch
        if outcome.stopped is not None or result.stopped_early or result.epoch == trainer.spec.epochs - 1:
            trainer.stop(k)
            return True
        if self.hooks.on_checkpoint is not None:
            self.snapshots[k] = {**trainer.checkpoint(k, result.epoch), "history": list(outcome.history)}
        return False

    def _end(self, k: int) -> None:
        """End member k's run: its selected model scored once on test and logged, FINISHED (FAILED if its loss
        failed)."""
        outcome, trainer, tracker = self.outcomes[k], self.trainer, self.tracker
        failed = outcome.error is not None
        model = None if failed else trainer.selected_model(k)  # built once: scored on test, then logged
        if model is not None:
            outcome.test, test_floors = trainer.score_test(k, model)
            outcome.floors = {**trainer.floors, **test_floors}
        self.snapshots.pop(k, None)
        tags = self.hooks.end_tags(k, outcome) if self.hooks.end_tags is not None else {}
        _finish(tracker, outcome, self.batches[k], model, self.experiment_id, tags)
        if self.hooks.on_checkpoint is not None and not self.hooks.keep_checkpoints and (
                k in self.written or k in self.resume):
            checkpoints.remove(tracker, outcome.run_id)
        tracker.end_run(outcome.run_id, "FAILED" if failed else "FINISHED")
        self.open_runs.discard(k)
        if self.hooks.on_end is not None:
            self.hooks.on_end(k, outcome)

    def _write(self, ks: Sequence[int]) -> None:
        start = time.monotonic()
        for k in ks:
            snapshot = self.snapshots.get(k)
            if snapshot is not None and self.written.get(k) != snapshot["epoch"]:
                checkpoints.save(self.tracker, self.outcomes[k].run_id, snapshot)
                self.written[k] = snapshot["epoch"]
                if self.hooks.on_checkpoint is not None:
                    self.hooks.on_checkpoint(k, self.written[k])
        self.clock.spent(time.monotonic() - start)

    def _abort(self, e: BaseException) -> None:
        """The runs still open end KILLED (Ctrl-C, SIGTERM: checkpointed first, to continue) or FAILED."""
        status = "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED"
        release_interrupted(e)
        for k in sorted(self.open_runs):
            try:
                if k in self.batches:
                    _finish(self.tracker, self.outcomes[k], self.batches[k])
                if isinstance(e, KeyboardInterrupt):
                    self._write([k])  # the state of its last finished epoch: the next run continues from there
            finally:
                self.tracker.end_run(self.outcomes[k].run_id, status)


def _finish(tracker: Tracker, outcome: RunOutcome, batch: MetricBatch, model: nn.Module | None = None,
            experiment_id: str | None = None, tags: Mapping[str, Any] | None = None) -> None:
    """Send the run's last metrics, then its end tags (with ``tags``) and summary; for a run that ended (not one
    interrupted) also its test metrics (step = the selected epoch) and its selected ``model``."""
    batch.close()
    run_id, best = outcome.run_id, outcome.best_run
    end_tags: dict[str, Any] = {**(tags or {}), Tag.EPOCHS_TRAINED: len(outcome.history)}
    if batch.nonfinite:
        end_tags[Tag.DIVERGED] = ", ".join(f"{k}@epoch{v}" for k, v in batch.nonfinite.items())
    if outcome.stopped is not None:
        end_tags[Tag.STOPPED_BY] = outcome.stopped.rule
        end_tags[Tag.STOP_REASON] = outcome.stopped.message
    if outcome.error is not None:
        end_tags[Tag.STOP_REASON] = outcome.error
    if outcome.stopped_early_at is not None:
        end_tags[Tag.STOPPED_EARLY_AT] = outcome.stopped_early_at
    if best.epoch >= 0:
        end_tags[Tag.BEST_EPOCH] = best.epoch
        end_tags[Tag.SELECTED_BY] = best.select
    floors = {f"random {k}": round(v, 6) for k, v in outcome.floors.items() if math.isfinite(v)}
    # one request: the end tags, the floors (constant for the run: parameters, not per-epoch metrics) and, for a run
    # that ended, its test metrics
    tracker.log_batch(run_id, tags=end_tags, params=floors, metrics=outcome.test, step=best.epoch)
    if outcome.history:
        tracker.log_dict(
            run_id,
            {"final": {k: v for k, v in outcome.final.items() if math.isfinite(v)}, "selected": outcome.selected,
             "best_epoch": best.epoch, "select_metric": best.select,
             "test": {k: v for k, v in outcome.test.items() if math.isfinite(v)}},
            "final_metrics.json",
        )
    if model is not None:
        tracker.log_model(run_id, model.cpu(), experiment_id=experiment_id)
