"""A/B statistics on per-user aggregates: assignment, Welch and CUPED estimates, mSPRT, SRM.

The unit of analysis is the user: users are assigned to arms by a stable hash of their id
(``assign_arm``), every metric is first aggregated per user (``user_metrics``), and each estimate treats
the users of an arm as independent draws. All functions are pure (numpy arrays / Polars frames in, frozen
dataclasses or frames out); the simulator and the dashboard call them.

OPEN choices from the spec and what was picked:

- Hash: BLAKE2b (8-byte digest) of ``"{salt}\\x1f{user_id}"``, read as an unsigned 64-bit integer and mapped
  to [0, 1); arm k owns the k-th slice of the cumulative weights. ``hashlib`` is deterministic across
  processes and Python versions (``hash()`` is not: it is salted per process).
- Fixed-horizon test: Welch's unequal-variance t-test (no equal-variance assumption between arms); relative
  lift ``mean_t / mean_c - 1`` with a delta-method standard error and a normal interval.
- CUPED: ``theta = cov(Y, X) / var(X)`` from the within-arm centred data pooled over both arms (a treatment
  effect on Y's mean then cannot leak into theta); ``Y - theta * (X - mean(X))`` with the overall mean of X,
  so the adjusted arm means stay on Y's scale. The uncertainty of theta itself is ignored (O(1/n)).
- Sequential test: the two-sample normal-mixture mSPRT of Johari, Pekelis & Walsh (2017) with the plug-in
  variance ``V = s_t^2 / n_t + s_c^2 / n_c`` at every look and a N(theta0, tau^2) mixture over the effect;
  p-values are the running minimum of ``1 / Lambda`` (always valid, non-increasing) and the always-valid
  confidence interval is the running intersection of ``{theta : Lambda(theta) < 1 / alpha}``. ``tau^2`` is in
  the metric's own squared units, so ``ABTestConfig.msprt_tau2`` holds one value per metric. Looks before
  ``burn_in`` users per arm are skipped (p stays 1): early plug-in variances are too noisy to trust.
- SRM: Pearson chi-square goodness of fit of the arm user counts to the designed split, flagged at
  ``p < 0.001``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields

import numpy as np
import numpy.typing as npt
import polars as pl
from pydantic import Field, field_validator
from scipy import stats

from recsys.core.config import FrozenModel

FloatArray = npt.NDArray[np.float64]
Number = float | FloatArray  # a float for one experiment, an array for a batch of experiments or looks


class ABTestConfig(FrozenModel):
    """Knobs of the A/B analysis (the simulator passes them to the functions below)."""

    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="Two-sided significance level of tests and CIs.")
    srm_threshold: float = Field(
        0.001, gt=0.0, lt=1.0, description="Flag an SRM when the chi-square p < this."
    )
    msprt_tau2: dict[str, float] = Field(
        default_factory=dict,
        description="mSPRT mixing variance per metric, in the metric's squared units (roughly the squared "
        "effect one hopes to detect).",
    )
    msprt_burn_in: int = Field(100, ge=2, description="Users per arm before the mSPRT starts updating.")

    @field_validator("msprt_tau2")
    @classmethod
    def _positive_tau2(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"msprt_tau2 values must be finite and > 0, got {bad}")
        return value

    def tau2_for(self, metric: str) -> float:
        if metric not in self.msprt_tau2:
            raise ValueError(f"msprt_tau2 has no mixing variance for metric {metric!r}")
        return self.msprt_tau2[metric]


# ----------------------------------------------------------------------------------------------------------
# Assignment
# ----------------------------------------------------------------------------------------------------------


def _weights(arms: Sequence[str], weights: Sequence[float] | None, field: str = "weights") -> FloatArray:
    if len(arms) == 0:
        raise ValueError("arms must name at least one arm")
    if len(set(arms)) != len(arms):
        raise ValueError(f"arms must be unique, got {list(arms)}")
    w = np.ones(len(arms)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(arms),):
        raise ValueError(f"{field} must have one value per arm ({len(arms)}), got shape {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise ValueError(f"{field} must be finite and > 0, got {w.tolist()}")
    return w / w.sum()


def _unit_interval_hash(user_id: object, salt: str) -> int:
    key = str(int(user_id)) if isinstance(user_id, (int, np.integer)) else str(user_id)
    return int.from_bytes(hashlib.blake2b(f"{salt}\x1f{key}".encode(), digest_size=8).digest(), "big")


def assign_arm(
    user_ids: npt.ArrayLike, arms: Sequence[str], weights: Sequence[float] | None = None, salt: str = ""
) -> npt.NDArray[np.str_]:
    """The arm of each user: a stable hash of (salt, user id) bucketed by the cumulative weights.

    The same (salt, user id) always lands in the same arm, in any process; a new salt re-randomises.
    Integer ids hash by their decimal text, so ``5``, ``np.int64(5)`` and ``"5"`` share an arm.
    """
    w = _weights(arms, weights)
    ids = np.asarray(user_ids)
    if ids.ndim != 1:
        raise ValueError(f"user_ids must be 1-D, got shape {ids.shape}")
    h = np.fromiter((_unit_interval_hash(u, salt) for u in ids.tolist()), dtype=np.uint64, count=ids.size)
    u = h.astype(np.float64) / 2.0**64
    edges = np.cumsum(w)[:-1]
    return np.asarray(arms)[np.searchsorted(edges, u, side="right")]


# ----------------------------------------------------------------------------------------------------------
# Per-user and per-arm aggregates
# ----------------------------------------------------------------------------------------------------------


def _require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; it has {frame.columns}")


def user_metrics(impressions: pl.DataFrame, *, arm_col: str = "arm") -> pl.DataFrame:
    """Per-user aggregates of an impressions log (data contract columns plus the arm of each row).

    Returns one row per user: the sums ``impressions, clicks`` (and ``likes, dwell`` when the log has them)
    and ``ctr``, the user's own clicks / impressions (so the mean of ``ctr`` weighs users equally). A user
    seen in two arms means the assignment is broken, which is an error, not something to average over.
    """
    _require_columns(impressions, ["user_id", arm_col, "click"], "impressions")
    optional = []  # like/dwell only when logged: a missing column must not read as zero likes
    if "like" in impressions.columns:
        optional.append(pl.col("like").cast(pl.Float64).sum().alias("likes"))
    if "dwell" in impressions.columns:
        optional.append(pl.col("dwell").fill_null(0.0).sum().alias("dwell"))  # dwell is NULL without a click
    users = (
        impressions.group_by("user_id")
        .agg(
            pl.col(arm_col).n_unique().alias("_n_arms"),
            pl.col(arm_col).first().alias("arm"),
            pl.len().cast(pl.Int64).alias("impressions"),
            pl.col("click").cast(pl.Float64).sum().alias("clicks"),
            *optional,
        )
        .sort("user_id")
    )
    mixed = users.filter(pl.col("_n_arms") > 1)
    if mixed.height:
        raise ValueError(
            f"{arm_col}: {mixed.height} user(s) appear in more than one arm (e.g. user_id "
            f"{mixed['user_id'][0]}); assignment must be per user"
        )
    return users.drop("_n_arms").with_columns((pl.col("clicks") / pl.col("impressions")).alias("ctr"))


def arm_metrics(users: pl.DataFrame, metrics: Sequence[str], *, arm_col: str = "arm") -> pl.DataFrame:
    """Per arm and metric: ``n_users, mean, std`` (ddof = 1) and ``se`` of the mean, one row each."""
    _require_columns(users, [arm_col, *metrics], "users")
    parts = [
        users.group_by(arm_col)
        .agg(
            pl.lit(m).alias("metric"),
            pl.len().cast(pl.Int64).alias("n_users"),
            pl.col(m).cast(pl.Float64).mean().alias("mean"),
            pl.col(m).cast(pl.Float64).std(ddof=1).alias("std"),
        )
        .rename({arm_col: "arm"})
        for m in metrics
    ]
    out = pl.concat(parts).with_columns((pl.col("std") / pl.col("n_users").sqrt()).alias("se"))
    return out.select("arm", "metric", "n_users", "mean", "std", "se").sort("metric", "arm")


# ----------------------------------------------------------------------------------------------------------
# Moments: the sufficient statistics every test below works from
# ----------------------------------------------------------------------------------------------------------


def _values(x: npt.ArrayLike, field: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 0:
        raise ValueError(f"{field} must be an array of per-user values, got a scalar")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{field} contains NaN or infinite values")
    return arr


@dataclass(frozen=True)
class Moments:
    """Count, mean and sample variance (ddof = 1) of one arm; arrays when batched over experiments/looks."""

    n: FloatArray
    mean: FloatArray
    var: FloatArray

    @classmethod
    def of(cls, values: npt.ArrayLike, *, field: str = "values") -> Moments:
        """Moments along the last axis (shape (n,) for one arm, (R, n) for R experiments)."""
        x = _values(values, field)
        n = x.shape[-1]
        if n < 2:
            raise ValueError(f"{field} has {n} user(s); an arm needs at least 2 users")
        return cls(np.full(x.shape[:-1], float(n)), x.mean(axis=-1), x.var(axis=-1, ddof=1))

    @classmethod
    def of_binary(cls, successes: npt.ArrayLike, n: npt.ArrayLike, *, field: str = "successes") -> Moments:
        """Moments of 0/1 per-user values from success counts (a conversion metric without the raw draws)."""
        k, m = np.asarray(successes, dtype=np.float64), np.asarray(n, dtype=np.float64)
        if np.any(m < 2):
            raise ValueError(f"{field}: every arm needs at least 2 users, got n = {m.min():g}")
        if np.any(k < 0) or np.any(k > m):
            raise ValueError(f"{field} must lie in [0, n]")
        k, m = np.broadcast_arrays(k, m)
        return cls(m.astype(np.float64), k / m, k * (m - k) / (m * (m - 1)))

    @classmethod
    def running(
        cls, values: npt.ArrayLike, in_arm: npt.ArrayLike, looks: npt.ArrayLike | None = None
    ) -> Moments:
        """Moments of the arm's users among the first ``t`` arrivals, for each look ``t``.

        values and in_arm: arrivals in order along the last axis (shape (N,) or (R, N)); looks: the arrival
        counts at which to look (1..N, increasing; default every arrival). Returns arrays of shape (..., L);
        a look where the arm has fewer than 2 users has NaN mean/variance.
        """
        x = _values(values, "values")
        mask = np.asarray(in_arm, dtype=bool)
        if mask.shape != x.shape:
            raise ValueError(f"in_arm must have the shape of values {x.shape}, got {mask.shape}")
        n_total = x.shape[-1]
        idx = np.arange(1, n_total + 1) if looks is None else np.asarray(looks, dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0 or idx[0] < 1 or idx[-1] > n_total or np.any(np.diff(idx) <= 0):
            raise ValueError(f"looks must be increasing arrival counts in [1, {n_total}]")
        # Shift by the first arrival before accumulating squares: keeps S2 - S1^2/n accurate for large means.
        xs = np.where(mask, x - x[..., :1], 0.0)
        cnt = np.cumsum(mask, axis=-1)[..., idx - 1].astype(np.float64)
        s1 = np.cumsum(xs, axis=-1)[..., idx - 1]
        s2 = np.cumsum(xs * xs, axis=-1)[..., idx - 1]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(cnt > 0, s1 / cnt, np.nan) + x[..., :1]
            var = np.where(cnt > 1, np.maximum(s2 - s1 * s1 / cnt, 0.0) / (cnt - 1), np.nan)
        return cls(cnt, mean, var)


def _as_number(a: FloatArray) -> Number:
    return float(a) if np.ndim(a) == 0 else a


# ----------------------------------------------------------------------------------------------------------
# Fixed-horizon estimate: Welch t-test, relative lift by the delta method
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiffEstimate:
    """Treatment minus control. Fields are floats for one experiment, arrays for a batch."""

    n_control: Number
    n_treatment: Number
    mean_control: Number
    mean_treatment: Number
    diff: Number
    se: Number
    df: Number  # Welch-Satterthwaite degrees of freedom
    t: Number
    p_value: Number
    ci_low: Number
    ci_high: Number
    lift: Number  # mean_treatment / mean_control - 1 (NaN when the control mean is 0)
    lift_se: Number
    lift_ci_low: Number
    lift_ci_high: Number
    alpha: float

    @property
    def significant(self) -> bool | npt.NDArray[np.bool_]:
        return self.p_value < self.alpha


def welch_from_moments(treatment: Moments, control: Moments, *, alpha: float = 0.05) -> DiffEstimate:
    """Welch's t-test and CIs from arm moments (vectorised: batched moments give batched results)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    for name, m in (("treatment", treatment), ("control", control)):
        if np.any(np.asarray(m.n) < 2):
            raise ValueError(f"{name} arm has fewer than 2 users (n = {np.min(m.n):g})")
    nt, mt, vt = (np.asarray(a, dtype=np.float64) for a in (treatment.n, treatment.mean, treatment.var))
    nc, mc, vc = (np.asarray(a, dtype=np.float64) for a in (control.n, control.mean, control.var))
    at, ac = vt / nt, vc / nc
    var = at + ac
    se = np.sqrt(var)
    diff = mt - mc
    with np.errstate(invalid="ignore", divide="ignore"):
        df = var * var / (at * at / (nt - 1) + ac * ac / (nc - 1))
        t = diff / se
        p = 2.0 * stats.t.sf(np.abs(t), df)
        q = stats.t.ppf(1.0 - alpha / 2.0, df)
        # Zero variance in both arms: no noise, so any difference is certain and no difference is not.
        degenerate = se == 0
        p = np.where(degenerate, np.where(diff == 0, 1.0, 0.0), p)
        t = np.where(degenerate, np.where(diff == 0, 0.0, np.sign(diff) * np.inf), t)
        q = np.where(degenerate, 0.0, q)
        lift = np.where(mc != 0, mt / mc - 1.0, np.nan)
        lift_se = np.where(mc != 0, np.sqrt(at / mc**2 + mt**2 * ac / mc**4), np.nan)
    z = stats.norm.ppf(1.0 - alpha / 2.0)
    n = _as_number
    return DiffEstimate(
        n_control=n(nc),
        n_treatment=n(nt),
        mean_control=n(mc),
        mean_treatment=n(mt),
        diff=n(diff),
        se=n(se),
        df=n(df),
        t=n(t),
        p_value=n(p),
        ci_low=n(diff - q * se),
        ci_high=n(diff + q * se),
        lift=n(lift),
        lift_se=n(lift_se),
        lift_ci_low=n(lift - z * lift_se),
        lift_ci_high=n(lift + z * lift_se),
        alpha=alpha,
    )


