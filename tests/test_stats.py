"""Seed statistics against hand-computed and textbook values."""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
from scipy import stats as sps

from ablate.report.stats import (
    Comparison,
    compare,
    expected_max,
    holm,
    precise_enough,
    relative_change,
    sd_for_power,
    seeds_for_half_width,
    seeds_for_power,
    summarize,
    t_test_power,
    welch_p,
)


def test_student_t_interval_of_three_seeds():
    s = summarize([1.0, 2.0, 3.0])
    t_975_df2 = 4.302652729749464  # Student's t, 97.5th percentile, 2 degrees of freedom
    half = t_975_df2 * 1.0 / math.sqrt(3)
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    assert s.ci_low == pytest.approx(2.0 - half, rel=1e-9)
    assert s.ci_high == pytest.approx(2.0 + half, rel=1e-9)


def test_one_seed_has_no_interval_and_nan_values_are_left_out():
    s = summarize([0.5])
    assert s.n == 1 and s.mean == 0.5 and math.isnan(s.ci_low)
    assert summarize([0.2, float("nan"), 0.4]).n == 2


def test_welch_p_matches_the_textbook_computation():
    a, b = [0.61, 0.64, 0.60, 0.66], [0.52, 0.55, 0.57]
    ma, mb = sum(a) / 4, sum(b) / 3
    va = sum((x - ma) ** 2 for x in a) / 3
    vb = sum((x - mb) ** 2 for x in b) / 2
    se2 = va / 4 + vb / 3
    t = (ma - mb) / math.sqrt(se2)
    df = se2**2 / ((va / 4) ** 2 / 3 + (vb / 3) ** 2 / 2)
    from scipy.stats import t as student

    assert welch_p(a, b) == pytest.approx(2 * student.sf(abs(t), df), rel=1e-9)
    assert math.isnan(welch_p([0.5], b))
    assert math.isnan(welch_p([0.5, 0.5], [0.5, 0.5]))


def test_holm_step_down():
    # Holm (1979): sorted p = 0.01, 0.03, 0.04 with m = 3 -> 0.03, max(0.06, 0.03), max(0.04, 0.06).
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])
    adjusted = holm([0.02, float("nan"), 0.01])
    assert adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    assert math.isnan(adjusted[1])


def test_relative_change():
    assert relative_change(0.55, 0.5) == pytest.approx(10.0)
    assert relative_change(-0.09, -0.1) == pytest.approx(10.0)
    assert math.isnan(relative_change(0.5, 0.0))


def test_expected_max_equals_enumeration_over_all_draws():
    values = [0.3, 0.9, 0.5, 0.7]
    em = expected_max(values)
    for n in range(1, 5):
        draws = list(itertools.product(values, repeat=n))
        assert em[n - 1] == pytest.approx(sum(max(d) for d in draws) / len(draws))
    assert em[0] == pytest.approx(sum(values) / 4)
    assert all(x <= y + 1e-12 for x, y in itertools.pairwise(em))
    emin = expected_max(values, maximize=False)
    assert emin[1] == pytest.approx(sum(min(d) for d in itertools.product(values, repeat=2)) / 16)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def _sample_var(xs: list[float]) -> float:
    m = _mean(xs)
    return sum((x - m) ** 2 for x in xs) / (len(xs) - 1)


def test_paired_interval_and_p_match_the_explicit_formula():
    a, b = [0.61, 0.64, 0.60, 0.66, 0.70], [0.58, 0.63, 0.55, 0.65, 0.66]
    d = [x - y for x, y in zip(a, b, strict=True)]  # 0.03, 0.01, 0.05, 0.01, 0.04
    n, md = 5, _mean(d)
    se = math.sqrt(_sample_var(d) / n)
    t_975_df4 = 2.7764451051977987  # Student's t, 97.5th percentile, 4 degrees of freedom
    t = md / se
    c = compare(a, b, paired=True)
    assert (c.paired, c.test, c.n, c.n_a, c.n_b) == (True, "paired t", 5, 5, 5)
    assert c.diff == pytest.approx(md, rel=1e-12) and md == pytest.approx(0.028)
    assert c.ci_low == pytest.approx(md - t_975_df4 * se, rel=1e-9)
    assert c.ci_high == pytest.approx(md + t_975_df4 * se, rel=1e-9)
    assert c.half_width == pytest.approx(t_975_df4 * se, rel=1e-9)
    assert c.p == pytest.approx(2 * sps.t.sf(abs(t), n - 1), rel=1e-9)
    ninety = compare(a, b, paired=True, confidence=0.90)
    assert ninety.half_width == pytest.approx(sps.t.ppf(0.95, 4) * se, rel=1e-9)


