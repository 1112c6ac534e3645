"""The vocabulary: study files (TOML) and CLI overrides become validated specs. Defaults live here only."""

from __future__ import annotations

import copy
import difflib
import hashlib
import json
import os
import re
import sysconfig
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablate.errors import AblateError

# --------------------------------------------------------------------------------------
# Stores and names
# --------------------------------------------------------------------------------------

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
"""MLflow's store: a SQLite file in the working directory (MLFLOW_TRACKING_URI overrides it)."""

DEFAULT_STORAGE = "sqlite:///optuna.db"
"""Optuna's store: a separate SQLite file (MLflow and Optuna both own an alembic_version table)."""

STORAGE_ENV = "ABLATE_STORAGE"
DEFAULT_EXPERIMENT = "ablate"
DEFAULT_HEARTBEAT_SECONDS = 20
DEFAULT_MAX_RETRY = 2

LossName = Literal["mse", "cosine", "infonce", "combined", "multistage", "supcon"]
LOSS_NAMES: tuple[str, ...] = ("mse", "cosine", "infonce", "combined", "multistage", "supcon")
CONTRASTIVE_LOSSES = frozenset({"infonce", "combined", "supcon", "multistage"})

MetricKey = Literal[
    "train/loss",
    "train/inbatch_top1",
    "val/loss",
    "val/cosine",
    "val/top1",
    "val/top5",
    "val/top10",
    "val/mrr",
    "val/median_rank",
]
METRIC_KEYS: tuple[str, ...] = MetricKey.__args__  # type: ignore[attr-defined]
LOWER_IS_BETTER = frozenset({"train/loss", "val/loss", "val/median_rank"})

SUMMARY_METRICS: tuple[str, ...] = ("val/cosine", "val/top1", "val/top5", "val/top10", "val/mrr")
"""The metrics a suite compares across experiments (final and best epoch)."""


def better(key: str) -> Literal["maximize", "minimize"]:
    """Whether a larger or a smaller value of a metric is better."""
    return "minimize" if key in LOWER_IS_BETTER else "maximize"


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The MLflow tracking URI: the flag, else MLFLOW_TRACKING_URI, else ./mlflow.db."""
    return _absolute_sqlite(uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI)


def resolve_storage(url: str | None = None) -> str:
    """The Optuna storage URL: the flag, else ABLATE_STORAGE, else ./optuna.db."""
    return _absolute_sqlite(url or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE)


def _absolute_sqlite(url: str) -> str:
    """sqlite:///relative.db -> sqlite:////abs/path/relative.db (a store is one file, wherever we are)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(Path(url[len(prefix):]).resolve())
    return url


_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/?#@\s]*:)[^@\s]+(?=@)")
_PASSWORD_PARAM = re.compile(r"(?P<head>[?&]password=)[^&\s]+", re.IGNORECASE)


def mask_url(text: str) -> str:
    """Replace the password of every URL in a text with *** (user:password@ and ?password=)."""
    return _PASSWORD_PARAM.sub(r"\g<head>***", _PASSWORD.sub(r"\g<head>***", text))


# --------------------------------------------------------------------------------------
# Run specs
# --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[float, Field(gt=0, lt=1)]


class ModelSpec(_Strict):
    """The model: the built-in projection head, or a user factory "package.module:callable"."""

    factory: str = "mlp"
    hidden: list[Annotated[int, Field(gt=0)]] = [256]
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    kwargs: dict[str, Any] = {}

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str) -> str:
        if v != "mlp" and not re.fullmatch(r"[\w.]+:[\w.]+", v):
            raise ValueError(f"must be 'mlp' or an import path 'package.module:factory', got {v!r}")
        return v


