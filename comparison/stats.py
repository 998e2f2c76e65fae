"""Statistics over seeds: each variant's mean, standard deviation and 95% confidence interval per metric, and its
paired difference from a baseline variant.

Intervals are Student-t intervals over seeds, `mean +- t(0.975, n-1) * std / sqrt(n)` with the sample standard
deviation (n - 1 in the denominator): the seed-to-seed spread is the noise a comparison must see through, and
with 3 to 10 seeds the normal approximation (1.96) would be far too narrow (t(0.975, 2) = 4.30).

The difference from the baseline is a paired t-test over seeds: run s of a variant is paired with run s of the
baseline (same seed, so the same data order, initial head and dropout draws, and the same dev examples), and
the per-seed differences d_s are tested against zero, `t = mean(d) / (std(d) / sqrt(n))`, two-sided. Why this
rather than a paired bootstrap over dev examples: a bootstrap over the examples of a fixed set of trained
models answers whether *those weights* differ on other dev sets, and ignores the training randomness, which
published course projects measure as the larger effect (0.3-0.9 chrF between seeds); the question a comparison
asks is whether one training recipe beats another, which is what varies between seeds. It also works for any
metric as the task reports it (corpus chrF, macro-F1) without re-scoring resamples. It needs 2 or more seeds.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Optional, Sequence

from scipy.stats import t as student_t

LEVEL = 0.95


@dataclass(frozen=True)
class Summary:
    n: int
    mean: float
    std: Optional[float]  # sample standard deviation; None with one value
    low: Optional[float]  # the 95% t-interval of the mean; None with one value
    high: Optional[float]


@dataclass(frozen=True)
class Difference:
    n: int  # seeds present in both variants
    mean: float  # mean of the per-seed differences (variant - baseline)
    low: Optional[float]  # its 95% t-interval; None with fewer than 2 pairs
    high: Optional[float]
    p: Optional[float]  # two-sided paired t-test p-value; None with fewer than 2 pairs


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided critical value of Student's t with `df` degrees of freedom: 4.303 for df=2 at 95%."""
    return float(student_t.ppf(0.5 + level / 2, df))


def summarize(values: Sequence[float], level: float = LEVEL) -> Summary:
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summarize needs at least one value")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, None, None, None)
    std = statistics.stdev(values)
    half = t_quantile(n - 1, level) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def paired_difference(values: dict, baseline: dict, level: float = LEVEL) -> Optional[Difference]:
    """values, baseline: seed -> metric. The paired t-test of (values - baseline) over the seeds both have; None
    when they share none."""
    seeds = [s for s in values if s in baseline]
    if not seeds:
        return None
    diffs = [float(values[s]) - float(baseline[s]) for s in seeds]
    summary = summarize(diffs, level)
    if summary.n == 1:
        return Difference(1, summary.mean, None, None, None)
    if summary.std == 0:  # identical differences on every seed: no spread to test against
        return Difference(summary.n, summary.mean, summary.mean, summary.mean, 1.0 if summary.mean == 0 else 0.0)
    t = summary.mean / (summary.std / math.sqrt(summary.n))
    p = float(2 * student_t.sf(abs(t), summary.n - 1))
    return Difference(summary.n, summary.mean, summary.low, summary.high, p)


def median(values: Sequence[float]) -> Optional[float]:
    """The median, for timings and memory (robust to one slow or disturbed run); None when there are none."""
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None