def welch_test(treatment: npt.ArrayLike, control: npt.ArrayLike, *, alpha: float = 0.05) -> DiffEstimate:
    """Welch t-test of the per-user values of two arms (1-D arrays, or (R, n) for R experiments)."""
    return welch_from_moments(
        Moments.of(treatment, field="treatment"), Moments.of(control, field="control"), alpha=alpha
    )


# ----------------------------------------------------------------------------------------------------------
# CUPED
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CupedEstimate:
    adjusted: DiffEstimate  # Welch on Y - theta * (X - mean(X))
    unadjusted: DiffEstimate  # Welch on Y
    theta: Number
    variance_reduction: (
        Number  # 1 - se_adjusted^2 / se_unadjusted^2 (about rho^2 for a covariate of corr rho)
    )


def cuped(
    treatment: npt.ArrayLike,
    control: npt.ArrayLike,
    treatment_covariate: npt.ArrayLike,
    control_covariate: npt.ArrayLike,
    *,
    alpha: float = 0.05,
) -> CupedEstimate:
    """CUPED: regress out a pre-period covariate with one theta pooled across arms, then Welch.

    Accepts 1-D per-user arrays (or (R, n) batches); each covariate must align with its arm's values.
    """
    yt, yc = _values(treatment, "treatment"), _values(control, "control")
    xt, xc = (
        _values(treatment_covariate, "treatment_covariate"),
        _values(control_covariate, "control_covariate"),
    )
    if xt.shape != yt.shape:
        raise ValueError(f"treatment_covariate must have the shape of treatment {yt.shape}, got {xt.shape}")
    if xc.shape != yc.shape:
        raise ValueError(f"control_covariate must have the shape of control {yc.shape}, got {xc.shape}")
    nt, nc = yt.shape[-1], yc.shape[-1]
    if nt < 2 or nc < 2:
        raise ValueError(f"each arm needs at least 2 users (treatment {nt}, control {nc})")
    # Within-arm centring: theta then measures how X predicts Y inside an arm, untouched by the effect.
    dxt, dxc = xt - xt.mean(axis=-1, keepdims=True), xc - xc.mean(axis=-1, keepdims=True)
    dyt, dyc = yt - yt.mean(axis=-1, keepdims=True), yc - yc.mean(axis=-1, keepdims=True)
    sxy = (dxt * dyt).sum(axis=-1) + (dxc * dyc).sum(axis=-1)
    sxx = (dxt * dxt).sum(axis=-1) + (dxc * dxc).sum(axis=-1)
    if np.any(sxx == 0):
        raise ValueError("covariate is constant within both arms; CUPED needs a varying pre-period covariate")
    theta = (sxy / sxx)[..., None]
    x_mean = ((xt.sum(axis=-1) + xc.sum(axis=-1)) / (nt + nc))[..., None]
    adjusted = welch_test(yt - theta * (xt - x_mean), yc - theta * (xc - x_mean), alpha=alpha)
    raw = welch_test(yt, yc, alpha=alpha)
    with np.errstate(invalid="ignore", divide="ignore"):
        reduction = 1.0 - np.asarray(adjusted.se) ** 2 / np.asarray(raw.se) ** 2
    return CupedEstimate(adjusted, raw, _as_number(theta[..., 0]), _as_number(reduction))


