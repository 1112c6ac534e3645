"""Monte Carlo checks of ablate.report.stats: interval coverage, paired power, Holm's FWER, the precision stopping rule.

Every simulation is seeded and vectorised over replications with numpy; `_paired_t` and `_welch_t` are written
here from the textbook formulas and checked against `compare()` on a few replications. Bounds are the nominal
value plus three Monte Carlo standard errors. Run with `pytest -s` to see the simulated numbers.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from ablate.report.stats import compare, holm, next_seed_count, seeds_for_power, t_test_power

CONFIDENCE = 0.95
ALPHA = 0.05


def _mc_error(p: float, reps: int) -> float:
    """Three Monte Carlo standard errors of a proportion p estimated from reps replications."""
    return 3 * math.sqrt(p * (1 - p) / reps)


def _paired_t(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(diff, ci_low, ci_high, p) of the paired t-test along the last axis: t = mean(d) / (sd(d) / sqrt(n))."""
    d = a - b
    n = d.shape[-1]
    mean = d.mean(axis=-1)
    se = d.std(axis=-1, ddof=1) / math.sqrt(n)
    half = sps.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * se
    p = 2 * sps.t.sf(np.abs(mean / se), n - 1)
    return mean, mean - half, mean + half, p


def _welch_t(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(diff, ci_low, ci_high, p) of Welch's t-test along the last axis, Welch–Satterthwaite degrees of freedom."""
    na, nb = a.shape[-1], b.shape[-1]
    va, vb = a.var(axis=-1, ddof=1) / na, b.var(axis=-1, ddof=1) / nb
    se2 = va + vb
    df = se2**2 / (va**2 / (na - 1) + vb**2 / (nb - 1))
    diff = a.mean(axis=-1) - b.mean(axis=-1)
    half = sps.t.ppf(0.5 + CONFIDENCE / 2, df) * np.sqrt(se2)
    p = 2 * sps.t.sf(np.abs(diff) / np.sqrt(se2), df)
    return diff, diff - half, diff + half, p


def _pooled_t_p(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Two-sided p of Student's equal-variance two-sample t-test along the last axis (equal n)."""
    n = a.shape[-1]
    sp2 = (a.var(axis=-1, ddof=1) + b.var(axis=-1, ddof=1)) / 2
    t = (a.mean(axis=-1) - b.mean(axis=-1)) / np.sqrt(sp2 * 2 / n)
    p: np.ndarray = 2 * sps.t.sf(np.abs(t), 2 * n - 2)
    return p


def _agrees_with_compare(a: np.ndarray, b: np.ndarray, paired: bool, rows: int = 3) -> None:
    """The vectorised computation equals compare() on the first few replications."""
    vec = (_paired_t if paired else _welch_t)(a[:rows], b[:rows])
    for r in range(rows):
        c = compare(list(a[r]), list(b[r]), paired=paired, n_boot=0)
        got = (c.diff, c.ci_low, c.ci_high, c.p)
        assert got == pytest.approx(tuple(float(v[r]) for v in vec), rel=1e-9, abs=1e-12)


def _seeded(shape_seed_effect: tuple[int, ...], shape_noise: tuple[int, ...], seed_sd: float, noise_sd: float,
            rng: np.random.Generator) -> np.ndarray:
    """value = seed effect (shared by every run of a seed) + run noise."""
    return rng.normal(0, seed_sd, shape_seed_effect) + rng.normal(0, noise_sd, shape_noise)


@pytest.mark.parametrize("n", [3, 8])
def test_paired_interval_covers_at_the_nominal_rate_with_correlated_seeds(n: int) -> None:
    """Paired t interval: 95 % coverage when experiment and baseline share a large seed effect."""
    reps, true_diff = 4000, 0.2
    rng = np.random.default_rng(100 + n)
    seed_effect = rng.normal(0, 1.0, (reps, n))
    a = true_diff + seed_effect + rng.normal(0, 0.1, (reps, n))
    b = seed_effect + rng.normal(0, 0.2, (reps, n))
    _agrees_with_compare(a, b, paired=True)
    _, low, high, _ = _paired_t(a, b)
    coverage = float(np.mean((low <= true_diff) & (true_diff <= high)))
    print(f"\npaired t interval, n={n}: coverage {coverage:.4f} over {reps} replications")
    assert abs(coverage - CONFIDENCE) <= _mc_error(CONFIDENCE, reps) + 0.005


@pytest.mark.parametrize("n", [3, 8])
def test_welch_interval_covers_at_the_nominal_rate_with_unequal_variances(n: int) -> None:
    """Welch–Satterthwaite interval: 95 % coverage with group sds 1 and 3 (variance ratio 9)."""
    reps, true_diff = 4000, -0.3
    rng = np.random.default_rng(200 + n)
    a = rng.normal(true_diff, 1.0, (reps, n))
    b = rng.normal(0.0, 3.0, (reps, n))
    _agrees_with_compare(a, b, paired=False)
    _, low, high, _ = _welch_t(a, b)
    coverage = float(np.mean((low <= true_diff) & (true_diff <= high)))
    print(f"\nWelch interval, n={n}: coverage {coverage:.4f} over {reps} replications")
    assert abs(coverage - CONFIDENCE) <= _mc_error(CONFIDENCE, reps) + 0.005


def test_pairing_by_seed_gains_power_when_seeds_are_correlated() -> None:
    """Seed effect sd 1, run noise sd 0.1, true difference 0.3, n = 5: paired t ~0.94 power, Welch ~0.07."""
    reps, n, true_diff, noise_sd = 4000, 5, 0.3, 0.1
    rng = np.random.default_rng(300)
    seed_effect = rng.normal(0, 1.0, (reps, n))
    a = true_diff + seed_effect + rng.normal(0, noise_sd, (reps, n))
    b = seed_effect + rng.normal(0, noise_sd, (reps, n))
    _agrees_with_compare(a, b, paired=True)
    _agrees_with_compare(a, b, paired=False)
    paired_power = float(np.mean(_paired_t(a, b)[3] < ALPHA))
    welch_power = float(np.mean(_welch_t(a, b)[3] < ALPHA))
    expected_paired = t_test_power(true_diff, noise_sd * math.sqrt(2), n, paired=True)
    # Unpaired, the seed effect is noise: per-group sd sqrt(1 + 0.01); Student's t bounds Welch's power above.
    expected_unpaired = t_test_power(true_diff, math.sqrt(1 + noise_sd**2), n, paired=False)
    print(f"\npower at n={n}: paired t {paired_power:.4f} (noncentral t {expected_paired:.4f}), "
          f"Welch {welch_power:.4f} (Student t, noncentral t {expected_unpaired:.4f})")
    assert paired_power > 0.8 and welch_power < 0.3
    assert abs(paired_power - expected_paired) <= _mc_error(expected_paired, reps)
    assert welch_power <= expected_unpaired + _mc_error(expected_unpaired, reps)


@pytest.mark.parametrize("paired", [True, False])
def test_seeds_for_power_reaches_the_power_at_n_and_not_at_n_minus_one(paired: bool) -> None:
    """Simulated t-test power at seeds_for_power's n is >= 0.8 and at n - 1 below it (within MC error)."""
    reps, target = 8000, 0.8
    rng = np.random.default_rng(400 + paired)
    if paired:  # differences of seed-paired runs: noise sd 0.1 each, so the differences have sd 0.1 * sqrt(2)
        true_diff, sd = 0.12, 0.1 * math.sqrt(2)
    else:  # two independent groups, sd 1 each
        true_diff, sd = 1.0, 1.0
    n = seeds_for_power(true_diff, sd, paired=paired, power=target, alpha=ALPHA)
    assert n is not None
    simulated = {}
    for m in (n - 1, n):
        if paired:
            seed_effect = rng.normal(0, 1.0, (reps, m))
            a = true_diff + seed_effect + rng.normal(0, 0.1, (reps, m))
            b = seed_effect + rng.normal(0, 0.1, (reps, m))
            p = _paired_t(a, b)[3]
        else:
            p = _pooled_t_p(rng.normal(true_diff, sd, (reps, m)), rng.normal(0, sd, (reps, m)))
        simulated[m] = float(np.mean(p < ALPHA))
        expected = t_test_power(true_diff, sd, m, paired=paired)
        assert abs(simulated[m] - expected) <= _mc_error(expected, reps)
    print(f"\nseeds_for_power(paired={paired}) = {n}: simulated power {simulated[n]:.4f} at n, "
          f"{simulated[n - 1]:.4f} at n - 1")
    assert simulated[n] >= target - _mc_error(target, reps)
    assert simulated[n - 1] < target + _mc_error(target, reps)


@pytest.mark.parametrize("paired", [True, False])
def test_holm_keeps_the_familywise_error_with_a_shared_baseline(paired: bool) -> None:
    """4 experiments vs one baseline, no true difference: Holm's FWER <= 0.05; uncorrected it is far above."""
    reps, n, k = 4000, 5, 4
    rng = np.random.default_rng(500 + paired)
    # Paired: runs of one seed share its effect. Either way the baseline's noise enters all four comparisons.
    values = _seeded((reps, 1, n), (reps, k + 1, n), 1.0, 0.2, rng) if paired else rng.normal(0, 1, (reps, k + 1, n))
    experiments, baseline = values[:, 1:, :], values[:, :1, :]
    test = _paired_t if paired else _welch_t
    _agrees_with_compare(experiments[:, 0, :], baseline[:, 0, :], paired=paired)
    p = test(experiments, np.broadcast_to(baseline, experiments.shape))[3]  # (reps, k)
    assert abs(np.corrcoef(p[:, 0], p[:, 1])[0, 1]) > 0.05  # the shared baseline correlates the tests
    fwer = float(np.mean([min(holm(list(row))) < ALPHA for row in p]))
    uncorrected = float(np.mean((p < ALPHA).any(axis=1)))
    print(f"\nHolm FWER ({'paired t' if paired else 'Welch t'}, k={k}, n={n}): {fwer:.4f}; "
          f"uncorrected {uncorrected:.4f}")
    assert fwer <= ALPHA + _mc_error(ALPHA, reps)
    assert uncorrected > 2 * ALPHA


def _stopping_rule_suites(
    values: np.ndarray, target: float, start: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stopping seed count and per-comparison paired p at that count, for suites values[s, 0=baseline|1..k, seed],
    with the schedule a suite follows: from ``start`` seeds, next what the widest interval needs at its spread
    (t quantile counted), at least one more and at most twice as many, until every half-width <= target."""
    suites, _, max_seeds = values.shape
    q = 0.5 + CONFIDENCE / 2
    t_over_root = np.array([np.inf, np.inf, *(sps.t.ppf(q, m - 1) / math.sqrt(m) for m in range(2, max_seeds + 1))])
    n = np.full(suites, start)
    stop = np.zeros(suites, dtype=int)
    p_at_stop = np.full((suites, values.shape[1] - 1), np.nan)
    while (undecided := stop == 0).any():
        for m in np.unique(n[undecided]):
            rows = np.flatnonzero(undecided & (n == m))
            _, low, high, p = _paired_t(values[rows, 1:, :m], values[rows, :1, :m])
            half = (high - low) / 2
            done = np.all(half <= target, axis=1) | (m == max_seeds)
            stop[rows[done]], p_at_stop[rows[done]] = m, p[done]
            sd = half * math.sqrt(m) / sps.t.ppf(q, m - 1)  # [rows, k]
            fits = t_over_root[None, None, :] * sd[..., None] <= target  # [rows, k, seeds]
            fits[..., : m + 1] = False
            need = np.where(fits.any(-1), fits.argmax(-1), max_seeds).max(axis=1)
            n[rows[~done]] = np.minimum(max_seeds, np.minimum(2 * m, np.maximum(m + 1, need)))[~done]
    return stop, p_at_stop


def test_the_precision_stopping_rule_keeps_the_false_positive_rate() -> None:
    """Add seeds in rounds from 3 until every half-width <= target (or 12 seeds), then paired t + Holm."""
    suites, k, start, max_seeds, target = 20000, 4, 3, 12, 0.15
    rng = np.random.default_rng(600)
    # No true difference; seed effect sd 1 shared by the 5 runs of a seed, run noise sd 0.1 (differences sd 0.14).
    values = _seeded((suites, 1, max_seeds), (suites, k + 1, max_seeds), 1.0, 0.1, rng)
    stop, p = _stopping_rule_suites(values, target, start)

    # The vectorised rule is the one a suite runs with compare() and next_seed_count().
    for s in range(20):
        n = start
        while True:
            comps = [compare(list(values[s, e, :n]), list(values[s, 0, :n]), paired=True, n_boot=0)
                     for e in range(1, k + 1)]
            following = next_seed_count(comps, n, target, max_seeds)
            if following == n:
                break
            n = following
        assert n == stop[s]
        assert [c.p for c in comps] == pytest.approx(list(p[s]), rel=1e-9)

    false_positive = float(np.mean([min(holm(list(row))) < ALPHA for row in p]))
    per_comparison = float(np.mean(p < ALPHA))
    counts = np.bincount(stop, minlength=max_seeds + 1)[start:]
    distribution = ", ".join(f"{n}: {c / suites:.3f}" for n, c in zip(range(start, max_seeds + 1), counts, strict=True))
    print(f"\nstopping rule (target {target}, {suites} suites): Holm false-positive rate {false_positive:.4f}, "
          f"unadjusted per comparison {per_comparison:.4f}; stopping n: {distribution}")
    assert np.count_nonzero(counts) >= 3 and counts.max() < 0.9 * suites  # the rule stops at varying n
    assert false_positive <= ALPHA + _mc_error(ALPHA, suites)
    # Stopping when the sd happens to be small leaves a small, bounded excess per comparison (about 0.5 points).
    assert per_comparison <= ALPHA + 0.01
