"""Every study is an Optuna study: a suite enqueues its (experiment, seed) trials, a search samples.

The resolved spec is kept in the study's user attributes, so a worker can join knowing only the
study name and the storage URL. The trial budget is a queue: each trial a study still owes is a
WAITING trial (a suite's with its experiment and seed, a search's with no parameters yet, for
the sampler to fill when a worker takes it). Workers take trials from the queue, so no two
workers run the same trial and the budget is never exceeded.
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState
from pydantic import ValidationError
from sqlalchemy import event
from sqlalchemy.engine import Engine

from ablate.errors import AblateError
from ablate.specs import (
    DEFAULT_HEARTBEAT_SECONDS,
    DEFAULT_MAX_RETRY,
    ParamSpec,
    RunSpec,
    SearchSpec,
    StudySpec,
    SuiteSpec,
    better,
    mask_url,
    resolve_storage,
    spec_document,
    study_from_dict,
    study_name,
)

SPEC_ATTR = "ablate.spec"
SPEC_NAME_ATTR = "ablate.spec_name"
CREATED_ATTR = "ablate.created"
PARENT_RUN_ATTR = "ablate.mlflow_parent_run_id"
EXPERIMENT_ATTR = "ablate.mlflow_experiment"
SKIPPED_ATTR = "ablate.skipped"
QUEUED_ATTR = "ablate.queued"

COUNTED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
"""Trial states that use up a study's budget (a FAIL is run again on the next invocation)."""

optuna.logging.set_verbosity(optuna.logging.ERROR)  # trial failures are shown by ablate itself
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


def open_storage(
    url: str | None = None,
    *,
    heartbeat_seconds: int | None = DEFAULT_HEARTBEAT_SECONDS,
    max_retry: int = DEFAULT_MAX_RETRY,
    on_stale: Callable[[FrozenTrial], None] | None = None,
) -> RDBStorage:
    """Optuna's RDB storage with heartbeats: a dead worker's trial is failed and re-queued.

    ``on_stale`` is called with each trial failed for a lost heartbeat, before it is re-queued.
    """
    retry = RetryHeartbeatStaleTrialCallback(max_retry=max_retry)

    def stale(study: optuna.Study, trial: FrozenTrial) -> None:
        if on_stale is not None:
            on_stale(trial)
        retry(study, trial)

    url = resolve_storage(url)
    engine_kwargs: dict[str, Any] = (
        {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    )
    try:
        storage = RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_seconds,
            grace_period=None if heartbeat_seconds is None else 3 * heartbeat_seconds,
            heartbeat_stale_trial_callback=stale,
        )
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
    if url.startswith("sqlite"):
        _serialize_sqlite(storage.engine)
    return storage


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


def sampler_for(spec: StudySpec) -> optuna.samplers.BaseSampler:
    """Seeded TPE (or random) for searches; suites never sample (their trials are enqueued)."""
    if isinstance(spec, SuiteSpec) or spec.sampler.type == "random":
        seed = 0 if isinstance(spec, SuiteSpec) else spec.sampler.seed
        return optuna.samplers.RandomSampler(seed=seed)
    s = spec.sampler
    return optuna.samplers.TPESampler(
        seed=s.seed,
        n_startup_trials=s.n_startup_trials,
        multivariate=s.multivariate,
        constant_liar=True,
    )


def pruner_for(spec: StudySpec) -> optuna.pruners.BasePruner:
    """Median pruning with warm-up for searches (as configured); never for suites."""
    if isinstance(spec, SuiteSpec) or spec.pruner.type == "none":
        return optuna.pruners.NopPruner()
    p = spec.pruner
    return optuna.pruners.MedianPruner(
        n_startup_trials=p.n_startup_trials,
        n_warmup_steps=p.n_warmup_steps,
        interval_steps=1,  # trials report only every p.interval_steps epochs (see worker)
        n_min_trials=1,
    )


def direction_of(spec: StudySpec) -> str:
    """The study's optimisation direction."""
    if isinstance(spec, SuiteSpec):
        return better(spec.metric)
    return spec.goal


def create_or_load(spec: StudySpec, storage: RDBStorage, n_trials: int | None = None) -> optuna.Study:
    """The study for a spec (created on first use) with its queue topped up to the budget."""
    name = study_name(spec)
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=name,
            sampler=sampler_for(spec),
            pruner=pruner_for(spec),
            direction=direction_of(spec),  # type: ignore[arg-type]
            load_if_exists=True,
        )
    except Exception as e:
        raise AblateError(f"cannot create study {name!r}: {mask_url(str(e)).splitlines()[0]}") from None
    if SPEC_ATTR not in study.user_attrs:
        study.set_user_attr(SPEC_NAME_ATTR, spec.name)
        study.set_user_attr(CREATED_ATTR, time.time())
    if study.user_attrs.get(SPEC_ATTR) != spec_document(spec):  # new, or more seeds, a new budget
        study.set_user_attr(SPEC_ATTR, spec_document(spec))
    fill_queue(study, spec, n_trials)
    return study


