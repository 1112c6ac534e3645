"""Per-epoch metrics sent in batches, and written straight into a SQL store's own tables.

In a SQLite or PostgreSQL store the metric rows go into MLflow's own tables in one multi-row
INSERT (its SQLAlchemy models, inside its managed session), with the run's latest values upserted
as MLflow keeps them: the same rows ``log_batch`` writes, at a tenth of the cost per row, because
MLflow's ORM path builds and flushes one object per value. Anything unusual (a run not active, a row
already stored, another store) goes through ``log_batch``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol


class MetricWriter(Protocol):
    """What a batch writes through (a ``client.Tracker``)."""

    def write_metrics(self, run_id: str, metrics: Sequence[Any]) -> None:
        """Store metric rows of one run."""


class MetricBatch:
    """Per-epoch metrics for one run, sent in batches at most every ``flush_seconds``.

    With ``background=True`` a batch is written by one background thread while training goes
    on (in order; ``close`` waits for all of them and raises the first error); the runs of an
    array share one such thread by passing it as ``background``.
    """

    def __init__(self, tracker: MetricWriter, run_id: str, flush_seconds: float = 2.0,
                 background: bool | ThreadPoolExecutor = False):
        self.tracker = tracker
        self.run_id = run_id
        self.flush_seconds = flush_seconds
        self._pending: list[Any] = []
        self._last = time.monotonic()
        self.nonfinite: dict[str, int] = {}
        self._own = background is True
        self._writer = (background if isinstance(background, ThreadPoolExecutor) else
                        ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlflow-metrics") if background else None)
        self._sent: list[Future[None]] = []

    def add(self, metrics: Mapping[str, float], step: int) -> list[str]:
        """Queue one step's finite metrics; returns the non-finite keys (never sent)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        skipped = []
        for key, value in metrics.items():
            v = float(value)
            if math.isfinite(v):
                self._pending.append(Metric(key, v, now, step))
            else:
                skipped.append(key)
                self.nonfinite.setdefault(key, step)
        if time.monotonic() - self._last >= self.flush_seconds:
            self.flush()
        return skipped

    def flush(self) -> None:
        """Send everything queued (in the background thread, if there is one)."""
        pending, self._pending = self._pending, []
        self._last = time.monotonic()
        if not pending:
            return
        if self._writer is None:
            self._send(pending)
        else:
            self._sent = [f for f in self._sent if not f.done() or f.exception() is not None]
            self._sent.append(self._writer.submit(self._send, pending))

    def _send(self, metrics: list[Any]) -> None:
        self.tracker.write_metrics(self.run_id, metrics)

    def close(self) -> None:
        """Send what is queued and wait until everything has been written."""
        self.flush()
        if self._writer is not None:
            try:
                for f in self._sent:
                    f.result()
            finally:
                if self._own:
                    self._writer.shutdown(wait=True)
                self._sent = []


_UPSERT_DIALECTS = ("sqlite", "postgresql")


def sql_store(client: Any) -> Any | None:
    """MLflow's SQLAlchemy store behind a client when its database takes our upsert (SQLite, PostgreSQL), else None."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        if isinstance(store, SqlAlchemyStore) and store.engine.dialect.name in _UPSERT_DIALECTS:
            return store
    except Exception:  # an MLflow that keeps its store elsewhere: log_batch for every row
        pass
    return None


def insert_metrics(store: Any, run_id: str, metrics: Sequence[Any]) -> bool:
    """Insert finite metric rows of an active run into MLflow's ``metrics`` table and keep ``latest_metrics``
    as MLflow does (a key's row is replaced by a strictly later (step, timestamp, value)); all or nothing.

    Returns False, having written nothing, where ``log_batch`` must decide: a non-finite value, a run
    that is not active or not there, or a row already stored (MLflow skips those).
    """
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun

    if not metrics or not all(math.isfinite(m.value) for m in metrics):
        return not metrics
    rows: list[dict[str, Any]] = []
    latest: dict[str, dict[str, Any]] = {}
    for m in metrics:
        row = {"key": m.key, "value": float(m.value), "timestamp": int(m.timestamp), "step": int(m.step),
               "is_nan": False, "run_uuid": run_id}
        rows.append(row)
        old = latest.get(m.key)
        if old is None or (row["step"], row["timestamp"], row["value"]) > (old["step"], old["timestamp"], old["value"]):
            latest[m.key] = row
    from sqlalchemy.dialects import postgresql, sqlite

    table = SqlLatestMetric.__table__
    dialect = sqlite if store.engine.dialect.name == "sqlite" else postgresql
    insert: Any = dialect.insert(table)
    new = insert.excluded
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c.key, table.c.run_uuid],
        set_={"value": new.value, "timestamp": new.timestamp, "step": new.step, "is_nan": new.is_nan},
        where=sa.tuple_(new.step, new.timestamp, new.value) > sa.tuple_(table.c.step, table.c.timestamp, table.c.value),
    )
    try:
        with store.ManagedSessionMaker(read_only=False) as session:
            stage = session.execute(sa.select(SqlRun.lifecycle_stage).where(SqlRun.run_uuid == run_id)).scalar()
            if stage != "active":
                return False
            session.execute(sa.insert(SqlMetric.__table__), rows)
            session.execute(upsert, [latest[k] for k in sorted(latest)])  # one lock order for every writer
    except Exception as e:
        if isinstance(e.__cause__, sa.exc.IntegrityError) or isinstance(e, sa.exc.IntegrityError):
            return False  # rolled back; MLflow skips the rows it already has
        raise
    return True
