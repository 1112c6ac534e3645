"""Every study is an Optuna study in an RDB storage; this module opens the storage and the studies in it.

The resolved spec is kept in the study's user attributes, so a worker can join knowing only the
study name and the storage URL. The trial budget is a queue: each trial a study still owes is a
WAITING trial (a suite's with its experiment and seed, a search's with no parameters yet, for
the sampler to fill when a worker takes it). Workers take trials from the queue, so no two
workers run the same trial and the budget is never exceeded.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy import event
from sqlalchemy.engine import Engine

from ablate.errors import AblateError
from ablate.stores import DEFAULT_HEARTBEAT_SECONDS, DEFAULT_MAX_RETRY, mask_url, resolve_storage
from ablate.study import records
from ablate.study.designs import StudySpec, from_document
from ablate.study.studyfiles import spec_document, study_name

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
"""Trial states that use up a study's budget (a FAIL is run again on the next invocation)."""
OPEN = (TrialState.WAITING, TrialState.RUNNING)
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial failures are shown by ablate itself
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(
    url: str | None = None,
    *,
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    max_retry: int = DEFAULT_MAX_RETRY,
    on_stale: Callable[[FrozenTrial], None] | None = None,
    read_only: bool = False,
) -> RDBStorage:
    """Optuna's RDB storage with heartbeats: a dead worker's trial is failed and re-queued.

    ``on_stale`` is called with each trial failed for a lost heartbeat, before it is re-queued. A ``read_only``
    SQLite storage (a file this process cannot write) is only read: its transactions take no write lock.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        try:
            if on_stale is not None:
                on_stale(trial)
        finally:  # the trial is re-queued even when its MLflow run cannot be ended
            retry(study, trial)

    url = resolve_storage(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    try:
        for attempt in range(_CREATE_ATTEMPTS):
            try:
                storage = RDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=heartbeat_seconds,
                    grace_period=None if heartbeat_seconds is None else 3 * heartbeat_seconds,
                    heartbeat_stale_trial_callback=stale,
                )
                break
            except Exception as e:  # another process creating the same new store: open it once that one is done
                if attempt == _CREATE_ATTEMPTS - 1 or not _creating_concurrently(e):
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ImportError as e:
        raise AblateError(
            f"cannot open the Optuna storage {mask_url(url)}: its database driver is not installed "
            f"({e}); for PostgreSQL: pip install 'ablate[postgres]'"
        ) from None
    except Exception as e:
        first = mask_url(str(e)).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AblateError(
            f"cannot open the Optuna storage {mask_url(url)}: {first}; check the URL and that "
            "the database server is running"
        ) from None
    if url.startswith("sqlite") and not read_only:
        _serialize_sqlite(storage.engine)
    return storage


_CREATE_ATTEMPTS = 5


def _creating_concurrently(error: Exception) -> bool:
    """Whether opening a store failed because another process was creating its schema at the same moment."""
    text = str(error)
    return "alembic_version" in text or ("already exists" in text and "table" in text)


def _serialize_sqlite(engine: Engine) -> None:
    """Make every SQLite transaction take the write lock when it begins (BEGIN IMMEDIATE).

    Python's sqlite3 driver begins a transaction only at the first write, so a transaction's reads
    are not isolated from other processes: two workers could both read a queued trial as WAITING
    and both mark it RUNNING. (PostgreSQL's SELECT ... FOR UPDATE prevents that; SQLite ignores
    it.) Serialising transactions makes taking a trial atomic; other processes wait on the
    connection's busy timeout meanwhile.
    """

    @event.listens_for(engine, "connect")
    def _no_driver_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # the driver's own implicit BEGIN is off

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while the storage was set up did not have the hooks


# --------------------------------------------------------------------------------------
# Creating, loading and filling studies
# --------------------------------------------------------------------------------------


def create_or_load(spec: StudySpec, storage: RDBStorage, budget: int | None = None) -> optuna.Study:
    """The study for a spec (created on first use) with its queue topped up to the budget."""
    name = study_name(spec)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=spec.make_sampler(),
            pruner=spec.make_pruner(),
            direction=spec.goal,
            load_if_exists=True,
        )
    except Exception as e:
        raise AblateError(f"cannot create study {name!r}: {mask_url(str(e)).splitlines()[0]}") from None
    if records.SPEC not in study.user_attrs:
        study.set_user_attr(records.SPEC_NAME, spec.name)
        study.set_user_attr(records.CREATED, time.time())
    if study.metric_names != [spec.objective]:  # optuna-dashboard and Optuna's plots name the value by it
        study.set_metric_names([spec.objective])
    document = spec_document(spec)
    if study.user_attrs.get(records.SPEC) != document:  # new, or more seeds, a new budget
        study.set_user_attr(records.SPEC, document)
    fill_queue(study, spec, budget)
    return study


def owes_work(spec: StudySpec, storage: RDBStorage, budget: int | None = None) -> bool:
    """Whether a spec's study is new, or has trials waiting, running or still to queue."""
    try:
        storage.get_study_id_from_name(study_name(spec))
    except KeyError:
        return True
    study = optuna.load_study(study_name=study_name(spec), storage=storage)
    if any(t.state in OPEN for t in study.get_trials(deepcopy=False)):
        return True
    return bool(spec.owed(counted(study), budget))