def fill_queue(study: optuna.Study, spec: StudySpec, n_trials: int | None = None) -> int:
    """Enqueue the trials the study still owes; returns how many were added."""
    trials = study.get_trials(deepcopy=False)
    if isinstance(spec, SuiteSpec):
        have = {
            (t.params.get("experiment") or _fixed(t).get("experiment"),
             t.params.get("seed", _fixed(t).get("seed")))
            for t in trials
            if t.state in COUNTED and not t.user_attrs.get(SKIPPED_ATTR)
        }
        added = 0
        for exp in spec.experiments:
            for seed in spec.seeds:
                if (exp, seed) not in have:
                    study.enqueue_trial(
                        {"experiment": exp, "seed": seed}, user_attrs={QUEUED_ATTR: True}
                    )
                    added += 1
        return added
    budget = n_trials if n_trials is not None else spec.n_trials
    used = sum(1 for t in trials if t.state in COUNTED and not t.user_attrs.get(SKIPPED_ATTR))
    for _ in range(max(0, budget - used)):
        study.enqueue_trial({}, user_attrs={QUEUED_ATTR: True})
    return max(0, budget - used)


def _fixed(t: FrozenTrial) -> dict[str, Any]:
    fixed = t.system_attrs.get("fixed_params")
    return fixed if isinstance(fixed, dict) else {}


def is_queued(trial: optuna.Trial | FrozenTrial) -> bool:
    """True for a trial taken from the study's queue (as opposed to one past its budget)."""
    return bool(trial.user_attrs.get(QUEUED_ATTR))


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
    summaries = optuna.get_all_study_summaries(storage=storage, include_best_trial=False)
    exact = [s for s in summaries if s.study_name == name]
    if not exact:
        exact = sorted(
            (s for s in summaries if s.user_attrs.get(SPEC_NAME_ATTR) == name),
            key=lambda s: s.user_attrs.get(CREATED_ATTR, 0.0),
        )[-1:]
    if not exact:
        known = ", ".join(s.study_name for s in summaries) or "none"
        raise AblateError(
            f"no study {name!r} in storage {mask_url(storage.url)} (studies: {known}); "
            "start it with `ablate run-suite` or `ablate tune`, or pass the right --storage"
        )
    summary = exact[0]
    if SPEC_ATTR not in summary.user_attrs:
        raise AblateError(f"study {summary.study_name!r} was not created by ablate (no spec kept)")
    spec = study_from_dict(summary.user_attrs[SPEC_ATTR], source=f"study {summary.study_name}")
    study = optuna.load_study(
        study_name=summary.study_name,
        storage=storage,
        sampler=sampler_for(spec),
        pruner=pruner_for(spec),
    )
    return StudyRef(study, spec)


def list_studies(storage: RDBStorage) -> list[dict[str, Any]]:
    """One summary per ablate study in the storage, oldest first."""
    out = []
    for s in optuna.get_all_study_summaries(storage=storage, include_best_trial=False):
        if SPEC_ATTR not in s.user_attrs:
            continue
        doc = s.user_attrs[SPEC_ATTR]
        out.append({
            "name": s.study_name,
            "spec": s.user_attrs.get(SPEC_NAME_ATTR, ""),
            "kind": doc.get("kind", "?"),
            "trials": s.n_trials,
            "created": s.user_attrs.get(CREATED_ATTR, 0.0),
        })
    return sorted(out, key=lambda r: r["created"])


def counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state name (skipped trials left out)."""
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        if not t.user_attrs.get(SKIPPED_ATTR):
            out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


# --------------------------------------------------------------------------------------
# From a trial to a RunSpec
# --------------------------------------------------------------------------------------


def suggest(trial: optuna.Trial, spec: StudySpec) -> tuple[RunSpec, dict[str, Any], str]:
    """The RunSpec of a trial, the values to record on it, and a short label for displays."""
    if isinstance(spec, SuiteSpec):
        exp = trial.suggest_categorical("experiment", list(spec.experiments))
        seed = trial.suggest_int("seed", 0, 2**31 - 1)  # a fixed range: the seed list may grow
        return spec.run(str(exp), int(seed)), {"experiment": exp, "seed": seed}, f"{exp} s{seed}"
    values: dict[str, Any] = {}
    for key, p in spec.params.items():
        values.update(_suggest_one(trial, key, p))
    run = apply_values(spec.base, values)
    if spec.lr_scaling.rule != "none" and "lr" not in values:
        scaled = spec.lr_scaling.scale(run.lr, run.batch_size)
        run = run.model_copy(update={"lr": scaled})
        values["lr"] = scaled
    label = " ".join(f"{k}={_short(v)}" for k, v in values.items())
    return run, values, label


def _suggest_one(trial: optuna.Trial, key: str, p: ParamSpec) -> dict[str, Any]:
    if p.type == "float":
        assert p.low is not None and p.high is not None
        return {key: trial.suggest_float(key, p.low, p.high, log=p.log, step=p.step)}
    if p.type == "int":
        assert p.low is not None and p.high is not None
        step = int(p.step) if p.step else 1
        return {key: trial.suggest_int(key, int(p.low), int(p.high), log=p.log, step=step)}
    if p.type == "categorical":
        assert p.choices is not None
        return {key: trial.suggest_categorical(key, p.choices)}
    assert p.names is not None
    u = [trial.suggest_float(f"{key}.u{i}", 0.0, 1.0) for i in range(len(p.names) - 1)]
    return dict(zip(p.names, simplex_point(u), strict=True))


def simplex_point(u: list[float]) -> list[float]:
    """Map k-1 numbers in [0, 1] onto the closed k-simplex (stick-breaking).

    Uniform u gives points uniform on the simplex, the map reaches every point (corners and
    edges included: u_i = 0 or 1), and the weights always sum to 1.
    """
    k = len(u) + 1
    weights = []
    left = 1.0
    for i, ui in enumerate(u):
        share = 1.0 - (1.0 - ui) ** (1.0 / (k - 1 - i))
        w = left * share
        weights.append(w)
        left -= w
    weights.append(max(0.0, left))
    return weights


def corner_runs(spec: SearchSpec) -> list[tuple[str, RunSpec]]:
    """The base run and the runs at each parameter's extremes (every choice, low and high, each
    corner of a simplex), to check before a search starts that every trial can run."""
    out = [("base", spec.base)]
    for key, p in spec.params.items():
        if p.type == "categorical":
            points: list[dict[str, Any]] = [{key: c} for c in p.choices or []]
        elif p.type == "simplex":
            names = p.names or []
            points = [{n: float(n == corner) for n in names} for corner in names]
        else:
            assert p.low is not None and p.high is not None
            cast = int if p.type == "int" else float
            points = [{key: cast(p.low)}, {key: cast(p.high)}]
        for values in points:
            label = f"params.{key}=" + ",".join(f"{k}={v}" for k, v in values.items())
            try:
                out.append((label, apply_values(spec.base, values)))
            except ValidationError as e:
                err = e.errors()[0]
                raise AblateError(f"{spec.name}: {label}: {err['msg']}") from None
    return out


def apply_values(run: RunSpec, values: dict[str, Any]) -> RunSpec:
    """A RunSpec with dotted-key values set (``model.dropout``), validated again."""
    doc = run.model_dump(mode="json")
    for key, value in values.items():
        node = doc
        parts = key.split(".")
        for part in parts[:-1]:
            node = node[part]
        node[parts[-1]] = value
    return RunSpec.model_validate(doc)


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def spec_of(study: optuna.Study) -> StudySpec:
    """The spec kept in a study."""
    return study_from_dict(study.user_attrs[SPEC_ATTR], source=f"study {study.study_name}")


def dumps(obj: Any) -> str:
    """Compact JSON for user attributes and tags."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


def confirmation_suite(study: optuna.Study, spec: SearchSpec, k: int) -> SuiteSpec:
    """A suite that re-trains a search's top-k configurations with the search's fresh seeds."""
    finished = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                if t.value is not None]
    if not finished:
        raise AblateError(f"study {study.study_name!r} has no complete trial to confirm")
    finished.sort(key=lambda t: float(t.value or 0.0), reverse=spec.goal == "maximize")
    experiments = {
        f"trial{t.number}": apply_values(spec.base, dict(t.user_attrs.get("values", {})))
        for t in finished[:k]
    }
    return SuiteSpec(
        name=f"{spec.name}-confirm",
        description=f"The top {len(experiments)} configurations of {study.study_name}, "
        f"re-trained with seeds {spec.confirm_seeds} that the search never saw.",
        metric=spec.objective,
        seeds=list(spec.confirm_seeds),
        experiments=experiments,
    )
