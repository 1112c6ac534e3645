"""Seeds -> mean, 95 % confidence interval, and a test against the baseline (Holm-corrected)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from scipy import stats as sps


@dataclass(frozen=True)
class Summary:
    """Mean and Student-t confidence interval of one metric over seeds."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval."""
        return (self.ci_high - self.ci_low) / 2


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean, sample standard deviation and the Student-t interval (NaN where n < 2)."""
    xs = [float(v) for v in values if math.isfinite(v)]
    n = len(xs)
    if n == 0:
        nan = float("nan")
        return Summary(0, nan, nan, nan, nan)
    mean = sum(xs) / n
    if n == 1:
        return Summary(1, mean, float("nan"), float("nan"), float("nan"))
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(sps.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test for a difference in means (NaN where undefined)."""
    xa = [float(v) for v in a if math.isfinite(v)]
    xb = [float(v) for v in b if math.isfinite(v)]
    if len(xa) < 2 or len(xb) < 2:
        return float("nan")
    if _var(xa) == 0 and _var(xb) == 0:
        return float("nan")  # no spread at all: the t statistic is undefined
    with warnings.catch_warnings():  # scipy warns when the values are nearly identical
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(sps.ttest_ind(xa, xb, equal_var=False).pvalue)


def _var(xs: Sequence[float]) -> float:
    m = sum(xs) / len(xs)
    return sum((x - m) ** 2 for x in xs)


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of a family of p-values (NaN stays NaN and is not counted)."""
    indexed = sorted((p, i) for i, p in enumerate(pvalues) if math.isfinite(p))
    m = len(indexed)
    out = [float("nan")] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def relative_change(value: float, baseline: float) -> float:
    """(value - baseline) / |baseline| in percent (NaN for a zero or missing baseline)."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return float("nan")
    return 100.0 * (value - baseline) / abs(baseline)


def expected_max(values: Sequence[float], maximize: bool = True) -> list[float]:
    """Expected best value of n trials drawn from the observed ones, for n = 1..N.

    Dodge et al. (2019), "Show Your Work": with the N values sorted so that v_1 is the worst,
    E[best of n] = sum_i v_i ((i/N)^n - ((i-1)/N)^n).
    """
    xs = sorted((float(v) for v in values if math.isfinite(v)), reverse=not maximize)
    n_obs = len(xs)
    out = []
    for n in range(1, n_obs + 1):
        out.append(sum(v * ((i / n_obs) ** n - ((i - 1) / n_obs) ** n)
                       for i, v in enumerate(xs, start=1)))
    return out