class SyntheticSpec(_Strict):
    """Sizes and difficulty of the built-in synthetic benchmark (see ablate.data.synthetic_pairs)."""

    n_ligands: Annotated[int, Field(ge=8)] = 400
    n_families: Annotated[int, Field(ge=1)] = 60
    pocket_dim: Annotated[int, Field(ge=1)] = 64
    ligand_dim: Annotated[int, Field(ge=2)] = 128
    latent_dim: Annotated[int, Field(ge=2)] = 16
    family_spread: NonNegativeFloat = 0.25
    multi_pocket_fraction: Annotated[float, Field(ge=0, le=1)] = 0.3
    max_pockets_per_ligand: Annotated[int, Field(ge=1)] = 4
    pocket_noise: NonNegativeFloat = 1.0
    norm_spread: NonNegativeFloat = 0.6


class DataSpec(_Strict):
    """Where the pairs come from and how they are split into train and validation."""

    source: str = "synthetic"
    val_fraction: Fraction = 0.2
    split: Literal["ligand", "random"] = "ligand"
    seed: int = 0
    synthetic: SyntheticSpec = SyntheticSpec()


class RunSpec(_Strict):
    """Everything one training run needs; `ablate train` flags and study files fill it."""

    loss: LossName = "mse"
    temperature: PositiveFloat = 0.07
    learnable_temperature: bool = False
    symmetric: bool = True
    mask_shared_ligands: bool = True
    alpha: NonNegativeFloat = 0.5
    beta: NonNegativeFloat = 0.3
    gamma: NonNegativeFloat = 0.2
    supcon_threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    stage1_epochs: Annotated[int, Field(ge=0)] = 50
    stage2_epochs: Annotated[int, Field(ge=0)] = 100
    stage3_start: Annotated[int, Field(ge=0)] | None = None
    stage_lrs: tuple[PositiveFloat, PositiveFloat, PositiveFloat] = (1e-3, 5e-4, 1e-4)
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 0.01
    batch_size: Annotated[int, Field(ge=2)] = 32
    accumulation_steps: Annotated[int, Field(ge=1)] = 1
    epochs: Annotated[int, Field(ge=1)] = 300
    warmup_epochs: Annotated[int, Field(ge=0)] = 0
    lr_schedule: Literal["constant", "cosine"] = "constant"
    grad_clip: PositiveFloat | None = None
    seed: int = 0
    device: str = "auto"
    amp: bool | None = None
    select_metric: MetricKey = "val/mrr"
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        if self.loss in ("combined", "multistage") and self.alpha + self.beta + self.gamma <= 0:
            raise ValueError("alpha, beta and gamma are all zero; give at least one a positive weight")
        if self.loss == "multistage" and self.stage3 < self.stage1_epochs:
            raise ValueError(
                f"stage3_start ({self.stage3_start}) is before the end of stage 1 "
                f"({self.stage1_epochs}); it must be at least stage1_epochs"
            )
        if self.loss == "multistage" and self.stage1_epochs >= self.epochs:
            raise ValueError(
                f"the run has {self.epochs} epochs but the MSE warm-up alone takes "
                f"{self.stage1_epochs}; lower stage1_epochs or raise epochs"
            )
        return self

    @property
    def stage3(self) -> int:
        """The first epoch (0-based) of the multi-stage fine-tuning stage."""
        if self.stage3_start is not None:
            return self.stage3_start
        return self.stage1_epochs + self.stage2_epochs

    @property
    def effective_batch_size(self) -> int:
        """Pairs per optimizer step: the batch size times the accumulation steps."""
        return self.batch_size * self.accumulation_steps

    def loss_params(self) -> dict[str, Any]:
        """The keyword arguments of ablate.losses.build_loss for this spec's loss."""
        if self.loss == "infonce":
            return {"temperature": self.temperature, "symmetric": self.symmetric,
                    "learnable": self.learnable_temperature}
        if self.loss == "combined":
            return {"alpha": self.alpha, "beta": self.beta, "gamma": self.gamma,
                    "temperature": self.temperature, "symmetric": self.symmetric,
                    "learnable": self.learnable_temperature}
        if self.loss == "supcon":
            return {"temperature": self.temperature, "threshold": self.supcon_threshold}
        if self.loss == "multistage":
            return {"stage1_epochs": self.stage1_epochs, "stage2_epochs": self.stage2_epochs,
                    "stage3_start": self.stage3_start, "lrs": self.stage_lrs,
                    "temperature": self.temperature, "alpha": self.alpha, "beta": self.beta,
                    "gamma": self.gamma, "symmetric": self.symmetric,
                    "learnable": self.learnable_temperature}
        return {}

    def flat(self) -> dict[str, Any]:
        """All fields as one flat dict with dotted keys (for MLflow params)."""
        return _flatten(self.model_dump(mode="json"))


