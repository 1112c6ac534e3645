"""Study designs: an ablation suite or a hyper-parameter search, behind one small interface
(``ablate.study.interface``). A third kind of study is one more class here and one more entry in ``KINDS``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator

from ablate import losses
from ablate.errors import AblateError
from ablate.specs import (
    RUN_FIELDS,
    SHAPING_FIELDS,
    RunSpec,
    StabilitySpec,
    _Strict,
    apply_values,
    loss_fields,
    validate,
)
from ablate.study.interface import NAME_RULE, Assignment, Direction, StudyDesign, valid_study_name
from ablate.study.space import LrScalingSpec, ParamSpec, PrunerSpec, SamplerSpec, field_kind
from ablate.vocabulary import METRIC_KEYS, MetricKey, ReportKey, better, is_test, on_split

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# --------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------


class ClaimSpec(_Strict):
    """A predicted gain over the baseline, in percent, that the suite's report checks."""

    metric: ReportKey
    low: float
    high: float
    source: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> ClaimSpec:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SuiteSpec(StudyDesign):
    """An ablation: named experiments (each a RunSpec) trained over the same seeds."""

    kind: Literal["suite"] = "suite"
    objective: ReportKey = Field("test/top1", validation_alias=AliasChoices("objective", "metric"))
    """The headline: a test metric is read at each run's validation-selected epoch, any other at the last epoch."""
    baseline: str = ""
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default=[0, 1, 2], min_length=1)
    experiments: dict[str, RunSpec]
    claims: dict[str, ClaimSpec] = Field(default_factory=dict)
    test: Literal["t", "wilcoxon"] = "t"
    """The paired test against the baseline: the paired t-test, or the Wilcoxon signed-rank test."""

    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset(
        {"description", "seeds", "baseline", "claims", "objective", "test"})

    @model_validator(mode="after")
    def _check(self) -> SuiteSpec:
        for name, run in self.experiments.items():
            if not valid_study_name(name):
                raise ValueError(f"experiments.{name}: an experiment name is {NAME_RULE} (it names MLflow "
                                 "runs and metric keys); rename the table")
            _check_model(run, f"experiments.{name}")
        for name in self.claims:
            if name not in self.experiments:
                raise ValueError(
                    f"claims.{name}: no such experiment; choose one of {', '.join(self.experiments)}"
                )
        if not self.experiments:
            raise ValueError("a suite needs at least one experiment under [experiments.NAME]")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        if self.baseline and self.baseline not in self.experiments:
            raise ValueError(
                f"baseline {self.baseline!r} is not an experiment; choose one of "
                f"{', '.join(self.experiments)}"
            )
        return self

    @property
    def judged_at(self) -> Literal["best", "final"]:
        """A test headline is read at each run's selected epoch (its test metrics are there), others at the last."""
        return "best" if is_test(self.objective) else "final"

    @property
    def baseline_name(self) -> str:
        """The experiment every other one is compared against (the first one by default)."""
        return self.baseline or next(iter(self.experiments))

    def run(self, experiment: str, seed: int) -> RunSpec:
        """The resolved RunSpec of one (experiment, seed) trial."""
        return self.experiments[experiment].model_copy(update={"seed": seed})

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """Suites never sample: their trials are queued with every parameter fixed."""
        import optuna

        return optuna.samplers.RandomSampler(seed=0)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """Suites never prune: every (experiment, seed) trains to the end."""
        import optuna

        return optuna.pruners.NopPruner()

    def owed(self, counted: Sequence[FrozenTrial], budget: int | None = None) -> list[dict[str, Any]]:
        """Every (experiment, seed) pair without a counted trial."""
        have = {_experiment_seed(t) for t in counted}
        return [{"experiment": e, "seed": s} for e in self.experiments for s in self.seeds
                if (e, s) not in have]

    def trial_count(self, budget: int | None = None) -> int:
        """Experiments times seeds."""
        return len(self.experiments) * len(self.seeds)

    def suggest(self, trial: optuna.Trial) -> Assignment:
        """The (experiment, seed) fixed in the queue."""
        exp = str(trial.suggest_categorical("experiment", list(self.experiments)))
        seed = int(trial.suggest_int("seed", 0, 2**31 - 1))  # a fixed range: the seed list may grow
        return Assignment(self.run(exp, seed), {"experiment": exp, "seed": seed}, f"{exp} s{seed}")

    def preflight_runs(self) -> list[tuple[str, RunSpec]]:
        """Every experiment (a seed changes nothing that can fail)."""
        return list(self.experiments.items())

    def run_name(self, number: int, label: str) -> str:
        """'experiment sSEED': unique within the suite."""
        return label

    def shape_of(self, trial: FrozenTrial) -> RunSpec | None:
        """The queued (experiment, seed)'s run."""
        exp, seed = _experiment_seed(trial)
        return self.run(exp, seed) if exp in self.experiments and isinstance(seed, int) else None

    def missing(self, finished: Sequence[FrozenTrial]) -> list[str]:
        """The (experiment, seed) pairs without a finished trial, as 'experiment sSEED'."""
        done = {_experiment_seed(t) for t in finished}
        return [f"{e} s{s}" for e in self.experiments for s in self.seeds if (e, s) not in done]


