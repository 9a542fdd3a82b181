"""A/B statistics: validated by simulation (A/A error rates, planted effects, CUPED, SRM) and by scipy."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from recsys.simulation.power import MeanMetric, ProportionMetric, sample_size_per_arm
from recsys.simulation.stats import (
    ABTestConfig,
    Moments,
    arm_metrics,
    assign_arm,
    compare_arms,
    cuped,
    msprt,
    running_welch_p_values,
    srm_check,
    user_metrics,
    welch_from_moments,
    welch_test,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
ALPHA = 0.05
RUNS = 200


def band(p: float, runs: int = RUNS, level: float = 0.99) -> tuple[float, float]:
    """Binomial `level` interval of a rejection rate over `runs` independent experiments."""
    lo, hi = sps.binom.interval(level, runs, p)
    return lo / runs, hi / runs


def last(m: Moments) -> Moments:
    return Moments(m.n[..., -1], m.mean[..., -1], m.var[..., -1])


# ---------------------------------------------------------------------------------------------------------
# Assignment
# ---------------------------------------------------------------------------------------------------------


# Pinned: a change of hash, key format or bucketing would silently move running experiments' users.
PINNED_EXP1 = "ctccttcttt"  # users 0..9, arms ["control", "treatment"], salt "exp-1"


def test_assign_arm_is_pinned_and_the_same_in_another_process() -> None:
    arms = assign_arm(np.arange(10, dtype=np.int64), ["control", "treatment"], salt="exp-1")
    assert "".join(a[0] for a in arms) == PINNED_EXP1
    code = (
        "from recsys.simulation.stats import assign_arm;"
        "print(','.join(assign_arm(list(range(10)), ['control', 'treatment'], salt='exp-1')))"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip().split(",") == list(arms)


def test_assign_arm_follows_weights_salt_and_id_type() -> None:
    ids = np.arange(100_000)
    arms = assign_arm(ids, ["a", "b", "c"], weights=[0.2, 0.3, 0.5], salt="s")
    counts = {a: int((arms == a).sum()) for a in "abc"}
    assert not srm_check(counts, {"a": 0.2, "b": 0.3, "c": 0.5}).flagged
    assert abs(counts["a"] / 100_000 - 0.2) < 0.005
    other = assign_arm(ids, ["a", "b", "c"], weights=[0.2, 0.3, 0.5], salt="t")
    assert 0.4 < np.mean(arms != other) < 0.8  # a new salt re-randomises
    assert (
        list(assign_arm([5, np.int64(5), "5"], ["x", "y"], salt="s"))
        == [assign_arm([5], ["x", "y"], salt="s")[0]] * 3
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"arms": []}, "arms"),
        ({"arms": ["a", "a"]}, "arms"),
        ({"arms": ["a", "b"], "weights": [1.0]}, "weights"),
        ({"arms": ["a", "b"], "weights": [1.0, 0.0]}, "weights"),
    ],
)
def test_assign_arm_rejects_bad_design(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        assign_arm([1, 2, 3], **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Per-user and per-arm aggregates
# ---------------------------------------------------------------------------------------------------------


def _impressions() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "user_id": [1, 1, 1, 2, 2, 3],
            "arm": ["c", "c", "c", "t", "t", "t"],
            "click": [True, False, True, False, False, True],
            "like": [True, False, False, False, False, False],
            "dwell": [10.0, None, 5.0, None, None, 2.0],
        }
    )


def test_user_metrics_aggregates_per_user() -> None:
    users = user_metrics(_impressions())
    assert users["user_id"].to_list() == [1, 2, 3]
    assert users["impressions"].to_list() == [3, 2, 1]
    assert users["clicks"].to_list() == [2.0, 0.0, 1.0]
    assert users["likes"].to_list() == [1.0, 0.0, 0.0]
    assert users["dwell"].to_list() == [15.0, 0.0, 2.0]
    assert users["ctr"].to_list() == pytest.approx([2 / 3, 0.0, 1.0])
    assert "likes" not in user_metrics(_impressions().drop("like")).columns  # not logged is not zero
    per_arm = arm_metrics(users, ["clicks"])
    t = per_arm.filter(pl.col("arm") == "t").row(0, named=True)
    assert (t["n_users"], t["mean"]) == (2, 0.5)
    assert t["std"] == pytest.approx(math.sqrt(0.5))
    assert t["se"] == pytest.approx(0.5)


def test_user_metrics_rejects_a_user_in_two_arms() -> None:
    bad = _impressions().with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(pl.lit("t")).otherwise(pl.col("arm")).alias("arm")
    )
    with pytest.raises(ValueError, match="arm: 1 user"):
        user_metrics(bad)
    with pytest.raises(ValueError, match="missing column"):
        user_metrics(_impressions().drop("click"))


# ---------------------------------------------------------------------------------------------------------
# Welch
# ---------------------------------------------------------------------------------------------------------


def test_welch_matches_scipy_and_the_delta_method_lift() -> None:
    rng = np.random.default_rng(1)
    t, c = rng.exponential(2.2, 700), rng.exponential(2.0, 500)
    est = welch_test(t, c)
    ref = sps.ttest_ind(t, c, equal_var=False)
    ci = ref.confidence_interval(0.95)
    assert est.t == pytest.approx(float(ref.statistic))
    assert est.p_value == pytest.approx(float(ref.pvalue))
    assert (est.ci_low, est.ci_high) == pytest.approx((float(ci.low), float(ci.high)))
    assert est.lift == pytest.approx(t.mean() / c.mean() - 1)
    # Delta method against a large bootstrap of the ratio of means.
    boot = rng.choice(t, (4000, t.size)).mean(1) / rng.choice(c, (4000, c.size)).mean(1) - 1
    assert est.lift_se == pytest.approx(boot.std(), rel=0.08)


def test_welch_batch_equals_one_by_one() -> None:
    rng = np.random.default_rng(2)
    t, c = rng.normal(0, 1, (5, 50)), rng.normal(0, 2, (5, 60))
    batch = welch_test(t, c)
    for r in range(5):
        assert batch.p_value[r] == pytest.approx(welch_test(t[r], c[r]).p_value)


def test_welch_on_constant_arms() -> None:
    assert welch_test(np.ones(5), np.ones(4)).p_value == 1.0
    assert welch_test(np.full(5, 2.0), np.ones(4)).p_value == 0.0


def test_aa_welch_rejects_at_alpha_and_a_planted_effect_at_the_designed_power() -> None:
    rng = np.random.default_rng(11)
    n = 1_000
    aa = welch_test(rng.exponential(2.0, (RUNS, n)), rng.exponential(2.0, (RUNS, n)))
    lo, hi = band(ALPHA)
    assert lo <= np.mean(aa.significant) <= hi

    # Mean metric (exponential, mean 2): a +5% lift sized for 80% power. An exponential's std is its mean,
    # so the lift raises the treatment's std to 2.1: the design uses the arms' root-mean-square std.
    metric = MeanMetric(std=math.sqrt((2.0**2 + 2.1**2) / 2), mean=2.0)
    size = sample_size_per_arm(metric, 0.05, relative=True, power=0.8)
    t = rng.exponential(2.0 * 1.05, (RUNS, size.n_treatment))
    c = rng.exponential(2.0, (RUNS, size.n_control))
    lo, hi = band(0.8)
    assert lo <= np.mean(welch_test(t, c).significant) <= hi

    # Proportion metric (conversion 5%): a +10% relative lift, from binomial counts per run.
    prop = ProportionMetric(rate=0.05)
    size = sample_size_per_arm(prop, 0.10, relative=True, power=0.8)
    kt = rng.binomial(size.n_treatment, 0.055, RUNS)
    kc = rng.binomial(size.n_control, 0.05, RUNS)
    res = welch_from_moments(Moments.of_binary(kt, size.n_treatment), Moments.of_binary(kc, size.n_control))
    assert lo <= np.mean(res.significant) <= hi


# ---------------------------------------------------------------------------------------------------------
# CUPED
# ---------------------------------------------------------------------------------------------------------


def _correlated(
    rng: np.random.Generator, rho: float, shape: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    x = rng.normal(0.0, 1.0, shape)
    y = 3.0 + rho * x + math.sqrt(1 - rho * rho) * rng.normal(0.0, 1.0, shape)
    return y, x


@pytest.mark.parametrize("rho", [0.3, 0.6, 0.9])
def test_cuped_variance_reduction_matches_rho_squared(rho: float) -> None:
    rng = np.random.default_rng(int(rho * 100))
    yt, xt = _correlated(rng, rho, (40_000,))
    yc, xc = _correlated(rng, rho, (40_000,))
    res = cuped(yt + 0.1, yc, xt, xc)
    assert 1 - res.variance_reduction == pytest.approx(1 - rho**2, abs=0.015)
    assert res.theta == pytest.approx(rho, abs=0.02)
    assert res.adjusted.ci_low <= 0.1 <= res.adjusted.ci_high
    assert res.adjusted.se < res.unadjusted.se


def test_cuped_aa_keeps_alpha() -> None:
    rng = np.random.default_rng(5)
    yt, xt = _correlated(rng, 0.7, (RUNS, 500))
    yc, xc = _correlated(rng, 0.7, (RUNS, 500))
    res = cuped(yt, yc, xt, xc)
    lo, hi = band(ALPHA)
    assert lo <= np.mean(res.adjusted.significant) <= hi
    assert np.mean(res.variance_reduction) == pytest.approx(0.49, abs=0.02)


def test_cuped_input_errors() -> None:
    with pytest.raises(ValueError, match="treatment_covariate"):
        cuped(np.ones(5), np.ones(5), np.ones(4), np.ones(5))
    with pytest.raises(ValueError, match="control_covariate"):
        cuped(np.ones(5), np.ones(5), np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="constant"):
        cuped(np.arange(5.0), np.arange(5.0), np.ones(5), np.ones(5))


# ---------------------------------------------------------------------------------------------------------
# mSPRT
# ---------------------------------------------------------------------------------------------------------


def test_msprt_matches_johari_formula_at_one_look() -> None:
    # Equal arms of n users with known variance: Lambda = sqrt(2s2/(2s2 + n tau2))
    #   * exp(n^2 tau2 d^2 / (4 s2 (2 s2 + n tau2)))  (Johari et al. 2017, two-sample normal case).
    n, s2, tau2, d = 400.0, 1.5, 0.02, 0.21
    res = msprt(
        Moments(np.array([n]), np.array([1.0 + d]), np.array([s2])),
        Moments(np.array([n]), np.array([1.0]), np.array([s2])),
        tau2=tau2,
    )
    lam = math.sqrt(2 * s2 / (2 * s2 + n * tau2)) * math.exp(
        n * n * tau2 * d * d / (4 * s2 * (2 * s2 + n * tau2))
    )
    assert res.p_value[0] == pytest.approx(min(1.0, 1.0 / lam))


def test_aa_peeking_msprt_stays_valid_while_naive_t_test_peeking_inflates() -> None:
    rng = np.random.default_rng(7)
    n_arrivals = 4_000
    values = rng.exponential(2.0, (RUNS, n_arrivals))
    in_t = rng.random((RUNS, n_arrivals)) < 0.5
    mt, mc = Moments.running(values, in_t), Moments.running(values, ~in_t)  # a look after every arrival
    seq = msprt(mt, mc, tau2=0.04, burn_in=100)
    assert np.all(np.diff(seq.p_value, axis=-1) <= 0)  # non-increasing by construction
    # The always-valid CI only ever shrinks.
    assert np.all(seq.ci_low[:, 1:] >= seq.ci_low[:, :-1]) and np.all(
        seq.ci_high[:, 1:] <= seq.ci_high[:, :-1]
    )
    _, hi = band(ALPHA)
    assert np.mean(seq.p_value[:, -1] <= ALPHA) <= hi  # final look
    assert np.mean(seq.rejected) <= hi  # stopping at the first look with p <= alpha
    # 0 is outside the always-valid CI exactly when the always-valid p-value is below alpha.
    outside = (seq.ci_low > 0) | (seq.ci_high < 0)
    assert np.mean(outside == (seq.p_value < ALPHA)) > 0.999

    naive = running_welch_p_values(mt, mc, burn_in=100)
    naive_rate = np.mean((naive <= ALPHA).any(axis=-1))
    assert naive_rate > 3 * ALPHA  # peeking at a fixed-horizon test: type I error several times alpha
    assert np.mean(welch_from_moments(last(mt), last(mc)).significant) <= hi  # fine if looked at once


def test_msprt_detects_a_real_effect_and_covers_it() -> None:
    rng = np.random.default_rng(8)
    n_arrivals = 4_000
    in_t = rng.random((RUNS, n_arrivals)) < 0.5
    values = rng.exponential(2.0, (RUNS, n_arrivals)) + np.where(in_t, 0.4, 0.0)
    seq = msprt(Moments.running(values, in_t), Moments.running(values, ~in_t), tau2=0.04, burn_in=100)
    assert np.mean(seq.rejected) > 0.8
    assert np.all(seq.first_rejection[seq.rejected] >= 0)
    assert np.mean((seq.ci_low[:, -1] <= 0.4) & (seq.ci_high[:, -1] >= 0.4)) >= 1 - band(ALPHA)[1]


def test_msprt_and_running_moments_input_errors() -> None:
    m = Moments.running(np.arange(10.0), np.arange(10) % 2 == 0, looks=[4, 10])
    assert m.n.tolist() == [2.0, 5.0]
    assert m.mean.tolist() == pytest.approx([1.0, 4.0])
    assert m.var[-1] == pytest.approx(np.var([0, 2, 4, 6, 8], ddof=1))
    with pytest.raises(ValueError, match="in_arm"):
        Moments.running(np.arange(10.0), np.ones(9, dtype=bool))
    with pytest.raises(ValueError, match="looks"):
        Moments.running(np.arange(10.0), np.ones(10, dtype=bool), looks=[5, 3])
    with pytest.raises(ValueError, match="tau2"):
        msprt(m, m, tau2=0.0)
    with pytest.raises(ValueError, match="msprt_tau2"):
        ABTestConfig(msprt_tau2={"clicks": -1.0})
    with pytest.raises(ValueError, match="msprt_tau2 has no mixing variance for metric 'dwell'"):
        ABTestConfig(msprt_tau2={"clicks": 0.01}).tau2_for("dwell")


# ---------------------------------------------------------------------------------------------------------
# SRM
# ---------------------------------------------------------------------------------------------------------


def test_srm_flags_52_48_on_100k_and_passes_a_correct_split() -> None:
    design = {"control": 0.5, "treatment": 0.5}
    bad = srm_check({"control": 52_000, "treatment": 48_000}, design)
    assert bad.flagged and bad.p_value < 1e-30
    arms = assign_arm(np.arange(100_000), ["control", "treatment"], salt="srm")
    good = srm_check({a: int((arms == a).sum()) for a in design}, design)
    assert not good.flagged
    assert good.chi2 == pytest.approx(sps.chisquare(list(good.observed)).statistic)
    assert srm_check({"control": 0, "treatment": 1_000}, design).flagged  # an empty arm is a mismatch


def test_srm_input_errors() -> None:
    with pytest.raises(ValueError, match="differ from the design"):
        srm_check({"control": 10}, {"control": 0.5, "treatment": 0.5})
    with pytest.raises(ValueError, match="0 users in total"):
        srm_check({"control": 0, "treatment": 0}, {"control": 0.5, "treatment": 0.5})
    with pytest.raises(ValueError, match="design"):
        srm_check({"control": 1, "treatment": 1}, {"control": 0.5, "treatment": -0.5})


# ---------------------------------------------------------------------------------------------------------
# compare_arms and input errors
# ---------------------------------------------------------------------------------------------------------


def test_compare_arms_reports_welch_and_cuped_rows() -> None:
    rng = np.random.default_rng(4)
    y, x = _correlated(rng, 0.8, (2_000,))
    arm = np.where(np.arange(2_000) % 2 == 0, "control", "treatment")
    users = pl.DataFrame({"arm": arm, "clicks": y + (arm == "treatment") * 0.1, "pre_clicks": x, "dwell": x})
    metrics, covariates = ["clicks", "dwell"], {"clicks": "pre_clicks"}
    out = compare_arms(
        users, control="control", treatment="treatment", metrics=metrics, covariates=covariates
    )
    clicks = out.filter(pl.col("metric") == "clicks").row(0, named=True)
    direct = cuped(
        y[arm == "treatment"] + 0.1, y[arm == "control"], x[arm == "treatment"], x[arm == "control"]
    )
    assert clicks["cuped"] and clicks["diff"] == pytest.approx(direct.adjusted.diff)
    assert clicks["variance_reduction"] == pytest.approx(direct.variance_reduction)
    dwell = out.filter(pl.col("metric") == "dwell").row(0, named=True)
    assert not dwell["cuped"] and dwell["p_value"] == pytest.approx(
        welch_test(x[arm == "treatment"], x[arm == "control"]).p_value
    )
    assert (clicks["n_control"], clicks["n_treatment"]) == (1_000, 1_000)


def test_zero_user_arm_and_bad_values_are_named() -> None:
    users = pl.DataFrame({"arm": ["control"] * 5, "clicks": [1.0, 2.0, 3.0, 4.0, 5.0]})
    with pytest.raises(ValueError, match="arm 'treatment' has 0 user"):
        compare_arms(users, control="control", treatment="treatment", metrics=["clicks"])
    with pytest.raises(ValueError, match="treatment has 0 user"):
        welch_test(np.array([]), np.ones(5))
    with pytest.raises(ValueError, match="control contains NaN"):
        welch_test(np.ones(5), np.array([1.0, np.nan, 2.0]))
    with pytest.raises(ValueError, match="successes"):
        Moments.of_binary(3, 0)
    with pytest.raises(ValueError, match="missing column"):
        compare_arms(users, control="control", treatment="treatment", metrics=["dwell"])