RUN_FIELDS = frozenset(RunSpec.model_fields)


# --------------------------------------------------------------------------------------
# Study specs
# --------------------------------------------------------------------------------------


class ClaimSpec(_Strict):
    """A predicted gain over the baseline, in percent, that the suite's report checks."""

    metric: MetricKey
    low: float
    high: float
    source: str = ""

    @model_validator(mode="after")
    def _ordered(self) -> ClaimSpec:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self


class SuiteSpec(_Strict):
    """An ablation: named experiments (each a RunSpec) trained over the same seeds."""

    kind: Literal["suite"] = "suite"
    name: str
    description: str = ""
    metric: MetricKey = "val/top1"
    baseline: str = ""
    seeds: list[Annotated[int, Field(ge=0, lt=2**31)]] = Field(default=[0, 1, 2], min_length=1)
    experiments: dict[str, RunSpec]
    claims: dict[str, ClaimSpec] = {}

    @model_validator(mode="after")
    def _check(self) -> SuiteSpec:
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
    def baseline_name(self) -> str:
        """The experiment every other one is compared against (the first one by default)."""
        return self.baseline or next(iter(self.experiments))

    def run(self, experiment: str, seed: int) -> RunSpec:
        """The resolved RunSpec of one (experiment, seed) trial."""
        return self.experiments[experiment].model_copy(update={"seed": seed})

    def trial_count(self) -> int:
        """How many trials the suite has: experiments times seeds."""
        return len(self.experiments) * len(self.seeds)