def _experiment_seed(t: FrozenTrial) -> tuple[Any, Any]:
    fixed = t.system_attrs.get("fixed_params")
    fixed = fixed if isinstance(fixed, dict) else {}
    return (t.params.get("experiment", fixed.get("experiment")), t.params.get("seed", fixed.get("seed")))


# --------------------------------------------------------------------------------------
# Searches
# --------------------------------------------------------------------------------------


class SearchSpec(StudyDesign):
    """A hyper-parameter search: a base run, the searched parameters and how to judge trials."""

    kind: Literal["search"] = "search"
    base: RunSpec
    params: dict[str, ParamSpec]
    objective: MetricKey = "val/mrr"
    """What the search optimises: a validation metric (each trial's epoch is selected by it too), never a test one."""
    objective_at: Literal["best", "final"] = "best"
    direction: Direction | None = None
    n_trials: Annotated[int, Field(ge=1)] = 30
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    stability: StabilitySpec = StabilitySpec()
    lr_scaling: LrScalingSpec = LrScalingSpec()
    confirm_seeds: list[int] = Field(default=[1000, 1001, 1002], min_length=2)

    REPORT_ONLY: ClassVar[frozenset[str]] = frozenset({"description", "n_trials"})

    @field_validator("objective", mode="before")
    @classmethod
    def _not_test(cls, v: Any) -> Any:
        if isinstance(v, str) and is_test(v):
            raise ValueError(
                f"a search's objective cannot be a test metric ({v}): it chooses trials, and a test number that "
                f"chooses is no longer an estimate on unseen pairs; optimise {on_split(v, 'val')} and read {v} "
                "in the best trial's and --confirm's reports")
        return v

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if not self.params:
            raise ValueError("a search needs at least one parameter under [params.NAME]")
        _check_model(self.base, "base")
        searched: dict[str, str] = {}
        for key, p in self.params.items():
            targets = p.names if p.targets else [key]
            if p.type == "division":
                _check_division(key, p.names or [], self.base)
            for t in targets or []:
                if t.split(".")[0] not in RUN_FIELDS and t not in loss_fields(self.base.loss):
                    own = [f for f in loss_fields(self.base.loss) if f not in RUN_FIELDS]
                    raise ValueError(
                        f"params.{key}: {t!r} is not a run field; valid fields: "
                        f"{', '.join(sorted(RUN_FIELDS - {'loss_args'}) + own)}"
                    )
                if t in searched:
                    raise ValueError(f"params.{key}: {t!r} is already searched by params.{searched[t]}; "
                                     "search each run field with one parameter")
                searched[t] = key
                if t.startswith("model.kwargs") and self.base.model.factory == "mlp":
                    raise ValueError(f"params.{key}: {t} is an argument of a model factory, but the base run "
                                     'uses the built-in head (model.factory = "mlp"), which takes none')
                kind = field_kind(t)
                if p.type in ("float", "simplex") and kind in ("int", "bool"):
                    raise ValueError(
                        f"params.{key}: {t} takes {'whole numbers' if kind == 'int' else 'true or false'}, "
                        f"but a {p.type} parameter draws fractions; use "
                        + ('type = "int"' if kind == "int" else 'type = "categorical"')
                        + (" or a simplex of float fields only" if p.type == "simplex" else ""))
        return self

    @property
    def goal(self) -> Direction:
        """The optimisation direction (given, or implied by the objective metric)."""
        return self.direction or better(self.objective)

    @property
    def judged_at(self) -> Literal["best", "final"]:
        """The objective at each trial's best epoch (early stopping) or at its last one."""
        return self.objective_at

    @property
    def searches(self) -> bool:
        """A search samples its space."""
        return True

    @property
    def report_interval(self) -> int | None:
        """Every ``pruner.interval_steps`` epochs (also with pruning off: ``studies show`` reads them)."""
        return self.pruner.interval_steps

    @property
    def stability_rules(self) -> StabilitySpec | None:
        """The search's stability rules."""
        return self.stability

    def make_sampler(self) -> optuna.samplers.BaseSampler:
        """TPE (constant liar, so parallel workers spread out) or random sampling, seeded per trial.

        Each trial's sampler is seeded by (sampler.seed, trial number): see ``ablate.study.sampling``.
        """
        import optuna

        from ablate.study.sampling import TrialSeededSampler

        s = self.sampler

        def make(seed: int) -> optuna.samplers.BaseSampler:
            if s.type == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials,
                                              multivariate=s.multivariate, constant_liar=True)

        return TrialSeededSampler(make, s.seed, self.space())

    def space(self) -> dict[str, optuna.distributions.BaseDistribution]:
        """Every sampled name and its Optuna distribution."""
        out = {}
        for key, p in self.params.items():
            out.update(p.distributions(key))
        return out

    def space_size(self) -> int | None:
        """How many configurations the space has (None: infinitely many)."""
        from ablate.study.sampling import finite_size

        return finite_size(self.space())

    def make_pruner(self) -> optuna.pruners.BasePruner:
        """Median pruning with warm-up (as configured), or none."""
        import optuna

        p = self.pruner
        if p.type == "none":
            return optuna.pruners.NopPruner()
        return optuna.pruners.MedianPruner(
            n_startup_trials=p.n_startup_trials,
            n_warmup_steps=p.n_warmup_steps,
            interval_steps=1,  # trials report only every p.interval_steps epochs (see the worker)
            n_min_trials=1,
        )

    def owed(self, counted: Sequence[FrozenTrial], budget: int | None = None) -> list[dict[str, Any]]:
        """Empty trials (for the sampler to fill) up to the budget."""
        return [{} for _ in range(max(0, self.trial_count(budget) - len(counted)))]

    def trial_count(self, budget: int | None = None) -> int:
        """The trial budget (the flag's, else the file's), capped at the size of a finite space."""
        wanted = budget if budget is not None else self.n_trials
        size = self.space_size()
        return wanted if size is None else min(wanted, size)

    def suggest(self, trial: optuna.Trial) -> Assignment:
        """Sample every parameter; the learning rate follows the batch size if a rule says so."""
        values: dict[str, Any] = {}
        for key, p in self.params.items():
            values.update(p.suggest(trial, key, self.base.epochs))
        run = apply_values(self.base, values)
        if self.lr_scaling.rule != "none" and "lr" not in values:
            scaled = self.lr_scaling.scale(run.lr, run.batch_size)
            run = run.model_copy(update={"lr": scaled})
            values["lr"] = scaled
        label = " ".join(f"{k}={_short(v)}" for k, v in values.items())
        return Assignment(run, values, label)

    def shape_of(self, trial: FrozenTrial) -> RunSpec | None:
        """The base run, unless a searched parameter changes what shapes the computation."""
        for key, p in self.params.items():
            for target in (p.names if p.targets else [key]) or []:
                if target.split(".")[0] in SHAPING_FIELDS:
                    return None
        return self.base

    def preflight_runs(self) -> list[tuple[str, RunSpec]]:
        """The base run and the runs at each parameter's extremes."""
        out = [("base", self.base)]
        for key, p in self.params.items():
            for values in p.extremes(key, self.base.epochs):
                label = f"params.{key}=" + ",".join(f"{k}={v}" for k, v in values.items())
                try:
                    out.append((label, apply_values(self.base, values)))
                except ValidationError as e:
                    raise AblateError(f"{self.name}: {label}: {e.errors()[0]['msg'].removeprefix('Value error, ')}"
                                      ) from None
        return out

    def confirmation(self, ranked: Sequence[tuple[int, dict[str, Any]]], study_name: str) -> SuiteSpec:
        """A suite that re-trains ranked configurations ((trial number, values), best first) with fresh seeds."""
        experiments = {f"trial{number}": apply_values(self.base, dict(values)) for number, values in ranked}
        return SuiteSpec(
            name=f"{self.name}-confirm",
            description=f"The top {len(experiments)} configurations of {study_name} (ranked by {self.objective}), "
            f"re-trained with seeds {self.confirm_seeds} that the search never saw and scored on the test split.",
            objective=on_split(self.objective, "test"),
            seeds=list(self.confirm_seeds),
            experiments=experiments,
        )