# ----------------------------------------------------------------------------------------------------------
# Always-valid sequential test: mSPRT (normal mixture)
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequentialResult:
    """mSPRT over looks (last axis). p_value is non-increasing, the CI only ever shrinks."""

    n_treatment: FloatArray
    n_control: FloatArray
    diff: FloatArray
    p_value: FloatArray  # always-valid p-value after each look (running minimum of 1 / Lambda)
    ci_low: FloatArray  # always-valid (1 - alpha) CI for the difference (running intersection)
    ci_high: FloatArray
    alpha: float

    @property
    def rejected(self) -> bool | npt.NDArray[np.bool_]:
        """Whether the null was rejected at any look (equivalently at the last, p being non-increasing)."""
        r = self.p_value[..., -1] <= self.alpha
        return bool(r) if np.ndim(r) == 0 else r

    @property
    def first_rejection(self) -> int | npt.NDArray[np.int64]:
        """Index of the first look with p <= alpha, -1 if none."""
        hit = self.p_value <= self.alpha
        idx = np.where(hit.any(axis=-1), hit.argmax(axis=-1), -1)
        return int(idx) if np.ndim(idx) == 0 else idx


def msprt(
    treatment: Moments,
    control: Moments,
    *,
    tau2: float,
    alpha: float = 0.05,
    theta0: float = 0.0,
    burn_in: int = 100,
) -> SequentialResult:
    """Normal-mixture mSPRT for the difference in means, at every look of running moments.

    treatment/control: ``Moments`` with looks on the last axis (e.g. ``Moments.running``); tau2: mixing
    variance of the effect (metric units squared); theta0: the null difference. Looks with fewer than
    ``burn_in`` users in either arm, or zero plug-in variance, leave the p-value where it was.
    """
    if not (math.isfinite(tau2) and tau2 > 0):
        raise ValueError(f"tau2 must be finite and > 0, got {tau2}")
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if burn_in < 2:
        raise ValueError(f"burn_in must be >= 2 users per arm, got {burn_in}")
    nt, nc = np.asarray(treatment.n, dtype=np.float64), np.asarray(control.n, dtype=np.float64)
    if nt.ndim == 0 or nt.shape != nc.shape:
        raise ValueError(f"treatment and control moments need matching look axes, got {nt.shape}, {nc.shape}")
    diff = np.asarray(treatment.mean) - np.asarray(control.mean)
    v = np.asarray(treatment.var) / nt + np.asarray(control.var) / nc
    active = (nt >= burn_in) & (nc >= burn_in) & np.isfinite(v) & (v > 0)
    v_safe = np.where(active, v, 1.0)
    d_safe = np.where(active, diff, 0.0)
    # log Lambda = 0.5 log(V / (V + tau2)) + tau2 (d - theta0)^2 / (2 V (V + tau2)); p = min(1, 1/Lambda).
    log_lr = 0.5 * np.log(v_safe / (v_safe + tau2)) + tau2 * (d_safe - theta0) ** 2 / (
        2.0 * v_safe * (v_safe + tau2)
    )
    p_look = np.where(active, np.minimum(1.0, np.exp(-log_lr)), 1.0)
    p_value = np.minimum.accumulate(p_look, axis=-1)
    # CI: {theta : Lambda(theta) < 1/alpha}, i.e.
    # (d - theta)^2 < 2V(V + tau2)/tau2 * (log(1/alpha) + 0.5 log((V + tau2)/V)).
    half = np.sqrt(
        2.0
        * v_safe
        * (v_safe + tau2)
        / tau2
        * (math.log(1.0 / alpha) + 0.5 * np.log((v_safe + tau2) / v_safe))
    )
    lo = np.maximum.accumulate(np.where(active, d_safe - half, -np.inf), axis=-1)
    hi = np.minimum.accumulate(np.where(active, d_safe + half, np.inf), axis=-1)
    return SequentialResult(nt, nc, diff, p_value, lo, hi, alpha)