def test_welch_interval_matches_the_welch_satterthwaite_formula():
    a, b = [0.61, 0.64, 0.60, 0.66], [0.52, 0.55, 0.57]
    va, vb = _sample_var(a) / 4, _sample_var(b) / 3
    df = (va + vb) ** 2 / (va**2 / 3 + vb**2 / 2)
    diff = _mean(a) - _mean(b)
    half = sps.t.ppf(0.975, df) * math.sqrt(va + vb)
    c = compare(a, b, paired=False)
    assert (c.paired, c.test, c.n_a, c.n_b, c.n) == (False, "Welch t", 4, 3, 3)
    assert c.diff == pytest.approx(diff, rel=1e-12)
    assert (c.ci_low, c.ci_high) == pytest.approx((diff - half, diff + half), rel=1e-9)
    assert c.p == pytest.approx(welch_p(a, b), rel=1e-12)


def test_wilcoxon_signed_rank_has_the_exact_textbook_p():
    # Five positive differences: W- = 0, and the exact two-sided p is 2 / 2^5 (Wilcoxon, 1945).
    a, b = [1.3, 2.1, 3.5, 4.2, 5.9], [1.0, 2.0, 3.0, 4.0, 5.0]
    c = compare(a, b, paired=True, test="wilcoxon")
    assert c.test == "Wilcoxon signed-rank"
    assert c.p == pytest.approx(2 / 2**5)
    t_test = compare(a, b, paired=True)
    assert (c.ci_low, c.ci_high) == (t_test.ci_low, t_test.ci_high)  # the interval stays the paired t interval
    with pytest.raises(ValueError, match="paired"):
        compare(a, b, paired=False, test="wilcoxon")


def test_probability_of_improvement_counts_ties_half():
    a, b = [1.0, 2.0, 3.0], [2.0, 2.0, 0.0]
    # All 9 (i, j): a=1 beats 0 -> 1; a=2 ties 2, 2 and beats 0 -> 2; a=3 beats all -> 3; total 6 / 9.
    assert compare(a, b, paired=False).prob_improvement == pytest.approx(6 / 9)
    assert compare(a, b, paired=False, maximize=False).prob_improvement == pytest.approx(3 / 9)
    # Seed pairs (1, 2), (2, 2), (3, 0): lose, tie, win.
    assert compare(a, b, paired=True).prob_improvement == pytest.approx(1.5 / 3)
    assert compare(a, b, paired=True, maximize=False).prob_improvement == pytest.approx(1.5 / 3)


def test_paired_and_unpaired_probability_of_improvement_differ_under_a_seed_effect():
    # The experiment beats the baseline by 0.1 on every seed, but seeds differ by 1.
    b = [1.0, 2.0, 3.0]
    a = [x + 0.1 for x in b]
    paired, unpaired = compare(a, b, paired=True), compare(a, b, paired=False)
    assert paired.prob_improvement == 1.0 and (paired.pi_low, paired.pi_high) == (1.0, 1.0)
    assert unpaired.prob_improvement == pytest.approx(6 / 9)  # 1.1 > 1; 2.1 > 1, 2; 3.1 > all
    assert unpaired.pi_low < 6 / 9 < unpaired.pi_high


def _exact_bootstrap(values: list[float], draws: int) -> np.ndarray:
    """Multiplicity vectors of every ordered resample of `draws` indices, with replacement, as rows."""
    idx = np.array(list(itertools.product(range(len(values)), repeat=draws)))
    return np.stack([np.bincount(row, minlength=len(values)) for row in idx])


def _is_percentile(value: float, dist: np.ndarray, q: float, tol: float = 0.005) -> bool:
    return bool(np.mean(dist < value - 1e-12) <= q + tol and np.mean(dist <= value + 1e-12) >= q - tol)


