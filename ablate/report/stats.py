"""Seeds -> mean, 95 % confidence interval, and a test against the baseline (Holm-corrected).

A comparison of an experiment with the baseline is paired by seed where it can be: runs that share a seed share
the data split, the initialisation and the batch order, which is most of the seed-to-seed variance. Following
Agarwal et al. (NeurIPS 2021, rliable), a comparison reports an interval for the difference and the probability of
improvement with a bootstrap interval, not a bare p-value.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np


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
    half = t_quantile(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half)


@functools.lru_cache(maxsize=1024)
def t_quantile(q: float, df: float) -> float:
    """Student's t quantile (remembered: a plot's bands ask for the same few thousands of times)."""
    from scipy import stats as sps  # imported on use: it takes seconds

    return float(sps.t.ppf(q, df))


def welch_p(a: Sequence[float], b: Sequence[float]) -> float:
    """Two-sided p-value of Welch's t-test for a difference in means (NaN where undefined)."""
    from scipy import stats as sps  # imported on use: it takes seconds

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


@dataclass(frozen=True)
class Comparison:
    """An experiment against the baseline over seeds: difference of means, its interval, test, P(improvement).

    ``n_a`` and ``n_b`` count the finite values used (both equal the number of complete seed pairs when
    ``paired``); ``diff`` is mean(experiment) - mean(baseline) whatever the direction of "better";
    ``prob_improvement`` is P(experiment better than baseline) with ties counting half, where better means
    greater when ``maximize`` and smaller otherwise. A field that is undefined for the data is NaN.
    """

    paired: bool
    test: str
    n_a: int
    n_b: int
    diff: float
    ci_low: float
    ci_high: float
    p: float
    prob_improvement: float
    pi_low: float
    pi_high: float
    confidence: float
    maximize: bool

    @property
    def n(self) -> int:
        """Seeds per side: the number of pairs when paired, else the smaller of the two sample sizes."""
        return min(self.n_a, self.n_b)

    @property
    def half_width(self) -> float:
        """Half the width of the confidence interval of the difference."""
        return (self.ci_high - self.ci_low) / 2


_TEST_NAMES = {(True, "t"): "paired t", (True, "wilcoxon"): "Wilcoxon signed-rank", (False, "t"): "Welch t"}
_NAN = float("nan")


def compare(
    a: Sequence[float],
    b: Sequence[float],
    *,
    paired: bool,
    test: Literal["t", "wilcoxon"] = "t",
    maximize: bool = True,
    confidence: float = 0.95,
    n_boot: int = 2000,
    seed: int = 0,
) -> Comparison:
    """Compare an experiment's per-seed values ``a`` with the baseline's ``b`` (a[i], b[i] share a seed if paired).

    Interval of the difference of means: the paired t interval on the differences when ``paired`` (also with
    ``test="wilcoxon"``, which changes only the p-value), else the Welch–Satterthwaite interval. The two-sided
    p-value is scipy's ttest_rel, wilcoxon or ttest_ind(equal_var=False). The probability of improvement is taken
    over the seed pairs (i, i) when paired, else over all (i, j); its percentile bootstrap interval resamples the
    seed pairs jointly when paired, else a and b independently. Pairs with a non-finite member (unpaired: non-finite
    values) are dropped. n < 2 or zero spread gives NaN fields, never an exception; ``n_boot=0`` skips the
    bootstrap (NaN interval).
    """
    if (paired, test) not in _TEST_NAMES:
        raise ValueError(f"test={test!r} with paired={paired} is not available: use test='t' or pass paired=True")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
    if n_boot < 0:
        raise ValueError(f"n_boot must be >= 0, got {n_boot}")
    xa, xb = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if paired:
        if xa.size != xb.size:
            raise ValueError(f"paired comparison needs one baseline value per seed: got {xa.size} and {xb.size}")
        keep = np.isfinite(xa) & np.isfinite(xb)
        xa, xb = xa[keep], xb[keep]
    else:
        xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    n_a, n_b = int(xa.size), int(xb.size)
    diff = float(xa.mean() - xb.mean()) if n_a and n_b else _NAN
    ci_low, ci_high, p = _interval_and_p(xa, xb, paired, test, confidence)
    pi, pi_low, pi_high = _prob_improvement(xa, xb, paired, maximize, confidence, n_boot, seed)
    return Comparison(paired, _TEST_NAMES[(paired, test)], n_a, n_b, diff, ci_low, ci_high, p, pi, pi_low, pi_high,
                      confidence, maximize)


