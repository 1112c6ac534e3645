"""The validated specs of a training run; every default lives here (the metric keys: ``ablate.vocabulary``).

A study file, ``ablate train``'s flags and ``--set`` all end up in a ``RunSpec``; the study kinds
that hold runs are in ``ablate.study.designs``. A mistake in any spec becomes one ``AblateError`` that names
the source, the dotted key and what is wrong (``validate``).
"""

from __future__ import annotations

import difflib
import json
import re
import types
import typing
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ablate import losses
from ablate.errors import AblateError
from ablate.vocabulary import MetricKey

DEFAULT_EXPERIMENT = "ablate"
"""The MLflow experiment of ``ablate train`` runs."""

# --------------------------------------------------------------------------------------
# Run specs
# --------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)

    @model_validator(mode="before")
    @classmethod
    def _booleans_are_not_numbers(cls, data: Any) -> Any:
        """``epochs = true`` would pass as 1 (pydantic's lax mode): a boolean where a number belongs is refused."""
        if isinstance(data, dict):
            for name, field in cls.model_fields.items():
                value = data.get(name)
                if _bool_for_number(field.annotation, value):
                    shown = json.dumps(value)
                    what = "holds a boolean" if isinstance(value, (list, tuple)) else "is a boolean"
                    raise ValueError(f"{name}: {shown} {what} where a number belongs; write a number")
        return data