def test_bootstrap_interval_is_the_percentile_interval_of_the_exact_bootstrap_distribution():
    # Paired: resample seed pairs jointly, so the statistic is the mean of resampled per-pair wins.
    a, b = [0.3, 0.5, 0.2, 0.9, 0.4], [0.1, 0.5, 0.6, 0.2, 0.8]
    wins = np.array([1.0, 0.5, 0.0, 1.0, 0.0])
    counts = _exact_bootstrap(list(wins), 5)
    exact = counts @ wins / 5
    c = compare(a, b, paired=True, confidence=0.8, n_boot=20000, seed=3)
    assert c.prob_improvement == pytest.approx(wins.mean())
    assert _is_percentile(c.pi_low, exact, 0.1) and _is_percentile(c.pi_high, exact, 0.9)
    # Unpaired: a and b are resampled independently (stratified), over all (i, j).
    a2, b2 = [0.3, 0.5, 0.7], [0.4, 0.5, 0.1]
    w = np.array([[float(x > y) + 0.5 * float(x == y) for y in b2] for x in a2])
    ca, cb = _exact_bootstrap(a2, 3), _exact_bootstrap(b2, 3)
    exact2 = np.einsum("ri,ij,sj->rs", ca, w, cb).ravel() / 9
    c2 = compare(a2, b2, paired=False, confidence=0.8, n_boot=20000, seed=3)
    assert c2.prob_improvement == pytest.approx(w.mean())
    assert _is_percentile(c2.pi_low, exact2, 0.1) and _is_percentile(c2.pi_high, exact2, 0.9)
    assert compare(a2, b2, paired=False, n_boot=500, seed=7) == compare(a2, b2, paired=False, n_boot=500, seed=7)


def test_compare_drops_incomplete_pairs_and_rejects_misaligned_seeds():
    a, b = [0.5, float("nan"), 0.7, 0.6], [0.4, 0.5, float("inf"), 0.45]
    c = compare(a, b, paired=True)
    assert c.n == 2 and c.diff == pytest.approx((0.5 + 0.6) / 2 - (0.4 + 0.45) / 2)
    u = compare(a, b, paired=False)
    assert (u.n_a, u.n_b) == (3, 3) and u.diff == pytest.approx(0.6 - (0.4 + 0.5 + 0.45) / 3)
    with pytest.raises(ValueError, match="one baseline value per seed"):
        compare([0.5, 0.6], [0.4], paired=True)


