"""comparison/stats.py against values computed by hand (closed forms of Student's t with 2 degrees of freedom:
two-sided p = 1 - |t| / sqrt(t^2 + 2), critical value (2a - 1) / sqrt(2a(1 - a)) at a = 0.975)."""
from __future__ import annotations

import math

import pytest

from comparison.stats import median, paired_difference, summarize, t_quantile

T2 = 0.95 / math.sqrt(2 * 0.975 * 0.025)  # 4.3027


def test_t_quantiles():
    assert t_quantile(2) == pytest.approx(T2, rel=1e-9) == pytest.approx(4.3027, abs=1e-4)
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4)  # tan(pi * 0.475)
    assert t_quantile(1) == pytest.approx(math.tan(math.pi * 0.475), rel=1e-9)
    assert t_quantile(10_000) == pytest.approx(1.95996, abs=1e-3)


def test_mean_std_and_t_interval_of_three_seeds():
    s = summarize([0.30, 0.34, 0.32])
    # mean 0.32; deviations -0.02, 0.02, 0 -> variance 0.0008 / 2 = 0.0004, std 0.02
    assert (s.n, s.mean, s.std) == (3, pytest.approx(0.32), pytest.approx(0.02))
    half = T2 * 0.02 / math.sqrt(3)  # 0.049683
    assert (s.low, s.high) == (pytest.approx(0.32 - half), pytest.approx(0.32 + half))
    assert half == pytest.approx(0.049683, abs=1e-6)


def test_one_seed_has_a_mean_and_no_spread():
    s = summarize([0.5])
    assert (s.n, s.mean, s.std, s.low, s.high) == (1, 0.5, None, None, None)
    with pytest.raises(ValueError, match="at least one value"):
        summarize([])


def test_paired_difference_pairs_by_seed():
    variant = {1: 0.5, 2: 0.7, 3: 0.9, 4: 0.1}  # seed 4: no baseline run, so not paired
    baseline = {1: 0.4, 2: 0.5, 3: 0.6}
    d = paired_difference(variant, baseline)
    # differences 0.1, 0.2, 0.3: mean 0.2, std 0.1, t = 0.2 / (0.1 / sqrt 3) = 3.4641
    assert (d.n, d.mean) == (3, pytest.approx(0.2))
    t = 0.2 / (0.1 / math.sqrt(3))
    assert d.p == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-6) == pytest.approx(0.07418, abs=1e-5)
    half = T2 * 0.1 / math.sqrt(3)
    assert (d.low, d.high) == (pytest.approx(0.2 - half), pytest.approx(0.2 + half))


def test_paired_difference_edge_cases():
    assert paired_difference({1: 0.5}, {2: 0.5}) is None
    one = paired_difference({1: 0.5}, {1: 0.25})
    assert (one.n, one.mean, one.low, one.p) == (1, 0.25, None, None)
    same = paired_difference({1: 0.5, 2: 0.6}, {1: 0.5, 2: 0.6})
    assert (same.mean, same.p) == (0.0, 1.0)
    shifted = paired_difference({1: 0.75, 2: 0.5}, {1: 0.5, 2: 0.25})  # exact in binary: both differences 0.25
    assert (shifted.mean, shifted.low, shifted.p) == (0.25, 0.25, 0.0)


def test_median_skips_missing_values():
    assert median([3.0, None, 1.0, 2.0]) == 2.0 and median([4, 1]) == 2.5 and median([None]) is None
