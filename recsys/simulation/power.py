"""Power analysis for a two-arm test: users per arm for a minimum detectable effect, and the inverse.

OPEN choices from the spec and what was picked:

- Two-sided z-test approximation (what ``stats.welch_test`` converges to at A/B sample sizes); both tails
  count towards the power, as in statsmodels' ``NormalIndPower``.
- Mean metric: the same per-user standard deviation in both arms. Proportion metric: the variance under the
  null uses the pooled rate, under the alternative each arm's own rate (the textbook formula, and
  statsmodels' ``samplesize_proportions_2indep_onetail``).
- ``ratio`` is ``n_treatment / n_control``; sizes are for the control arm, the treatment arm is
  ``ceil(ratio * n_control)``. A relative MDE is relative to the control mean / rate, and for a proportion
  the MDE is taken upwards (the rate rises by the effect).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import optimize, stats


@dataclass(frozen=True)
class MeanMetric:
    """A per-user mean metric: its standard deviation across users (and its mean, for relative effects)."""

    std: float
    mean: float | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.std) and self.std > 0):
            raise ValueError(f"std must be finite and > 0, got {self.std}")
        if self.mean is not None and not math.isfinite(self.mean):
            raise ValueError(f"mean must be finite, got {self.mean}")


@dataclass(frozen=True)
class ProportionMetric:
    """A per-user 0/1 metric (converted or not) with its baseline (control) rate."""

    rate: float

    def __post_init__(self) -> None:
        if not 0 < self.rate < 1:
            raise ValueError(f"rate must be in (0, 1), got {self.rate}")


Metric = MeanMetric | ProportionMetric


@dataclass(frozen=True)
class SampleSize:
    n_control: int
    n_treatment: int
    effect: float  # absolute effect (difference of means / rates) the sizes are for
    power: float  # power actually achieved at these (rounded-up) sizes
    alpha: float

    @property
    def total(self) -> int:
        return self.n_control + self.n_treatment


def _check(alpha: float, ratio: float, power: float | None = None) -> None:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if power is not None and not alpha < power < 1:
        raise ValueError(f"power must be in (alpha, 1) = ({alpha}, 1), got {power}")
    if not (math.isfinite(ratio) and ratio > 0):
        raise ValueError(f"ratio (n_treatment / n_control) must be finite and > 0, got {ratio}")


def _absolute(metric: Metric, effect: float, relative: bool) -> float:
    if not (math.isfinite(effect) and effect != 0):
        raise ValueError(f"effect must be finite and non-zero, got {effect}")
    if not relative:
        delta = effect
    elif isinstance(metric, ProportionMetric):
        delta = effect * metric.rate
    else:
        if metric.mean is None or metric.mean == 0:
            raise ValueError("a relative effect on a MeanMetric needs its non-zero mean (MeanMetric.mean)")
        delta = effect * abs(metric.mean)
    if isinstance(metric, ProportionMetric) and not 0 < metric.rate + delta < 1:
        raise ValueError(f"rate + effect = {metric.rate + delta:g} must stay in (0, 1)")
    return delta


def _stds(metric: Metric, delta: float, ratio: float) -> tuple[float, float]:
    """Standard deviations (times sqrt(n_control)) of the difference under the null and the alternative."""
    if isinstance(metric, MeanMetric):
        s = metric.std * math.sqrt(1.0 + 1.0 / ratio)
        return s, s
    pc, pt = metric.rate, metric.rate + delta
    pooled = (pc + ratio * pt) / (1.0 + ratio)
    null = math.sqrt(pooled * (1.0 - pooled) * (1.0 + 1.0 / ratio))
    alt = math.sqrt(pc * (1.0 - pc) + pt * (1.0 - pt) / ratio)
    return null, alt


def _power(metric: Metric, delta: float, n_control: float, alpha: float, ratio: float) -> float:
    s0, s1 = _stds(metric, delta, ratio)
    z = stats.norm.ppf(1.0 - alpha / 2.0)
    root = math.sqrt(n_control)
    return float(
        stats.norm.cdf((abs(delta) * root - z * s0) / s1) + stats.norm.cdf((-abs(delta) * root - z * s0) / s1)
    )


def achieved_power(
    metric: Metric,
    effect: float,
    n_control: int,
    *,
    relative: bool = False,
    alpha: float = 0.05,
    ratio: float = 1.0,
) -> float:
    """Probability that a two-sided test at ``alpha`` detects ``effect`` with these arm sizes."""
    _check(alpha, ratio)
    if n_control < 2:
        raise ValueError(f"n_control must be >= 2, got {n_control}")
    return _power(metric, _absolute(metric, effect, relative), n_control, alpha, ratio)


def sample_size_per_arm(
    metric: Metric,
    mde: float,
    *,
    relative: bool = False,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
) -> SampleSize:
    """Users per arm to detect ``mde`` (absolute, or relative to the baseline) with ``power`` at ``alpha``."""
    _check(alpha, ratio, power)
    delta = _absolute(metric, mde, relative)
    s0, s1 = _stds(metric, delta, ratio)
    z_a, z_b = stats.norm.ppf(1.0 - alpha / 2.0), stats.norm.ppf(power)
    n = max(2, math.ceil(((z_a * s0 + z_b * s1) / abs(delta)) ** 2))
    return SampleSize(n, max(2, math.ceil(ratio * n)), delta, _power(metric, delta, n, alpha, ratio), alpha)


def minimum_detectable_effect(
    metric: Metric,
    n_control: int,
    *,
    relative: bool = False,
    alpha: float = 0.05,
    power: float = 0.8,
    ratio: float = 1.0,
) -> float:
    """The smallest (positive) effect detected with ``power`` at ``alpha`` given ``n_control`` users.

    Returned as an absolute difference, or relative to the baseline mean / rate when ``relative``.
    """
    _check(alpha, ratio, power)
    if n_control < 2:
        raise ValueError(f"n_control must be >= 2, got {n_control}")
    z_a, z_b = stats.norm.ppf(1.0 - alpha / 2.0), stats.norm.ppf(power)
    if isinstance(metric, MeanMetric):
        delta = (z_a + z_b) * _stds(metric, 0.0, ratio)[0] / math.sqrt(n_control)
        if relative:
            if metric.mean is None or metric.mean == 0:
                raise ValueError("a relative MDE on a MeanMetric needs its non-zero mean (MeanMetric.mean)")
            return delta / abs(metric.mean)
        return delta
    # Proportion: the variance depends on the effect, so solve power(delta) = target numerically.
    hi = (1.0 - metric.rate) * (1.0 - 1e-9)
    if _power(metric, hi, n_control, alpha, ratio) < power:
        raise ValueError(f"n_control = {n_control} cannot reach power {power} for any rate increase")
    delta = optimize.brentq(
        lambda d: _power(metric, d, n_control, alpha, ratio) - power, 1e-12, hi, xtol=1e-12
    )
    return delta / metric.rate if relative else delta
