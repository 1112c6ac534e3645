"""A search's space and machinery settings: searched parameters, the sampler, the pruner, lr scaling."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import Field, model_validator

from ablate.specs import _Strict

if TYPE_CHECKING:
    import optuna


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

    def suggest(self, trial: optuna.Trial, key: str) -> dict[str, Any]:
        """The run-field values this parameter takes in a trial."""
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
        u = [trial.suggest_float(f"{key}.u{i}", 0.0, 1.0) for i in range(len(self.names) - 1)]
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
        return {f"{key}.u{i}": FloatDistribution(0.0, 1.0) for i in range(len(self.names) - 1)}

    def extremes(self, key: str) -> list[dict[str, Any]]:
        """The run-field values at this parameter's extremes: every choice, low and high, each corner."""
        if self.type == "categorical":
            return [{key: c} for c in self.choices or []]
        if self.type == "simplex":
            names = self.names or []
            return [{n: float(n == corner) for n in names} for corner in names]
        assert self.low is not None and self.high is not None
        cast = int if self.type == "int" else float
        return [{key: cast(self.low)}, {key: cast(self.high)}]


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