def _interval_and_p(
    xa: np.ndarray, xb: np.ndarray, paired: bool, test: str, confidence: float
) -> tuple[float, float, float]:
    """(ci_low, ci_high, p) of the difference of means; NaN where n < 2 or the spread is zero."""
    from scipy import stats as sps  # imported on use: it takes seconds

    if min(xa.size, xb.size) < 2:
        return _NAN, _NAN, _NAN
    with warnings.catch_warnings():  # scipy warns on nearly identical values, and on ties or zeros (Wilcoxon)
        warnings.simplefilter("ignore")
        if paired:
            d = xa - xb
            p = _NAN
            if test == "wilcoxon" and np.any(d != 0):
                p = float(sps.wilcoxon(xa, xb).pvalue)
            if np.ptp(d) == 0:  # all differences equal (np.var can round a constant to a tiny non-zero)
                return _NAN, _NAN, p
            res: Any = sps.ttest_rel(xa, xb)
            if test == "t":
                p = float(res.pvalue)
        else:
            if np.ptp(xa) == 0 and np.ptp(xb) == 0:
                return _NAN, _NAN, _NAN
            res = sps.ttest_ind(xa, xb, equal_var=False)
            p = float(res.pvalue)
        ci = res.confidence_interval(confidence_level=confidence)
    return float(ci.low), float(ci.high), p


def _prob_improvement(
    xa: np.ndarray, xb: np.ndarray, paired: bool, maximize: bool, confidence: float, n_boot: int, seed: int
) -> tuple[float, float, float]:
    """P(a better than b), ties half, with its percentile bootstrap interval (NaN interval where n < 2)."""
    if xa.size == 0 or xb.size == 0:
        return _NAN, _NAN, _NAN
    sign = 1.0 if maximize else -1.0
    delta = xa - xb if paired else xa[:, None] - xb[None, :]  # the seed pairs (i, i), else every (i, j)
    wins = (np.sign(sign * delta) + 1) / 2  # 1 better, 0.5 tie, 0 worse
    pi = float(wins.mean())
    if min(xa.size, xb.size) < 2 or n_boot == 0:
        return pi, _NAN, _NAN
    rng = np.random.default_rng(seed)
    if paired:
        # A resample of the seed pairs holds each outcome (better, tie, worse) a multinomial number of times: drawn
        # over the three outcomes, the same distribution as over the n pairs, at a cost that does not grow with n.
        outcomes = np.array([1.0, 0.5, 0.0])
        shares = np.array([np.mean(wins == w) for w in outcomes])
        boot = rng.multinomial(xa.size, shares / shares.sum(), size=n_boot) @ outcomes / xa.size
    else:
        # A resample is a vector of multiplicities; the resampled mean is a weighted mean of the wins.
        ca = rng.multinomial(xa.size, np.full(xa.size, 1 / xa.size), size=n_boot)
        cb = rng.multinomial(xb.size, np.full(xb.size, 1 / xb.size), size=n_boot)
        boot = np.einsum("ri,ij,rj->r", ca, wins, cb) / (xa.size * xb.size)
    tail = (1 - confidence) / 2
    low, high = np.quantile(boot, [tail, 1 - tail])
    return pi, float(low), float(high)


def t_test_power(diff: float, sd: float, n: int, *, paired: bool, alpha: float = 0.05) -> float:
    """Power of the two-sided level-alpha t-test with n seeds per experiment, from the noncentral t.

    Paired: one-sample t on the differences (sd = their sd, df = n - 1, noncentrality diff / sd * sqrt(n)).
    Unpaired: two-sample equal-n Student t (sd = common sd per group, df = 2n - 2, noncentrality
    diff / sd * sqrt(n / 2)). NaN where undefined (n < 2, sd not positive and finite, diff not finite).
    """
    return float(_power(np.array([n]), diff, sd, paired, alpha)[0])


def _power(ns: np.ndarray, diff: float, sd: float, paired: bool, alpha: float) -> np.ndarray:
    from scipy import stats as sps

    if not 0 < alpha < 1:
        raise ValueError(f"alpha must lie strictly between 0 and 1, got {alpha}")
    ns = ns.astype(float)
    if not (math.isfinite(diff) and math.isfinite(sd) and sd > 0):
        return np.full(ns.shape, _NAN)
    ns = np.where(ns >= 2, ns, _NAN)
    df = ns - 1 if paired else 2 * ns - 2
    nc = diff / sd * (np.sqrt(ns) if paired else np.sqrt(ns / 2))
    crit = sps.t.ppf(1 - alpha / 2, df)
    out: np.ndarray = sps.nct.sf(crit, df, nc) + sps.nct.cdf(-crit, df, nc)
    return out