def _check_division(key: str, names: list[str], base: RunSpec) -> None:
    """A division splits the base loss's stages: its names are the loss's epoch fields, in order, and the base run
    sets none of the loss's other epoch fields (the division decides them)."""
    fields = losses.resolve(base.loss).epoch_fields
    if not fields:
        raise ValueError(f"params.{key}: a division splits a loss's stages, but the base loss {base.loss!r} has none "
                         "(use loss = \"multistage\")")
    if names != [f for f in fields if f in names]:
        raise ValueError(f"params.{key}: names must be the base loss's stage lengths, in order, from "
                         f"{', '.join(fields)}; got {', '.join(names)}")
    decided = [f for f in fields if f not in names and getattr(base, f, None) is not None]
    if decided:
        raise ValueError(f"params.{key}: the base run sets {', '.join(decided)}, which the division decides; "
                         "remove it from [base]")


def _check_model(run: RunSpec, where: str) -> None:
    """The built-in head takes no keyword arguments (a user factory's are checked when it is called)."""
    if run.model.factory == "mlp" and run.model.kwargs:
        raise ValueError(
            f"{where}.model.kwargs: the built-in head (model.factory = \"mlp\") takes no keyword arguments, got "
            f"{', '.join(map(repr, run.model.kwargs))}; set its shape with model.hidden and model.dropout, or give "
            "model.factory = \"package.module:factory\" for a model that takes them")


