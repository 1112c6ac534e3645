"""Seed statistics against hand-computed and textbook values."""

from __future__ import annotations

import itertools
import math

import pytest

from ablate.stats import expected_max, holm, relative_change, summarize, welch_p


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