class ParamSpec(_Strict):
    """One searched parameter: a float or int range, a set of choices, or weights on a simplex."""

    type: Literal["float", "int", "categorical", "simplex"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: list[Any] | None = None
    names: list[str] | None = None

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        if self.type in ("float", "int"):
            if self.low is None or self.high is None:
                raise ValueError(f"a {self.type} parameter needs low and high")
            if not self.low < self.high:
                raise ValueError(f"low ({self.low}) must be below high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError(f"a log-scale range needs low > 0, got {self.low}")
            if self.log and self.step is not None:
                raise ValueError("a parameter cannot have both log = true and a step")
        elif self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
        elif not self.names or len(self.names) < 2:
            raise ValueError("a simplex parameter needs names = [at least two run fields]")
        return self


class SamplerSpec(_Strict):
    """Optuna's sampler: seeded TPE by default."""

    type: Literal["tpe", "random"] = "tpe"
    seed: int = 0
    n_startup_trials: Annotated[int, Field(ge=0)] = 8
    multivariate: bool = True


class PrunerSpec(_Strict):
    """Optuna's pruner on the objective metric: median with warm-up by default.

    Trials report to Optuna, and are checked, every ``interval_steps`` epochs (each report and
    check is a round trip to the storage); the stability rules run after every epoch.
    """

    type: Literal["median", "none"] = "median"
    n_startup_trials: Annotated[int, Field(ge=0)] = 5
    n_warmup_steps: Annotated[int, Field(ge=0)] = 10
    interval_steps: Annotated[int, Field(ge=1)] = 5


class StabilitySpec(_Strict):
    """Rules that stop a run as unstable; a rule set to none is off."""

    enabled: bool = True
    max_loss: PositiveFloat | None = 50.0
    growth_factor: Annotated[float, Field(gt=1)] | None = 2.0
    growth_patience: Annotated[int, Field(ge=1)] = 3
    max_grad_norm: PositiveFloat | None = 1000.0
    min_spread: Annotated[float, Field(ge=0, lt=1)] | None = 0.05
    grace_epochs: Annotated[int, Field(ge=0)] = 2


class LrScalingSpec(_Strict):
    """How the learning rate follows the batch size: lr * (batch / reference) ** power."""

    rule: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: Annotated[int, Field(ge=1)] = 32

    def scale(self, lr: float, batch_size: int) -> float:
        """The learning rate for a batch size under this rule."""
        power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[self.rule]
        return lr * (batch_size / self.reference_batch_size) ** power


class SearchSpec(_Strict):
    """A hyper-parameter search: a base run, the searched parameters and how to judge trials."""

    kind: Literal["search"] = "search"
    name: str
    description: str = ""
    base: RunSpec
    params: dict[str, ParamSpec]
    objective: MetricKey = "val/mrr"
    objective_at: Literal["best", "final"] = "best"
    direction: Literal["maximize", "minimize"] | None = None
    n_trials: Annotated[int, Field(ge=1)] = 30
    sampler: SamplerSpec = SamplerSpec()
    pruner: PrunerSpec = PrunerSpec()
    stability: StabilitySpec = StabilitySpec()
    lr_scaling: LrScalingSpec = LrScalingSpec()
    confirm_seeds: list[int] = Field(default=[1000, 1001, 1002], min_length=2)

    @model_validator(mode="after")
    def _check(self) -> SearchSpec:
        if not self.params:
            raise ValueError("a search needs at least one parameter under [params.NAME]")
        for key, p in self.params.items():
            targets = p.names if p.type == "simplex" else [key]
            for t in targets or []:
                if t.split(".")[0] not in RUN_FIELDS:
                    raise ValueError(
                        f"params.{key}: {t!r} is not a run field; valid fields: "
                        f"{', '.join(sorted(RUN_FIELDS))}"
                    )
        return self

    @property
    def goal(self) -> Literal["maximize", "minimize"]:
        """The optimisation direction (given, or implied by the objective metric)."""
        return self.direction or better(self.objective)


StudySpec = SuiteSpec | SearchSpec


# --------------------------------------------------------------------------------------
# Loading study files
# --------------------------------------------------------------------------------------

STUDY_DIRS = (
    Path("studies"),  # the working directory's own
    Path(__file__).resolve().parent.parent / "studies",  # a source checkout (editable install)
    Path(sysconfig.get_path("data")) / "share" / "ablate" / "studies",  # installed from a wheel
)


def available_studies() -> list[Path]:
    """The study files found in ./studies, in a source checkout and where a wheel installed them."""
    seen: dict[str, Path] = {}
    for d in STUDY_DIRS:
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                seen.setdefault(p.stem, p)
    return list(seen.values())


def find_study(name: str) -> Path:
    """The file of a study given by path or by name (studies/NAME.toml)."""
    p = Path(name)
    if p.suffix == ".toml" or os.sep in name:
        if not p.is_file():
            raise AblateError(f"{name}: no such study file")
        return p
    for d in STUDY_DIRS:
        if (d / f"{name}.toml").is_file():
            return d / f"{name}.toml"
    names = [f.stem for f in available_studies()]
    hint = difflib.get_close_matches(name, names, n=1)
    raise AblateError(
        f"no study named {name!r}"
        + (f"; did you mean {hint[0]!r}?" if hint else "")
        + f" Available: {', '.join(names) or 'none'} (or give a path to a .toml file)"
    )


def parse_value(text: str) -> Any:
    """A CLI value as TOML (numbers, booleans, lists, quoted strings), else the plain string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['a.b=1', 'loss=infonce'] -> {'a.b': 1, 'loss': 'infonce'}; a malformed item is an error."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AblateError(f"--set {item!r}: expected KEY=VALUE, e.g. --set lr=5e-4")
        out[key.strip()] = parse_value(value.strip())
    return out


def _set_path(doc: dict[str, Any], dotted: str, value: Any) -> None:
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise AblateError(f"--set {dotted}: {part!r} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(doc: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """A copy of a study document with --set overrides applied.

    A key that names a run field (``lr``, ``model.hidden``) applies to every run of the study:
    it is set in [base] and removed from the experiments that set it themselves. Any other key
    is a dotted path into the document (``experiments.infonce.temperature``, ``n_trials``).
    """
    doc = copy.deepcopy(doc)
    for key, value in overrides.items():
        head = key.split(".")[0]
        top_level = set(SuiteSpec.model_fields) | set(SearchSpec.model_fields)
        if head in RUN_FIELDS and head not in top_level:
            _set_path(doc.setdefault("base", {}), key, value)
            for exp in doc.get("experiments", {}).values():
                if isinstance(exp, dict):
                    _drop_path(exp, key)
            if key in doc.get("params", {}):
                del doc["params"][key]
        else:
            parts = key.split(".")
            experiments = doc.get("experiments")
            if head == "experiments" and len(parts) > 1 and isinstance(experiments, dict) \
                    and parts[1] not in experiments:
                hint = difflib.get_close_matches(parts[1], list(experiments), n=1)
                raise AblateError(
                    f"--set {key}: no experiment {parts[1]!r}"
                    + (f"; did you mean {hint[0]!r}?" if hint else "")
                    + f" (the study has: {', '.join(experiments)})"
                )
            _set_path(doc, key, value)
    return doc


def _drop_path(doc: dict[str, Any], dotted: str) -> None:
    parts = dotted.split(".")
    node: Any = doc
    for part in parts[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(parts[-1], None)


def scale_epochs(doc: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A copy of a study document where every run trains `epochs` epochs.

    Multi-stage boundaries keep their proportions: 50/100 of 300 epochs become 10/20 of 60.
    """
    doc = copy.deepcopy(doc)
    base = doc.setdefault("base", {})
    runs = [base] + [e for e in doc.get("experiments", {}).values() if isinstance(e, dict)]
    base_epochs = base.get("epochs", RunSpec.model_fields["epochs"].default)
    for run in runs:
        old = run.get("epochs", base_epochs)
        merged = {**base, **run}
        if merged.get("loss") == "multistage" and isinstance(old, int) and old > 0:
            for key in ("stage1_epochs", "stage2_epochs", "stage3_start"):
                value = merged.get(key, RunSpec.model_fields[key].default)
                if value:  # a stage of 0 epochs stays 0
                    run[key] = max(1, round(value * epochs / old))
        run.pop("epochs", None)
    base["epochs"] = epochs
    return doc


def load_study(
    name: str, overrides: dict[str, Any] | None = None, *, epochs: int | None = None
) -> StudySpec:
    """Read studies/NAME.toml (or a path), apply overrides, and validate it."""
    path = find_study(name)
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise AblateError(f"{path}: not valid TOML ({e})") from None
    if epochs is not None:
        doc = scale_epochs(doc, epochs)
    doc = apply_overrides(doc, overrides or {})
    doc.setdefault("name", path.stem)
    return study_from_dict(doc, source=str(path))


def study_from_dict(doc: dict[str, Any], *, source: str = "<spec>") -> StudySpec:
    """Validate a study document (as read from TOML, or as kept in an Optuna study)."""
    kind = doc.get("kind")
    if kind not in ("suite", "search"):
        raise AblateError(f"{source}: kind must be 'suite' or 'search', got {kind!r}")
    if kind == "suite":
        base = doc.get("base", {})
        _validate(RunSpec, base, source, "base")
        experiments = doc.get("experiments")
        if not isinstance(experiments, dict) or not experiments:
            raise AblateError(f"{source}: a suite needs at least one [experiments.NAME] table")
        resolved = {}
        for exp_name, exp in experiments.items():
            if not isinstance(exp, dict):
                raise AblateError(f"{source}: experiments.{exp_name} must be a table")
            resolved[exp_name] = _validate(
                RunSpec, _deep_merge(base, exp), source, f"experiments.{exp_name}", own=exp
            )
        rest = {k: v for k, v in doc.items() if k not in ("base", "experiments")}
        return _validate(SuiteSpec, {**rest, "experiments": resolved}, source, "")
    base_run = _validate(RunSpec, doc.get("base", {}), source, "base")
    return _validate(SearchSpec, {**doc, "base": base_run}, source, "")


_M = TypeVar("_M", bound=BaseModel)


def _deep_merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _validate(
    model: type[_M], data: Any, source: str, prefix: str, own: dict[str, Any] | None = None
) -> _M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise AblateError(_explain(e, model, source, prefix, own)) from None


def _explain(
    e: ValidationError, model: type[BaseModel], source: str, prefix: str,
    own: dict[str, Any] | None,
) -> str:
    where, msg = _describe(e, model, prefix, own)
    return f"{source}: {where + ': ' if where else ''}{msg}"


def _describe(
    e: ValidationError, model: type[BaseModel], prefix: str, own: dict[str, Any] | None,
) -> tuple[str, str]:
    """(the dotted key, what is wrong with it) of a validation error; the key is '' for a model-level check."""
    err = e.errors()[0]
    loc = [str(x) for x in err["loc"]]
    if own is not None and loc and loc[0] not in own:
        prefix = "base"
    if not loc:  # a model-level check
        return prefix, _clean(err["msg"])
    where = ".".join(p for p in [prefix, *loc] if p)
    if err["type"] == "extra_forbidden":
        parent: type[BaseModel] | None = model
        for part in loc[:-1]:
            field = parent.model_fields.get(part) if parent is not None else None
            ann = field.annotation if field is not None else None
            parent = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        valid = sorted(parent.model_fields) if parent is not None else []
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        msg = f"unknown key {loc[-1]!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        if valid:
            msg += f" Valid keys: {', '.join(valid)}"
        return where, msg
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return where, f"{_clean(err['msg'])}{shown}"


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


# --------------------------------------------------------------------------------------
# Identity of a study
# --------------------------------------------------------------------------------------


def spec_document(spec: StudySpec) -> dict[str, Any]:
    """The resolved spec as a JSON-able dict (kept in the Optuna study, logged to MLflow)."""
    return spec.model_dump(mode="json")


def spec_hash(spec: StudySpec) -> str:
    """A short hash of what decides a study's trials.

    Left out: a search's trial budget, and a suite's seeds and report settings. So more seeds or
    a larger budget extend the same study, and a changed run setting starts a new one.
    """
    doc = spec_document(spec)
    doc.pop("description", None)
    if doc["kind"] == "search":
        doc.pop("n_trials", None)
    else:
        for key in ("seeds", "baseline", "claims"):
            doc.pop(key, None)
    blob = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def study_name(spec: StudySpec) -> str:
    """The Optuna study name: the spec's name and the hash of its resolved settings."""
    return f"{spec.name}-{spec_hash(spec)}"


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out



def run_from_options(options: dict[str, Any], flags: dict[str, str] | None = None) -> RunSpec:
    """A RunSpec from command-line options (None means: keep the default); errors name the option.

    ``flags`` maps a field (dotted for nested ones) to the flag that set it (``epochs`` ->
    ``--num-epochs``); an error in any other field is named as ``--set field``.
    """
    doc: dict[str, Any] = {}
    for key, value in options.items():
        if value is not None:
            _set_path(doc, key, value)
    try:
        return RunSpec.model_validate(doc)
    except ValidationError as e:
        where, msg = _describe(e, RunSpec, "", None)
        if not where:
            raise AblateError(msg) from None
        raise AblateError(f"{(flags or {}).get(where, f'--set {where}')}: {msg}") from None