def running_welch_p_values(treatment: Moments, control: Moments, *, burn_in: int = 100) -> FloatArray:
    """The naive fixed-horizon Welch p-value recomputed at every look (NOT valid under peeking; for contrast).

    Looks with fewer than ``burn_in`` users per arm get p = 1, as in ``msprt``.
    """
    nt, nc = np.asarray(treatment.n, dtype=np.float64), np.asarray(control.n, dtype=np.float64)
    ok = (nt >= max(burn_in, 2)) & (nc >= max(burn_in, 2))
    # Skipped looks get stand-in moments (n = 2, mean 0, var 1) so the vectorised test runs.
    t = Moments(np.where(ok, nt, 2.0), np.where(ok, treatment.mean, 0.0), np.where(ok, treatment.var, 1.0))
    c = Moments(np.where(ok, nc, 2.0), np.where(ok, control.mean, 0.0), np.where(ok, control.var, 1.0))
    p = np.asarray(welch_from_moments(t, c).p_value)
    return np.where(ok, p, 1.0)


# ----------------------------------------------------------------------------------------------------------
# Sample-ratio mismatch
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SRMResult:
    arms: tuple[str, ...]
    observed: tuple[int, ...]
    expected: tuple[float, ...]
    chi2: float
    p_value: float
    threshold: float

    @property
    def flagged(self) -> bool:
        return self.p_value < self.threshold