def seeds_for_power(
    diff: float, sd: float, *, paired: bool, power: float = 0.8, alpha: float = 0.05, max_n: int = 1000
) -> int | None:
    """Fewest seeds per experiment (>= 2) at which t_test_power reaches ``power``; None past max_n or if undefined.

    ``sd`` is the sd of the per-seed differences when paired, the common per-group sd otherwise (see sd_for_power).
    None when diff is 0 or not finite, sd is not positive and finite, or more than ``max_n`` seeds are needed.
    """
    if not 0 < power < 1:
        raise ValueError(f"power must lie strictly between 0 and 1, got {power}")
    if diff == 0 or max_n < 2:
        return None
    start = 2
    while start <= max_n:  # the smallest n first: most answers lie below 64, and each n costs a noncentral t
        ns = np.arange(start, min(max_n, max(2 * start, 64)) + 1)
        reached = np.flatnonzero(_power(ns, diff, sd, paired, alpha) >= power)  # NaN compares False
        if reached.size:
            return int(ns[reached[0]])
        start = int(ns[-1]) + 1
    return None


def sd_for_power(a: Sequence[float], b: Sequence[float], *, paired: bool) -> float:
    """The sd that seeds_for_power expects, from observed seeds: sd of the paired differences, else the pooled sd.

    Paired drops pairs with a non-finite member and needs 2 pairs; unpaired drops non-finite values and pools
    ((n_a - 1) var_a + (n_b - 1) var_b) / (n_a + n_b - 2) with both groups non-empty. NaN otherwise.
    """
    xa, xb = np.asarray(a, dtype=float).ravel(), np.asarray(b, dtype=float).ravel()
    if paired:
        if xa.size != xb.size:
            raise ValueError(f"paired sd needs one baseline value per seed: got {xa.size} and {xb.size}")
        keep = np.isfinite(xa) & np.isfinite(xb)
        d = xa[keep] - xb[keep]
        return float(np.std(d, ddof=1)) if d.size >= 2 else _NAN
    xa, xb = xa[np.isfinite(xa)], xb[np.isfinite(xb)]
    dof = xa.size + xb.size - 2
    if xa.size == 0 or xb.size == 0 or dof < 1:
        return _NAN
    ss = np.sum((xa - xa.mean()) ** 2) + np.sum((xb - xb.mean()) ** 2)
    return float(np.sqrt(ss / dof))


def precise_enough(comparisons: Sequence[Comparison], target: float) -> bool:
    """Stopping rule for adding seeds: every interval's half-width is finite and <= target (precision only).

    It never looks at p-values or at which side wins, so stopping cannot chase significance. Stopping when the
    sample sd happens to be small still nudges a t-test slightly: in tests/test_stats_simulation.py the unadjusted
    false-positive rate per comparison is about 5.5 % at nominal 5 %, while Holm's rate per suite stays at or
    below 5 %. A NaN half-width (n < 2, zero spread) is not precise; an empty sequence is (nothing to measure).
    """
    return all(math.isfinite(c.half_width) and c.half_width <= target for c in comparisons)


def seeds_for_half_width(half_width: float, n: int, target: float, *, paired: bool = True,
                         confidence: float = 0.95, most: int = 10_000) -> int:
    """The seeds a t interval of ``half_width`` at ``n`` seeds needs to narrow to ``target``, at the same spread.

    The spread is read back from the interval (sd = half_width * sqrt(n) / t(df(n))); the answer is the smallest
    m with t(df(m)) * sd / sqrt(m) <= target, so it counts that the t quantile, not only 1/sqrt(m), shrinks. df is
    n - 1 for a paired interval and 2n - 2 (equal spreads) for Welch's. ``n`` when already there; ``most`` caps it
    (also for a NaN half-width, which says nothing)."""
    if not math.isfinite(half_width) or n < 2:
        return most
    if half_width <= target:
        return n
    q = 0.5 + confidence / 2

    def df(m: int) -> int:
        return m - 1 if paired else 2 * m - 2

    sd = half_width * math.sqrt(n) / t_quantile(q, df(n))
    m = n + 1
    while m < most and t_quantile(q, df(m)) * sd / math.sqrt(m) > target:
        m += 1
    return m


def next_seed_count(comparisons: Sequence[Comparison], n: int, target: float, max_seeds: int) -> int:
    """Seeds per experiment after the next round of adding seeds until every interval is within ± ``target``.

    ``n`` (stop) when every half-width is there or ``n`` is ``max_seeds``; else what the widest interval needs at
    its current spread (``seeds_for_half_width``, shifted by any seeds a comparison lacks), at least one more and
    at most twice ``n``: a spread read from few seeds is itself uncertain, and the next round measures it again.
    The rule reads the widths only, never a p-value.
    """
    if precise_enough(comparisons, target) or n >= max_seeds:
        return n
    wanted = max((seeds_for_half_width(c.half_width, c.n, target, paired=c.paired, most=max_seeds) + (n - c.n)
                  for c in comparisons if math.isfinite(c.half_width)), default=n + 1)
    return min(max_seeds, 2 * n, max(n + 1, wanted))