def _bool_for_number(annotation: Any, value: Any) -> bool:
    """Whether ``value`` (or an item of a list of them) is a bool given for an int or float of ``annotation``."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        arms = [a for a in args if a is not type(None)]
        return not any(a is bool for a in arms) and any(_bool_for_number(a, value) for a in arms)
    if isinstance(value, bool):
        return annotation in (int, float)
    if isinstance(value, (list, tuple)) and origin in (list, tuple) and args:
        items = args if origin is tuple and len(args) == len(value) and Ellipsis not in args else [args[0]] * len(value)
        return any(_bool_for_number(a, v) for a, v in zip(items, value, strict=True))
    return False


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
    """Sizes and difficulty of the built-in synthetic benchmark (see ablate.training.data.synthetic_pairs)."""

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
    """Where the pairs come from and how they are split into train, validation and test.

    A data file with a ``split`` array keeps its own split (the fractions and ``split`` are then
    unused); ``test_source`` scores on another file's pairs instead of a test split of ``source``.
    """

    source: str = "synthetic"
    val_fraction: Fraction = 0.2
    test_fraction: Fraction = 0.2
    split: Literal["ligand", "pocket", "random"] = "ligand"
    seed: int = 0
    test_source: str | None = None
    synthetic: SyntheticSpec = SyntheticSpec()

    @model_validator(mode="after")
    def _room_to_train(self) -> DataSpec:
        if self.test_source is None and self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                f"val_fraction ({self.val_fraction}) and test_fraction ({self.test_fraction}) leave no pairs to "
                "train on; their sum must be below 1")
        return self


class RunSpec(_Strict):
    """Everything one training run needs; `ablate train` flags and study files fill it."""

    loss: str = "mse"
    """A built-in loss (``ablate.losses``), "path/file.py:Class", "package.module:Class" or an entry point."""
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
    patience: Annotated[int, Field(ge=1)] | None = None
    model: ModelSpec = ModelSpec()
    data: DataSpec = DataSpec()
    loss_args: dict[str, Any] = {}
    """The settings of a loss that are not fields above (a user's loss's own keywords), each filled in with
    its constructor's default; a study file and ``--set`` name them at the top level (``margin = 0.2``)."""

    @model_validator(mode="before")
    @classmethod
    def _loss_settings(cls, data: Any) -> Any:
        """Gather the loss's own settings into ``loss_args`` and fill in their defaults; drop settings that
        belong to another loss (a suite's base may set them for some of its experiments)."""
        if not isinstance(data, dict) or not isinstance(data.get("loss", "mse"), str):
            return data
        try:
            definition = losses.resolve(data.get("loss", "mse"))
        except AblateError:
            return data  # the field's own check names the problem
        own = [f for f in definition.fields if f not in cls.model_fields]
        given = data.get("loss_args", {})
        if not isinstance(given, dict):
            return data
        others = losses.known_fields() - set(cls.model_fields) - set(own)
        unknown = [k for k in given if k not in own and k not in others]  # another loss's: dropped, as at the top
        if unknown:
            raise ValueError(f"loss_args.{unknown[0]}: loss {definition.name!r} takes no setting {unknown[0]!r}"
                             + (f"; it takes {', '.join(own)}" if own else ""))
        out = {k: v for k, v in data.items() if k not in own and k not in others}
        args: dict[str, Any] = {}
        for field in own:
            value = data.get(field, given.get(field, definition.defaults[field]))
            if value is losses.REQUIRED:
                raise ValueError(f"loss {definition.name!r} needs {field} (its constructor has no default); set it, "
                                 f"e.g. --set {field}=...")
            args[field] = _loss_setting(definition.annotations[field], field, value)
        out["loss_args"] = args
        return out

    @field_validator("loss")
    @classmethod
    def _known_loss(cls, v: str) -> str:
        try:
            losses.resolve(v)
        except AblateError as e:
            raise ValueError(str(e)) from None
        return v

    @model_validator(mode="after")
    def _consistent(self) -> RunSpec:
        """The rules of the fields a loss reads (its weights, its stages), and the loss's own ``check``."""
        definition = losses.resolve(self.loss)
        reads = set(definition.fields)
        if {"alpha", "beta", "gamma"} <= reads and self.alpha + self.beta + self.gamma <= 0:
            raise ValueError("alpha, beta and gamma are all zero; give at least one a positive weight")
        if {"stage1_epochs", "stage2_epochs", "stage3_start"} <= reads:
            stage3 = self.stage1_epochs + self.stage2_epochs if self.stage3_start is None else self.stage3_start
            if stage3 < self.stage1_epochs:
                raise ValueError(f"stage3_start ({self.stage3_start}) is before the end of stage 1 "
                                 f"({self.stage1_epochs}); it must be at least stage1_epochs")
            if self.stage1_epochs >= self.epochs:
                raise ValueError(f"the run has {self.epochs} epochs but the MSE warm-up alone takes "
                                 f"{self.stage1_epochs}; lower stage1_epochs or raise epochs")
        definition.check(self)
        return self

    @property
    def last_stage_start(self) -> int:
        """The first epoch (0-based) of the run's last stage: where early stopping starts counting."""
        return losses.resolve(self.loss).last_stage_start(self)

    @property
    def effective_batch_size(self) -> int:
        """Pairs per optimizer step: the batch size times the accumulation steps."""
        return self.batch_size * self.accumulation_steps

    def flat(self) -> dict[str, Any]:
        """All fields as one flat dict with dotted keys; the loss's own settings at the top level, as they are set."""
        doc = self.model_dump(mode="json")
        return flatten({**{k: v for k, v in doc.items() if k != "loss_args"}, **doc["loss_args"]})

    def applicable(self) -> dict[str, Any]:
        """The fields that matter for this run's loss and data, flat with dotted keys (its MLflow params)."""
        definition = losses.resolve(self.loss)
        unused = (_loss_fields() - set(definition.fields)) | set(definition.replaces)
        if not definition.contrastive:
            unused.add("mask_shared_ligands")
        out = {k: v for k, v in self.flat().items() if k.split(".")[0] not in unused}
        if self.data.source != "synthetic":
            out = {k: v for k, v in out.items() if not k.startswith("data.synthetic.")}
        return out


RUN_FIELDS = frozenset(RunSpec.model_fields)



def _loss_fields() -> set[str]:
    """The run fields some built-in loss reads (a run whose loss does not read one does not log it)."""
    return {f for name in losses.builtin_names() for f in losses.resolve(name).fields if f in RUN_FIELDS}


def loss_fields(loss: str) -> tuple[str, ...]:
    """The run fields a loss reads, its own settings included ('' for a loss that cannot be resolved)."""
    try:
        return tuple(losses.resolve(loss).fields)
    except AblateError:
        return ()