def counted(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that use up the study's budget (not failed, not skipped)."""
    return [t for t in study.get_trials(deepcopy=False, states=COUNTED) if not t.user_attrs.get(records.SKIPPED)]


def fill_queue(study: optuna.Study, spec: StudySpec, budget: int | None = None) -> int:
    """Enqueue the trials the study still owes; returns how many were added.

    A failed trial whose run holds a checkpoint is continued rather than started again: a queued
    trial with its parameters takes over its MLflow run (and, for a search, one of the empty slots).
    An interrupted trial without one is trained again with its parameters (a search's draw is kept,
    so an interrupted search goes on as it would have); workers take these first.
    """
    trials = study.get_trials(deepcopy=False)
    owed = spec.owed(counted(study), budget)
    retry = optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number
    taken = {t.user_attrs.get(records.RESUMES) for t in trials} | {retry(t) for t in trials}
    failed = [t for t in trials if t.state == TrialState.FAIL and t.number not in taken
              and (records.resumable(t) or t.user_attrs.get(records.ERROR) == records.INTERRUPTED)]
    failed.sort(key=lambda t: (not records.resumable(t), -t.number))  # a checkpoint first, then the newest
    for params in owed:
        match = next((t for t in failed if t.params and (not params or _same(params, t.params))), None)
        if match is not None:
            failed.remove(match)
            _continue(study, match)
        else:
            study.enqueue_trial(params, user_attrs={records.QUEUED: True})
    return len(owed)


def _continue(study: optuna.Study, failed: FrozenTrial) -> None:
    """Queue a trial that continues a failed or interrupted one: its parameters and, where it has one, its MLflow run
    and checkpoint."""
    attrs: dict[str, Any] = {records.QUEUED: True, records.RESUMES: failed.number}
    if records.resumable(failed):
        attrs.update({records.RUN_ID: failed.user_attrs[records.RUN_ID],
                      records.CHECKPOINT: failed.user_attrs[records.CHECKPOINT]})
    study.enqueue_trial(dict(failed.params), user_attrs=attrs)


@contextmanager
def heartbeats(storage: RDBStorage, study: optuna.Study, trials: Sequence[optuna.Trial], seconds: int | None
               ) -> Iterator[None]:
    """Record the trials' heartbeats every ``seconds`` while they run (nothing when heartbeats are off).

    Once per grace period (3 heartbeats) the same thread also fails other workers' stale trials (which
    re-queues them), so a dead worker's trial is retried while every live worker is busy training.
    """
    if not seconds:
        yield
        return
    grace = storage.grace_period or 2 * seconds  # as Optuna decides a trial is stale
    ids = [t._trial_id for t in trials]
    stop = threading.Event()

    def beat() -> None:
        checked = time.monotonic()
        while True:
            for trial_id in ids:
                storage.record_heartbeat(trial_id)
            if time.monotonic() - checked >= grace:
                checked = time.monotonic()
                with suppress(Exception):  # a storage hiccup: the next check (or a worker between trials) does it
                    optuna.storages.fail_stale_trials(study)
            if stop.wait(seconds):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trials[0].number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


TAKE_WINDOW = 256
"""How many queued trials a worker reads to form an array (the first this many, or ``--array`` if larger)."""


def waiting(storage: RDBStorage, study: optuna.Study, study_id: int, limit: int) -> list[FrozenTrial]:
    """The first ``limit`` queued (WAITING) trials: continuations of interrupted trials first, then by number.

    One query however long the queue is, so taking a trial costs the same in a study of 10 trials as in one of
    10,000 (``Study.get_trials`` would read every queued trial, with all its attributes, for each trial taken).
    """

    def order(t: FrozenTrial) -> tuple[bool, int]:
        return t.user_attrs.get(records.RESUMES) is None, t.number

    build = getattr(storage, "_build_frozen_trial_from_trial_model", None)
    if build is None:  # an Optuna without it: read the whole queue
        return sorted(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)), key=order)[:limit]
    import sqlalchemy as sa
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from sqlalchemy import orm

    trial, attr = models.TrialModel, models.TrialUserAttributeModel
    continuation = sa.exists().where(attr.trial_id == trial.trial_id, attr.key == records.RESUMES)
    with _create_scoped_session(storage.scoped_session) as session:
        found = (
            session.query(trial)
            .options(*(orm.selectinload(r) for r in (trial.params, trial.values, trial.user_attributes,
                                                      trial.system_attributes, trial.intermediate_values)))
            .filter(trial.study_id == study_id, trial.state == TrialState.WAITING)
            .order_by(sa.case((continuation, 0), else_=1), trial.number)
            .limit(limit)
            .all()
        )
        return [build(t) for t in found]