def _short(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# --------------------------------------------------------------------------------------
# From a document to a design
# --------------------------------------------------------------------------------------

StudySpec = SuiteSpec | SearchSpec


def _suite_from_document(doc: dict[str, Any], source: str) -> SuiteSpec:
    base = doc.get("base", {})
    if not isinstance(base, dict):
        raise AblateError(f"{source}: base must be a table, got {type(base).__name__}")
    experiments = doc.get("experiments")
    for exp in experiments.values() if isinstance(experiments, dict) else []:
        with contextlib.suppress(AblateError):  # every loss the suite names is known before its runs are validated
            losses.resolve(_deep_merge(base, exp).get("loss", "mse") if isinstance(exp, dict) else "mse")
    validate(RunSpec, base, source, "base")
    if not isinstance(experiments, dict) or not experiments:
        raise AblateError(f"{source}: a suite needs at least one [experiments.NAME] table")
    resolved = {}
    for exp_name, exp in experiments.items():
        if not isinstance(exp, dict):
            raise AblateError(f"{source}: experiments.{exp_name} must be a table")
        resolved[exp_name] = validate(RunSpec, _deep_merge(base, exp), source, f"experiments.{exp_name}", own=exp)
    rest = {k: v for k, v in doc.items() if k not in ("base", "experiments")}
    return validate(SuiteSpec, {**rest, "experiments": resolved}, source)


def _search_from_document(doc: dict[str, Any], source: str) -> SearchSpec:
    base = doc.get("base", {})
    if not isinstance(base, dict):
        raise AblateError(f"{source}: base must be a table, got {type(base).__name__}")
    objective = doc.get("objective", SearchSpec.model_fields["objective"].default)
    if isinstance(objective, str) and objective in METRIC_KEYS:
        base = {"select_metric": objective, **base}  # each trial's epoch is selected by what the search optimises
    return validate(SearchSpec, {**doc, "base": validate(RunSpec, base, source, "base")}, source)


KINDS: dict[str, Callable[[dict[str, Any], str], StudySpec]] = {
    "suite": _suite_from_document, "search": _search_from_document,
}
"""Each kind of study and how its document (a study file, or the copy kept in the study) is validated."""


def from_document(doc: dict[str, Any], *, source: str = "<spec>") -> StudySpec:
    """Validate a study document (as read from TOML, or as kept in an Optuna study)."""
    kind = doc.get("kind")
    if kind == "roadmap":
        raise AblateError(f"{source}: a roadmap plan, not a study; run it with `ablate roadmap --plan {source}`")
    if kind not in KINDS:
        raise AblateError(f"{source}: kind must be one of {', '.join(map(repr, KINDS))}, got {kind!r}")
    return KINDS[kind](doc, source)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out