@pytest.mark.parametrize("paired", [True, False])
def test_undefined_comparisons_are_nan_without_warnings(paired: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        one = compare([0.5], [0.4], paired=paired)
        flat = compare([0.5, 0.5, 0.5], [0.4, 0.4, 0.4], paired=paired)
        empty = compare([], [], paired=paired)
    assert one.n == 1 and one.diff == pytest.approx(0.1) and one.prob_improvement == 1.0
    assert all(math.isnan(x) for x in (one.ci_low, one.ci_high, one.p, one.pi_low, one.pi_high))
    assert all(math.isnan(x) for x in (flat.ci_low, flat.ci_high, flat.p, flat.half_width))
    assert flat.prob_improvement == 1.0
    assert empty.n == 0 and all(math.isnan(x) for x in (empty.diff, empty.p, empty.prob_improvement))


def test_seeds_for_power_matches_the_noncentral_t_and_textbook_sample_sizes():
    # One-sample (paired) t, d = 1, alpha 0.05 two-sided, power 0.8: n = 10 (G*Power: actual power 0.803).
    def one_sample_power(n: int, d: float) -> float:
        crit = sps.t.ppf(0.975, n - 1)
        return float(sps.nct.sf(crit, n - 1, d * math.sqrt(n)) + sps.nct.cdf(-crit, n - 1, d * math.sqrt(n)))

    assert one_sample_power(9, 1.0) < 0.8 <= one_sample_power(10, 1.0)
    assert seeds_for_power(0.3, 0.3, paired=True) == 10
    assert t_test_power(0.3, 0.3, 10, paired=True) == pytest.approx(one_sample_power(10, 1.0), rel=1e-9)
    # Two-sample t, d = 0.5, power 0.8: 64 per group (Cohen, 1988, Table 2.4.1).
    assert seeds_for_power(0.5, 1.0, paired=False) == 64
    assert t_test_power(-0.5, 1.0, 63, paired=False) < 0.8 <= t_test_power(-0.5, 1.0, 64, paired=False)
    assert seeds_for_power(-0.5, 1.0, paired=False) == 64  # the direction does not matter, two-sided
    assert seeds_for_power(0.0, 1.0, paired=True) is None
    assert seeds_for_power(float("nan"), 1.0, paired=True) is None
    assert seeds_for_power(0.5, 1.0, paired=False, max_n=63) is None
    # d = 0.2: 393 per group (Cohen, 1988, Table 2.4.1), far past the first n tried
    n = seeds_for_power(0.2, 1.0, paired=False)
    assert n in (393, 394)  # Cohen's table rounds the normal approximation
    assert t_test_power(0.2, 1.0, n - 1, paired=False) < 0.8 <= t_test_power(0.2, 1.0, n, paired=False)
    assert seeds_for_power(0.2, 1.0, paired=False, max_n=n - 1) is None
    assert seeds_for_power(0.5, 0.0, paired=False) is None


def test_sd_for_power_is_the_sd_of_differences_or_the_pooled_sd():
    a, b = [0.61, 0.64, 0.60, 0.66], [0.58, 0.63, 0.55, 0.62]
    d = [x - y for x, y in zip(a, b, strict=True)]
    assert sd_for_power(a, b, paired=True) == pytest.approx(math.sqrt(_sample_var(d)), rel=1e-12)
    a2, b2 = [0.61, 0.64, 0.60, 0.66], [0.52, 0.55, 0.57]
    pooled = math.sqrt((3 * _sample_var(a2) + 2 * _sample_var(b2)) / 5)
    assert sd_for_power(a2, b2, paired=False) == pytest.approx(pooled, rel=1e-12)
    assert math.isnan(sd_for_power([0.5], [0.4], paired=True))


def _comparison(ci_low: float, ci_high: float, p: float) -> Comparison:
    nan = float("nan")
    return Comparison(True, "paired t", 5, 5, (ci_low + ci_high) / 2, ci_low, ci_high, p, nan, nan, nan, 0.95, True)


def test_precise_enough_looks_at_half_widths_only():
    narrow_null = _comparison(-0.01, 0.01, 0.9)  # half-width 0.01, nowhere near significant
    wide_significant = _comparison(0.01, 0.5, 1e-6)  # half-width 0.245, very significant
    assert precise_enough([narrow_null], target=0.02)
    assert not precise_enough([narrow_null, wide_significant], target=0.02)
    assert precise_enough([narrow_null, wide_significant], target=0.25)
    assert not precise_enough([_comparison(float("nan"), float("nan"), float("nan"))], target=1e9)
    assert precise_enough([], target=0.01)


def test_seeds_for_half_width_counts_the_t_quantile_shrinking_too():
    from scipy import stats as sps

    # sd 1 at 3 seeds: half-width t(0.975, 2) / sqrt(3) = 2.484; +/- 0.5 needs 18 seeds
    # (t(0.975, 17) / sqrt(18) = 0.497, t(0.975, 16) / sqrt(17) = 0.514), where 1 / sqrt(n) alone says 75
    hw = float(sps.t.ppf(0.975, 2)) / math.sqrt(3)
    assert seeds_for_half_width(hw, 3, 0.5) == 18
    assert math.ceil(3 * (hw / 0.5) ** 2) == 75
    assert seeds_for_half_width(0.4, 6, 0.5) == 6  # already there
    assert seeds_for_half_width(hw, 3, 1e-6, most=12) == 12  # capped
    assert seeds_for_half_width(float("nan"), 3, 0.5, most=12) == 12



def test_seeds_for_half_width_reads_a_welch_interval_with_its_degrees_of_freedom():
    from scipy import stats as sps

    # Welch with equal spreads has 2n - 2 degrees of freedom: sd 1 per arm at 3 seeds is a half-width of
    # t(0.975, 4) * sqrt(2 / 3); +/- 0.5 then needs 32 seeds per arm (t(0.975, 62) * sqrt(2 / 32) = 0.4997,
    # t(0.975, 60) * sqrt(2 / 31) = 0.508)
    hw = float(sps.t.ppf(0.975, 4)) * math.sqrt(2 / 3)
    assert seeds_for_half_width(hw, 3, 0.5, paired=False) == 32
