"""What crosses process boundaries: a study's and a trial's records in the Optuna storage, and worker events.

Workers on any machine write a trial's record into Optuna's user attributes; reports, ``studies
show`` and resumed workers read it back through ``TrialRecord``. Worker processes tell the command
that started them what happens through the ``Event`` types (they travel through a queue).
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

    from ablate.training.stability import Instability

# Study attributes
SPEC = "ablate.spec"
"""The resolved spec document, so a worker can join knowing only the study name and the storage."""
SPEC_NAME = "ablate.spec_name"
CREATED = "ablate.created"
PARENT_RUN = "ablate.mlflow_parent_run_id"
IMPORTANCES = "ablate.importances"
"""fANOVA parameter importances and the complete trials they were computed from ([count, last number])."""

# Trial attributes
QUEUED = "ablate.queued"
"""Set on every trial the study owes (a trial created past the budget lacks it)."""
SKIPPED = "ablate.skipped"
"""Why a trial was dropped without training (created after the queue ran dry)."""
LABEL, VALUES, RUN_ID = "label", "values", "mlflow_run_id"
FINAL, SELECTED, BEST_EPOCH, EPOCHS = "final", "selected", "best_epoch", "epochs_trained"
"""Every metric at the last epoch, every metric at the validation-selected epoch, that epoch, epochs trained."""
TEST = "test"
"""The selected model's test metrics (measured once, when the run ended; nothing chooses by them)."""
SPLIT = "split"
"""How the run's pairs were split ("ligand-disjoint split, 60/20/20 %", ...)."""
STOPPED_EARLY = "stopped_early_at"
"""The epoch after which early stopping (patience) ended the trial's run."""
PRUNED_BY, DIVERGED, ERROR = "pruned_by", "diverged", "error"
CHECKPOINT = "checkpoint_epoch"
"""The last epoch checkpointed into the trial's MLflow run (a failed trial with one can be resumed)."""
RESUMES = "resumes_trial"
"""On a queued trial: the number of the interrupted or failed trial whose configuration (and, where it has one,
run and checkpoint) it continues."""
SCHEDULER_JOB = "scheduler_job"
"""The scheduler job whose worker took the trial (a SLURM ``JOB_TASK``)."""
INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"
"""The error of a trial stopped by Ctrl-C or SIGTERM: the next command trains its configuration again."""
FLOORS = "random_floors"
"""What a random ranking scores on the trial's validation set (val/ef1 -> 1.0, ...)."""


def fixed_params(trial: FrozenTrial) -> dict[str, Any]:
    """The parameters fixed when the trial was queued (empty for a search's trials)."""
    fixed = trial.system_attrs.get("fixed_params")
    return fixed if isinstance(fixed, dict) else {}


@dataclass(frozen=True)
class TrialRecord:
    """One trial as a worker left it: state, what it trained, its results and why it stopped."""

    number: int
    state: str
    value: float | None
    label: str
    values: dict[str, Any]
    run_id: str | None
    final: dict[str, float]
    selected: dict[str, float]
    test: dict[str, float]
    best_epoch: int
    epochs: int
    stop: dict[str, Any]
    floors: dict[str, float]
    diverged: bool
    error: str
    queued: bool
    skipped: str
    reported: dict[int, float] = field(default_factory=dict)
    stopped_early_at: int | None = None
    split: str = ""
    job: str = ""
    """The scheduler job whose worker took the trial ('' outside one)."""

    @classmethod
    def of(cls, t: FrozenTrial) -> TrialRecord:
        """The record of a trial read from the storage."""
        a = t.user_attrs
        return cls(
            number=t.number, state=t.state.name, value=t.value,
            label=str(a.get(LABEL) or _label(t.params or fixed_params(t))),
            values=dict(a.get(VALUES) or t.params), run_id=a.get(RUN_ID),
            final=dict(a.get(FINAL) or {}), selected=dict(a.get(SELECTED) or {}), test=dict(a.get(TEST) or {}),
            best_epoch=int(a.get(BEST_EPOCH, -1)), epochs=int(a.get(EPOCHS, len(t.intermediate_values))),
            stop=dict(a.get(PRUNED_BY) or {}), floors=dict(a.get(FLOORS) or {}), diverged=bool(a.get(DIVERGED)),
            error=str(a.get(ERROR) or ""),
            queued=bool(a.get(QUEUED)), skipped=str(a.get(SKIPPED) or ""),
            reported=dict(t.intermediate_values),
            stopped_early_at=None if a.get(STOPPED_EARLY) is None else int(a[STOPPED_EARLY]),
            split=str(a.get(SPLIT) or ""), job=str(a.get(SCHEDULER_JOB) or ""),
        )

    @property
    def note(self) -> str:
        """Why the trial stopped early or failed ('' when it ran to the end)."""
        if self.diverged:
            return "diverged"
        return str(self.stop.get("message", "")) or self.error