def queued(storage: RDBStorage, study_id: int) -> int:
    """How many trials wait in the study's queue (one count, without reading them)."""
    import sqlalchemy as sa
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session

    trial = models.TrialModel
    with _create_scoped_session(storage.scoped_session) as session:
        return int(session.execute(sa.select(sa.func.count()).select_from(trial).where(
            trial.study_id == study_id, trial.state == TrialState.WAITING)).scalar_one())


def give_back(storage: RDBStorage, trials: Sequence[optuna.Trial]) -> None:
    """Put trials taken but not started back in the queue (WAITING), keeping their numbers and any parameters drawn:
    an interruption while taking them changes nothing about what the study trains."""
    for t in trials:
        storage.set_trial_state_values(t._trial_id, state=TrialState.WAITING)


def continue_stopped(study: optuna.Study, numbers: Sequence[int]) -> int:
    """Queue, at once, a continuation of each running trial among ``numbers`` that an interruption is about to fail
    (SIGTERM from a scheduler's time limit or ``scancel``, Ctrl-C): its parameters and its last checkpoint, so any
    worker, here or on another machine, goes on with it. Queued before the trials fail, so that no other worker
    ever finds the study with nothing waiting or running and stops. Returns how many were queued."""
    trials = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number in set(numbers)]
    for t in trials:
        if t.params:
            _continue(study, t)
    return sum(1 for t in trials if t.params)


def _same(fixed: dict[str, Any], params: dict[str, Any]) -> bool:
    return all(params.get(k) == v for k, v in fixed.items())


@dataclass(frozen=True)
class StudyRef:
    """A study found in a storage, with its spec."""

    study: optuna.Study
    spec: StudySpec

    @property
    def name(self) -> str:
        """The Optuna study name."""
        return self.study.study_name


