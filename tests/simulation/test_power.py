"""Power analysis: cross-checked against statsmodels and inverted consistently."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from recsys.simulation.power import (
    MeanMetric,
    ProportionMetric,
    achieved_power,
    minimum_detectable_effect,
    sample_size_per_arm,
)

MEAN_CASES = [(2.0, 0.1, 0.05, 0.8, 1.0), (1.0, 0.03, 0.01, 0.9, 2.0), (5.0, 0.7, 0.1, 0.7, 0.5)]


@pytest.mark.parametrize(("std", "mde", "alpha", "power", "ratio"), MEAN_CASES)
def test_mean_sample_size_matches_statsmodels(
    std: float, mde: float, alpha: float, power: float, ratio: float
) -> None:
    sm = pytest.importorskip("statsmodels.stats.power")
    size = sample_size_per_arm(MeanMetric(std=std), mde, alpha=alpha, power=power, ratio=ratio)
    # statsmodels: nobs2 = ratio * nobs1; our ratio is n_treatment / n_control and sizes are for control.
    z_n = sm.NormalIndPower().solve_power(effect_size=mde / std, alpha=alpha, power=power, ratio=ratio)
    assert size.n_control == math.ceil(z_n)
    assert size.n_treatment == math.ceil(ratio * size.n_control)
    t_n = sm.TTestIndPower().solve_power(effect_size=mde / std, alpha=alpha, power=power, ratio=ratio)
    assert 0 <= t_n - size.n_control <= 3  # the t-test needs at most a couple more users at these sizes
    assert size.power >= power
    assert achieved_power(MeanMetric(std=std), mde, size.n_control - 1, alpha=alpha, ratio=ratio) < power


def test_mde_matches_statsmodels() -> None:
    sm = pytest.importorskip("statsmodels.stats.power")
    ref = sm.NormalIndPower().solve_power(effect_size=None, nobs1=5_000, alpha=0.05, power=0.8, ratio=1.0)
    assert minimum_detectable_effect(MeanMetric(std=3.0), 5_000) == pytest.approx(ref * 3.0, rel=1e-4)


def test_relative_mean_effect_uses_the_baseline_mean() -> None:
    rel = sample_size_per_arm(MeanMetric(std=2.0, mean=4.0), 0.05, relative=True)
    absolute = sample_size_per_arm(MeanMetric(std=2.0), 0.2)
    assert (rel.n_control, rel.effect) == (absolute.n_control, pytest.approx(0.2))


@pytest.mark.parametrize(("rate", "mde", "ratio"), [(0.05, 0.005, 1.0), (0.3, 0.02, 1.0), (0.1, 0.01, 3.0)])
def test_proportion_sample_size_matches_statsmodels(rate: float, mde: float, ratio: float) -> None:
    sm = pytest.importorskip("statsmodels.stats.proportion")
    size = sample_size_per_arm(ProportionMetric(rate=rate), mde, ratio=ratio)
    # statsmodels' sample 1 has rate prop2 + diff (our treatment) and nobs2 = ratio_sm * nobs1 (our control).
    n_treat = sm.samplesize_proportions_2indep_onetail(mde, rate, 0.8, ratio=1 / ratio, alpha=0.05)
    assert size.n_control == pytest.approx(n_treat / ratio, abs=1.0)
    sm_power = sm.power_proportions_2indep(
        mde, rate, size.n_treatment, ratio=size.n_control / size.n_treatment
    )
    assert sm_power.power == pytest.approx(size.power, abs=1e-3)


def test_mde_inverts_sample_size() -> None:
    metric = MeanMetric(std=3.0, mean=10.0)
    n = 5_000
    mde = minimum_detectable_effect(metric, n)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert mde == pytest.approx(z * 3.0 * math.sqrt(2 / n))
    assert minimum_detectable_effect(metric, n, relative=True) == pytest.approx(mde / 10.0)
    for m in (metric, ProportionMetric(rate=0.04)):
        eff = minimum_detectable_effect(m, n)
        assert achieved_power(m, eff, n) == pytest.approx(0.8, abs=1e-5)
        assert sample_size_per_arm(m, eff).n_control in (n, n + 1)
    rel = minimum_detectable_effect(ProportionMetric(rate=0.04), n, relative=True)
    assert rel == pytest.approx(minimum_detectable_effect(ProportionMetric(rate=0.04), n) / 0.04)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sample_size_per_arm(MeanMetric(std=1.0), 0.1, relative=True), "MeanMetric.mean"),
        (lambda: sample_size_per_arm(ProportionMetric(rate=0.9), 0.2), "rate \\+ effect"),
        (lambda: sample_size_per_arm(MeanMetric(std=1.0), 0.0), "effect"),
        (lambda: sample_size_per_arm(MeanMetric(std=1.0), 0.1, power=0.01), "power"),
        (lambda: sample_size_per_arm(MeanMetric(std=1.0), 0.1, ratio=0.0), "ratio"),
        (lambda: MeanMetric(std=-1.0), "std"),
        (lambda: ProportionMetric(rate=1.0), "rate"),
        (lambda: minimum_detectable_effect(MeanMetric(std=1.0), 1), "n_control"),
        (lambda: minimum_detectable_effect(ProportionMetric(rate=0.99), 3, power=0.99), "cannot reach"),
    ],
)
def test_power_input_errors(call, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()
