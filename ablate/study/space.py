"""A search's space and machinery settings: searched parameters, the sampler, the pruner, lr scaling."""

from __future__ import annotations

import types
import typing
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, Field, model_validator

from ablate.specs import RunSpec, _Strict

if TYPE_CHECKING:
    import optuna

FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]


class ParamSpec(_Strict):
    """One searched parameter: a float or int range, a set of choices, weights on a simplex, or a division of the
    run's epochs into stages (``names``: the epoch fields of all stages but the last, which gets the rest)."""

    type: Literal["float", "int", "categorical", "simplex", "division"]
    low: FiniteFloat | None = None
    high: FiniteFloat | None = None
    log: bool = False
    step: FiniteFloat | None = None
    choices: list[Any] | None = None
    names: list[str] | None = None

    KEYS: ClassVar[dict[str, frozenset[str]]] = {
        "float": frozenset({"low", "high", "log", "step"}), "int": frozenset({"low", "high", "log", "step"}),
        "categorical": frozenset({"choices"}), "simplex": frozenset({"names"}), "division": frozenset({"names"}),
    }
    """The keys each type of parameter takes (besides ``type``)."""

    @model_validator(mode="after")
    def _check(self) -> ParamSpec:
        fields = type(self).model_fields
        stray = sorted(k for k in self.model_fields_set - {"type"}
                       if k not in self.KEYS[self.type] and getattr(self, k) != fields[k].default)
        if stray:
            raise ValueError(f"a {self.type} parameter takes no {', '.join(stray)}; its keys are "
                             f"{', '.join(sorted(self.KEYS[self.type]))}")
        if self.type in ("float", "int"):
            self._check_range()
        elif self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical parameter needs a non-empty list of choices")
            seen = [repr(c) for c in self.choices]
            if len(set(seen)) != len(seen):
                raise ValueError(f"choices must be distinct, got {self.choices}")
        else:
            least = 2 if self.type == "simplex" else 1
            if not self.names or len(self.names) < least:
                raise ValueError(f"a {self.type} parameter needs names = [at least {least} run field"
                                 f"{'s' if least > 1 else ''}]")
            doubled = sorted({n for n in self.names if self.names.count(n) > 1})
            if doubled:
                raise ValueError(f"names must be distinct run fields; {', '.join(doubled)} is named twice")
        return self

    def _check_range(self) -> None:
        low, high, step = self.low, self.high, self.step
        if low is None or high is None:
            raise ValueError(f"a {self.type} parameter needs low and high")
        if not low < high:
            raise ValueError(f"low ({low}) must be below high ({high})")
        if self.log and low <= 0:
            raise ValueError(f"a log-scale range needs low > 0, got {low}")
        if self.log and step is not None:
            raise ValueError("a parameter cannot have both log = true and a step")
        if self.type == "int" and not (float(low).is_integer() and float(high).is_integer()):
            raise ValueError(f"an int parameter needs whole-number low and high, got {low} and {high}")
        if step is None:
            return
        if step <= 0 or (self.type == "int" and not float(step).is_integer()):
            raise ValueError(f"step must be a {'whole number ' if self.type == 'int' else 'number '}above 0, "
                             f"got {step}")
        if step > high - low:
            raise ValueError(f"step ({step}) is wider than the range {low}..{high}; "
                             f"use a step of at most {high - low:g} or widen the range")
        ratio = (high - low) / step
        if abs(ratio - round(ratio)) > 1e-9 * max(1.0, ratio):
            top = low + int(ratio) * step
            raise ValueError(f"the range {low}..{high} is not a whole number of steps of {step}, so {high} "
                             f"could never be drawn; set high = {top:g} (or a step that divides {high - low:g})")

    @property
    def targets(self) -> bool:
        """Whether the parameter sets the run fields in ``names`` (a simplex, a division) rather than its own key."""
        return self.type in ("simplex", "division")

    def suggest(self, trial: optuna.Trial, key: str, epochs: int = 1) -> dict[str, Any]:
        """The run-field values this parameter takes in a trial (``epochs``: the run's, which a division divides)."""
        if self.type == "float":
            assert self.low is not None and self.high is not None
            return {key: trial.suggest_float(key, self.low, self.high, log=self.log, step=self.step)}
        if self.type == "int":
            assert self.low is not None and self.high is not None
            step = int(self.step) if self.step else 1
            return {key: trial.suggest_int(key, int(self.low), int(self.high), log=self.log, step=step)}
        if self.type == "categorical":
            assert self.choices is not None
            return {key: trial.suggest_categorical(key, self.choices)}
        assert self.names is not None
        parts = len(self.names) + (1 if self.type == "division" else 0)
        u = [trial.suggest_float(f"{key}.u{i}", 0.0, 1.0) for i in range(parts - 1)]
        if self.type == "division":
            return divide(self.names, simplex_point(u), epochs)
        return dict(zip(self.names, simplex_point(u), strict=True))

    def distributions(self, key: str) -> dict[str, optuna.distributions.BaseDistribution]:
        """The Optuna distribution of each name this parameter suggests (as ``suggest`` creates them)."""
        from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

        if self.type == "categorical":
            assert self.choices is not None
            return {key: CategoricalDistribution(self.choices)}
        if self.type == "int":
            assert self.low is not None and self.high is not None
            step = int(self.step) if self.step else 1
            return {key: IntDistribution(int(self.low), int(self.high), log=self.log, step=step)}
        if self.type == "float":
            assert self.low is not None and self.high is not None
            return {key: FloatDistribution(self.low, self.high, log=self.log, step=self.step)}
        assert self.names is not None
        parts = len(self.names) + (1 if self.type == "division" else 0)
        return {f"{key}.u{i}": FloatDistribution(0.0, 1.0) for i in range(parts - 1)}

    def extremes(self, key: str, epochs: int = 1) -> list[dict[str, Any]]:
        """The run-field values at this parameter's extremes: every choice, low and high, each corner."""
        if self.type == "categorical":
            return [{key: c} for c in self.choices or []]
        if self.type == "division":
            names = self.names or []
            return [divide(names, [float(i == corner) for i in range(len(names) + 1)], epochs)
                    for corner in range(len(names) + 1)]
        if self.type == "simplex":
            names = self.names or []
            return [{n: float(n == corner) for n in names} for corner in names]
        assert self.low is not None and self.high is not None
        cast = int if self.type == "int" else float
        return [{key: cast(self.low)}, {key: cast(self.high)}]