def srm_check(
    observed: Mapping[str, int], design: Mapping[str, float], *, threshold: float = 0.001
) -> SRMResult:
    """Chi-square goodness of fit of the users per arm to the designed split (weights need not sum to 1).

    An arm of the design with 0 observed users is a (severe) mismatch and is flagged, not an error.
    """
    arms = tuple(design)
    if set(observed) != set(arms):
        raise ValueError(f"observed arms {sorted(observed)} differ from the design's arms {sorted(arms)}")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    w = _weights(arms, [design[a] for a in arms], field="design")
    counts = np.array([observed[a] for a in arms], dtype=np.float64)
    if np.any(counts < 0) or np.any(counts != np.round(counts)):
        raise ValueError(f"observed counts must be non-negative integers, got {dict(observed)}")
    total = counts.sum()
    if total == 0:
        raise ValueError("observed has 0 users in total; nothing to check")
    expected = w * total
    res = stats.chisquare(counts, expected) if len(arms) > 1 else None
    chi2, p = (float(res.statistic), float(res.pvalue)) if res is not None else (0.0, 1.0)
    return SRMResult(arms, tuple(int(c) for c in counts), tuple(expected.tolist()), chi2, p, threshold)


# ----------------------------------------------------------------------------------------------------------
# One call for a dashboard: all metrics of two arms
# ----------------------------------------------------------------------------------------------------------