def _label(params: Mapping[str, Any]) -> str:
    if "experiment" in params and "seed" in params:
        return f"{params['experiment']} s{params['seed']}"
    return " ".join(f"{k}={v}" for k, v in params.items())


def write_attrs(trial: optuna.Trial, attrs: Mapping[str, Any]) -> None:
    """Set a running trial's user attributes in one statement.

    Optuna's ``Trial.set_user_attr`` commits each attribute on its own (a row lookup, an upsert and a commit each); a
    trial's record is written several attributes at a time, and with many short trials on a shared database those
    round trips are much of what a worker spends its time on. On PostgreSQL and SQLite the attributes go into
    Optuna's own table as one multi-row upsert, in one transaction that first checks, as Optuna does, that the trial
    is still running; elsewhere (or with one attribute) through ``set_user_attr``.
    """
    from optuna.storages import RDBStorage

    storage = getattr(trial.storage, "_backend", trial.storage)  # a study's RDB storage comes wrapped in a cache
    if not isinstance(storage, RDBStorage) or len(attrs) < 2 or not _upserts(storage.engine.name):
        for key, value in attrs.items():
            trial.set_user_attr(key, value)
        return
    from optuna.storages._rdb import models
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql, sqlite

    table = models.TrialUserAttributeModel
    dialect = postgresql if storage.engine.name == "postgresql" else sqlite
    rows = [{"trial_id": trial._trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()]
    insert = dialect.insert(table).values(rows)
    upsert = insert.on_conflict_do_update(index_elements=[table.trial_id, table.key],
                                          set_={"value_json": insert.excluded.value_json})
    with storage.engine.begin() as connection:
        state = connection.execute(select(models.TrialModel.state).where(
            models.TrialModel.trial_id == trial._trial_id)).scalar_one()
        if not state.is_finished():
            connection.execute(upsert)
    if state.is_finished():  # raised outside the transaction: Optuna's own check reads the trial again
        storage.check_trial_is_updatable(trial._trial_id, state)
    trial._cached_frozen_trial.user_attrs.update(attrs)  # what trial.user_attrs reads, as set_user_attr keeps it


def _upserts(dialect: str) -> bool:
    """Whether the database takes INSERT ... ON CONFLICT DO UPDATE (SQLite from 3.24, as Optuna checks)."""
    return dialect == "postgresql" or (dialect == "sqlite" and sqlite3.sqlite_version_info >= (3, 24, 0))


def write_start(trial: optuna.Trial, label: str, values: Mapping[str, Any], job: str | None = None) -> None:
    """Record what a trial trains, once its parameters are known, and the scheduler job whose worker took it."""
    write_attrs(trial, {LABEL: label, VALUES: dict(values), **({SCHEDULER_JOB: job} if job else {})})


def write_run(trial: optuna.Trial, run_id: str) -> None:
    """Record the trial's MLflow run."""
    trial.set_user_attr(RUN_ID, run_id)


def write_result(
    trial: optuna.Trial, *, final: Mapping[str, float], selected: Mapping[str, float], best_epoch: int,
    epochs: int, diverged: bool, stop: Instability | None, floors: Mapping[str, float] | None = None,
    test: Mapping[str, float] | None = None, stopped_early_at: int | None = None, split: str = "",
) -> None:
    """Record a trained trial's results (finite values only): the last epoch's metrics, the selected epoch's and its
    test metrics, its random floors, and why it stopped early."""
    attrs: dict[str, Any] = {FINAL: {k: v for k, v in final.items() if math.isfinite(v)},
                             SELECTED: {k: v for k, v in selected.items() if math.isfinite(v)}}
    if test:
        attrs[TEST] = {k: v for k, v in test.items() if math.isfinite(v)}
    if stopped_early_at is not None:
        attrs[STOPPED_EARLY] = stopped_early_at
    if split:
        attrs[SPLIT] = split
    attrs[EPOCHS], attrs[BEST_EPOCH] = epochs, best_epoch
    if floors:
        attrs[FLOORS] = {k: v for k, v in floors.items() if math.isfinite(v)}
    if diverged:
        attrs[DIVERGED] = True
    if stop is not None:
        attrs[PRUNED_BY] = {"rule": stop.rule, "message": stop.message, **stop.values}
    write_attrs(trial, attrs)


def write_checkpoint(trial: optuna.Trial, epoch: int) -> None:
    """Record that the trial's run holds a checkpoint of ``epoch``."""
    trial.set_user_attr(CHECKPOINT, epoch)


def resumable(trial: FrozenTrial) -> bool:
    """Whether a queued trial continues an earlier run from its checkpoint."""
    return bool(trial.user_attrs.get(RUN_ID)) and trial.user_attrs.get(CHECKPOINT) is not None


def write_error(trial: optuna.Trial, message: str) -> None:
    """Record why a trial failed."""
    trial.set_user_attr(ERROR, message)


# --------------------------------------------------------------------------------------
# Worker events
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TrialStarted:
    """A worker took a trial and starts training it."""

    trial: int
    label: str
    epochs: int
    pid: int


@dataclass(frozen=True)
class EpochEnded:
    """A trial finished an epoch; ``value`` is its objective metric at that epoch."""

    trial: int
    epoch: int
    metric: str
    value: float


@dataclass(frozen=True)
class TrialEnded:
    """A trial ended: COMPLETE, PRUNED or FAIL, with the reason and its objective's last value."""

    trial: int
    label: str
    state: str
    reason: str
    value: float | None


@dataclass(frozen=True)
class Note:
    """Something a worker says once (how it plans arrays, a model that cannot be fused)."""

    message: str


@dataclass(frozen=True)
class WorkerFailed:
    """A worker process stopped on a user's mistake (the message is shown as the command's error)."""

    message: str


Event = TrialStarted | EpochEnded | TrialEnded | Note | WorkerFailed


def export(study: optuna.Study, kind: str) -> str:
    """Every trial with its state, parameters, value and user attributes, as CSV or JSON."""
    records = []
    for t in study.get_trials(deepcopy=False):
        rec: dict[str, Any] = {
            "number": t.number, "state": t.state.name, "value": t.value,
            "datetime_start": t.datetime_start.isoformat() if t.datetime_start else None,
            "datetime_complete": t.datetime_complete.isoformat() if t.datetime_complete else None,
        }
        rec["note"] = TrialRecord.of(t).note
        rec.update({f"params_{k}": v for k, v in t.params.items()})
        for k, v in t.user_attrs.items():
            if isinstance(v, dict):
                rec.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                rec[k] = v
        records.append(rec)
    if kind == "json":
        return json.dumps(records, indent=2, default=str) + "\n"
    import csv
    import io

    columns = list(dict.fromkeys(k for r in records for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns)
    w.writeheader()
    for r in records:
        w.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in r.items()})
    return buf.getvalue()