def _loss_setting(annotation: Any, field: str, value: Any) -> Any:
    """A loss's own setting, checked against its constructor's type hint (booleans are not numbers)."""
    from pydantic import TypeAdapter

    if _bool_for_number(annotation, value):
        raise ValueError(f"{field}: {json.dumps(value)} is a boolean where a number belongs; write a number")
    try:
        adapter: TypeAdapter[Any] = TypeAdapter(annotation)
    except Exception:
        return value
    try:
        return adapter.validate_python(value)
    except ValidationError as e:
        raise ValueError(f"{field}: {_clean(e.errors()[0]['msg'])} (got {value!r})") from None

SHAPING_FIELDS = ("model", "batch_size", "accumulation_steps", "epochs", "data", "device", "amp")
"""The run fields that shape the computation: runs that agree on them can train as one array."""


class StabilitySpec(_Strict):
    """Rules that stop a run as unstable; a rule set to none is off."""

    enabled: bool = True
    max_loss: PositiveFloat | None = 50.0
    growth_factor: Annotated[float, Field(gt=1)] | None = 2.0
    growth_patience: Annotated[int, Field(ge=1)] = 3
    max_grad_norm: PositiveFloat | None = 1000.0
    min_spread: Annotated[float, Field(ge=0, lt=1)] | None = 0.05
    grace_epochs: Annotated[int, Field(ge=0)] = 2




# --------------------------------------------------------------------------------------
# Validation errors, explained in one line
# --------------------------------------------------------------------------------------

_M = TypeVar("_M", bound=BaseModel)


def validate(
    model: type[_M], data: Any, source: str, prefix: str = "", own: dict[str, Any] | None = None
) -> _M:
    """``model.model_validate(data)``, with a failure as one AblateError: ``source: key: what is wrong``.

    ``prefix`` is the dotted place of ``data`` in the file; ``own`` is the part of ``data`` the user
    wrote at that place (a key not in it is blamed on ``base``, where it was inherited from).
    """
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where, msg = describe(e, model, prefix, own)
        raise AblateError(f"{source}: {where + ': ' if where else ''}{msg}") from None


def describe(
    e: ValidationError, model: type[BaseModel], prefix: str = "", own: dict[str, Any] | None = None,
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
        if parent is RunSpec:  # a run also takes its losses' own settings (known ones: built in, or resolved)
            valid = sorted(set(valid) - {"loss_args"}) + sorted(losses.known_fields() - set(RunSpec.model_fields))
        hint = difflib.get_close_matches(loc[-1], valid, n=1)
        msg = f"unknown key {loc[-1]!r}"
        if hint:
            msg += f"; did you mean {hint[0]!r}?"
        if valid:
            msg += (" Valid keys: " if hint else "; valid keys: ") + ", ".join(valid)
        return where, msg
    got = err.get("input")
    shown = "" if isinstance(got, dict) or repr(got) in err["msg"] else f" (got {got!r})"
    return where, f"{_clean(err['msg'])}{shown}"


def _clean(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one flat dict with dotted keys."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def set_path(doc: dict[str, Any], dotted: str, value: Any, what: str = "--set") -> None:
    """Set a dotted key in a nested dict, creating tables on the way."""
    node = doc
    parts = dotted.split(".")
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise AblateError(f"{what} {dotted}: {part!r} is a value, not a table")
        node = nxt
    node[parts[-1]] = value


def apply_values(run: RunSpec, values: dict[str, Any]) -> RunSpec:
    """A RunSpec with dotted-key values set (``model.dropout``), validated again."""
    doc = run.model_dump(mode="json")
    for key, value in values.items():
        set_path(doc, key, value)
    return RunSpec.model_validate(doc)


def run_from_options(options: dict[str, Any], flags: dict[str, str] | None = None) -> RunSpec:
    """A RunSpec from command-line options (None means: keep the default); errors name the option.

    ``flags`` maps a field (dotted for nested ones) to the flag that set it (``epochs`` ->
    ``--epochs``); an error in any other field is named as ``--set field``.
    """
    doc: dict[str, Any] = {}
    for key, value in options.items():
        if value is not None:
            set_path(doc, key, value)
    try:
        return RunSpec.model_validate(doc)
    except ValidationError as e:
        where, msg = describe(e, RunSpec)
        if not where:
            raise AblateError(msg) from None
        raise AblateError(f"{(flags or {}).get(where, f'--set {where}')}: {msg}") from None
