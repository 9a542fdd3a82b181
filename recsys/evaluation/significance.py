"""Seed summaries and paired significance tests; every result names the test it ran.

- ``summarize``: mean and sample standard deviation (ddof = 1) over seeds; the std of one seed is 0.
- ``paired_t_over_seeds``: scipy ``ttest_rel`` on one metric per seed, runs paired by seed.
- ``paired_tests_over_users``: for one seed, scipy ``wilcoxon`` (two-sided, zero differences dropped by
  the 'wilcox' rule) and ``ttest_rel`` on the per-user metric values, users paired.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class SeedSummary:
    mean: float
    std: float
    n: int

    def format(self, digits: int = 4) -> str:
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}"


def summarize(values: Sequence[float]) -> SeedSummary:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0:
        raise ValueError("summarize needs at least one value")
    std = float(arr.std(ddof=1)) if arr.size > 1 else 0.0
    return SeedSummary(float(arr.mean()), std, int(arr.size))


@dataclass(frozen=True)
class PairedTest:
    test: str  # e.g. "paired t-test over seeds"
    metric: str
    a: str
    b: str
    n: int
    mean_a: float
    mean_b: float
    statistic: float
    p_value: float

    @property
    def mean_diff(self) -> float:
        return self.mean_a - self.mean_b

    def format(self) -> str:
        p = "n/a" if math.isnan(self.p_value) else f"{self.p_value:.3g}"
        return (
            f"{self.a} vs {self.b}, {self.metric}: {self.mean_a:.4f} vs {self.mean_b:.4f} "
            f"(diff {self.mean_diff:+.4f}); {self.test}, n={self.n}, p={p}"
        )


def _paired(a: Sequence[float], b: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples must be 1-D and of equal length, got {x.shape} and {y.shape}")
    return x, y


def _ttest(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    d = x - y
    if len(d) < 2:
        return float("nan"), float("nan")
    if np.allclose(d, d[0]):  # constant differences: t is undefined (zero variance)
        return (0.0, 1.0) if d[0] == 0 else (math.copysign(math.inf, d[0]), 0.0)
    res = stats.ttest_rel(x, y)
    return float(res.statistic), float(res.pvalue)


def paired_t_over_seeds(
    a: Sequence[float], b: Sequence[float], *, metric: str, a_name: str, b_name: str
) -> PairedTest:
    """Paired t-test of model a against model b, one value per seed (same seeds, same order)."""
    x, y = _paired(a, b)
    statistic, p = _ttest(x, y)
    return PairedTest(
        "paired t-test over seeds",
        metric,
        a_name,
        b_name,
        len(x),
        float(x.mean()),
        float(y.mean()),
        statistic,
        p,
    )


def paired_tests_over_users(
    a: Sequence[float], b: Sequence[float], *, metric: str, a_name: str, b_name: str
) -> list[PairedTest]:
    """Wilcoxon signed-rank and paired t-test over users (one seed), per-user values aligned by user."""
    x, y = _paired(a, b)
    d = x - y
    if not np.any(d):
        w_stat, w_p = 0.0, 1.0
    else:
        res = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
        w_stat, w_p = float(res.statistic), float(res.pvalue)
    t_stat, t_p = _ttest(x, y)
    mean_a, mean_b = float(x.mean()), float(y.mean())
    return [
        PairedTest(
            "Wilcoxon signed-rank over users", metric, a_name, b_name, len(x), mean_a, mean_b, w_stat, w_p
        ),
        PairedTest("paired t-test over users", metric, a_name, b_name, len(x), mean_a, mean_b, t_stat, t_p),
    ]