def load(name: str, storage: RDBStorage) -> StudyRef:
    """A study by its full name, or the newest study made from the spec called ``name``."""
    summaries = storage.get_all_studies()  # names and attributes only (a summary would read every trial)
    exact = [s for s in summaries if s.study_name == name]
    if not exact:
        exact = sorted(
            (s for s in summaries if s.user_attrs.get(records.SPEC_NAME) == name),
            key=lambda s: s.user_attrs.get(records.CREATED, 0.0),
        )[-1:]
    if not exact:
        known = ", ".join(s.study_name for s in summaries) or "none"
        raise AblateError(
            f"no study {name!r} in storage {mask_url(storage.url)} (studies: {known}); "
            "start it with `ablate run-suite` or `ablate tune`, or pass the right --storage"
        )
    summary = exact[0]
    if records.SPEC not in summary.user_attrs:
        raise AblateError(f"study {summary.study_name!r} was not created by ablate (no spec kept)")
    spec = from_document(summary.user_attrs[records.SPEC], source=f"study {summary.study_name}")
    return attach(summary.study_name, spec, storage)


def attach(name: str, spec: StudySpec, storage: RDBStorage) -> StudyRef:
    """An existing study of a known spec, with the spec's sampler and pruner."""
    study = optuna.load_study(study_name=name, storage=storage, sampler=spec.make_sampler(),
                              pruner=spec.make_pruner())
    return StudyRef(study, spec)


def list_studies(storage: RDBStorage) -> list[dict[str, Any]]:
    """One summary per ablate study in the storage, oldest first: trials finished, owed and failed."""
    out = []
    for s in storage.get_all_studies():
        if records.SPEC not in s.user_attrs:
            continue
        doc = s.user_attrs[records.SPEC]
        trials = storage.get_all_trials(storage.get_study_id_from_name(s.study_name), deepcopy=False)
        kept = [t for t in trials if not t.user_attrs.get(records.SKIPPED)]
        out.append({
            "name": s.study_name,
            "spec": s.user_attrs.get(records.SPEC_NAME, ""),
            "kind": doc.get("kind", "?"),
            "finished": sum(t.state in FINISHED for t in kept),
            "owed": sum(t.state in COUNTED and bool(t.user_attrs.get(records.QUEUED)) for t in kept),
            "failed": sum(t.state == TrialState.FAIL for t in kept),
            "created": s.user_attrs.get(records.CREATED, 0.0),
        })
    return sorted(out, key=lambda r: r["created"])


def predates_test_split(study: optuna.Study) -> bool:
    """Whether a study's stored spec comes from before test splits (its runs' data have no test_fraction): its
    finished trials trained on train + validation pairs cut two ways."""
    doc = study.user_attrs.get(records.SPEC) or {}
    runs = [doc.get("base"), *(doc.get("experiments") or {}).values()]
    return any(isinstance(r, dict) and isinstance(r.get("data"), dict) and "test_fraction" not in r["data"]
               for r in runs)


def counts(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> dict[str, int]:
    """Trials by state name (skipped trials left out), of the study's ``trials`` when already read."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False) if trials is None else trials:
        if not t.user_attrs.get(records.SKIPPED):
            out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


def span_ms(study: optuna.Study) -> tuple[int | None, int | None]:
    """The study's own time span, in ms since the epoch, for its MLflow parent run: from its first trial's
    start (else its creation) to the completion of its last finished trial; None where not known."""
    trials = [t for t in study.get_trials(deepcopy=False) if not t.user_attrs.get(records.SKIPPED)]
    starts = [t.datetime_start.timestamp() for t in trials if t.datetime_start is not None]
    ends = [t.datetime_complete.timestamp() for t in trials if t.datetime_complete is not None]
    start = min(starts) if starts else study.user_attrs.get(records.CREATED)
    return (round(start * 1000) if start else None), (round(max(ends) * 1000) if ends else None)