def divide(names: list[str], shares: list[float], epochs: int) -> dict[str, int]:
    """Whole epochs per stage from shares of the run's ``epochs`` (the last stage, unnamed, gets the rest). The
    first stage keeps at least one epoch for the others (a warm-up cannot be the whole run)."""
    out = {name: int(share * epochs) for name, share in zip(names, shares, strict=False)}
    out[names[0]] = min(out[names[0]], max(0, epochs - 1))
    return out


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


class LrScalingSpec(_Strict):
    """How the learning rate follows the batch size: lr * (batch / reference) ** power."""

    rule: Literal["none", "linear", "sqrt"] = "none"
    reference_batch_size: Annotated[int, Field(ge=1)] = 32

    def scale(self, lr: float, batch_size: int) -> float:
        """The learning rate for a batch size under this rule."""
        power = {"none": 0.0, "linear": 1.0, "sqrt": 0.5}[self.rule]
        return lr * (batch_size / self.reference_batch_size) ** power


def field_kind(dotted: str) -> str | None:
    """Whether a run field (dotted for nested ones) takes 'int', 'bool', 'float' or 'other' values (None: unknown)."""
    model: Any = RunSpec
    annotation: Any = None
    for part in dotted.split("."):
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = _unwrap(annotation)
    arms = typing.get_args(annotation) if typing.get_origin(annotation) in _UNIONS else (annotation,)
    kinds = {str(a.__name__) if a in (int, bool, float) else "other"
             for a in map(_unwrap, arms) if a is not type(None)}
    if "float" in kinds:
        return "float"
    return kinds.pop() if len(kinds) == 1 else "other"


_UNIONS = (typing.Union, types.UnionType)


def _unwrap(annotation: Any) -> Any:
    """``X`` of ``Annotated[X, ...]`` and of ``X | None``; anything else as it is."""
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in _UNIONS:
        arms = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(arms) == 1:
            return _unwrap(arms[0])
    return annotation