def compare_arms(
    users: pl.DataFrame,
    *,
    control: str,
    treatment: str,
    metrics: Sequence[str],
    covariates: Mapping[str, str] | None = None,
    alpha: float = 0.05,
    arm_col: str = "arm",
) -> pl.DataFrame:
    """Welch (and CUPED where ``covariates`` maps a metric to its pre-period column) for each metric.

    users: one row per user with the arm column and the metric columns. One output row per metric with the
    estimate actually reported (CUPED-adjusted where a covariate is given) and ``variance_reduction``.
    """
    covariates = dict(covariates or {})
    _require_columns(users, [arm_col, *metrics, *covariates.values()], "users")
    unknown = set(covariates) - set(metrics)
    if unknown:
        raise ValueError(f"covariates name metrics not in metrics: {sorted(unknown)}")
    t_rows, c_rows = users.filter(pl.col(arm_col) == treatment), users.filter(pl.col(arm_col) == control)
    for name, rows in ((treatment, t_rows), (control, c_rows)):
        if rows.height < 2:
            raise ValueError(f"{arm_col}: arm {name!r} has {rows.height} user(s); at least 2 are needed")
    records = []
    for m in metrics:
        yt, yc = t_rows[m].cast(pl.Float64).to_numpy(), c_rows[m].cast(pl.Float64).to_numpy()
        reduction, theta = 0.0, 0.0
        if m in covariates:
            xt = t_rows[covariates[m]].cast(pl.Float64).to_numpy()
            xc = c_rows[covariates[m]].cast(pl.Float64).to_numpy()
            res = cuped(yt, yc, xt, xc, alpha=alpha)
            est, reduction, theta = res.adjusted, float(res.variance_reduction), float(res.theta)
        else:
            est = welch_test(yt, yc, alpha=alpha)
        row = {f.name: getattr(est, f.name) for f in fields(DiffEstimate) if f.name != "alpha"}
        records.append(
            {"metric": m, **row, "cuped": m in covariates, "theta": theta, "variance_reduction": reduction}
        )
    return pl.DataFrame(records).with_columns(
        pl.col("n_control", "n_treatment").cast(pl.Int64), pl.lit(alpha).alias("alpha")
    )
