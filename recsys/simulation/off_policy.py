"""Off-policy evaluation of a target policy on a logged impressions table: IPS, SNIPS, doubly robust.

Each logged row is one decision (an item shown at a position for a request) with ``propensity`` = the
logging policy's probability of that decision and ``target_propensity`` = the target policy's probability
of the same decision in the same context. The estimand is the target policy's expected reward per logged
decision (per slot); multiply by the slate size for a per-request value.

OPEN choices from the spec and what was picked:

- Slates: the per-slot ("independent") estimator, valid when a slot's reward depends on its own item and
  position only. Slate-level and pseudo-inverse estimators are not implemented.
- Clipping: weights ``min(target / propensity, max_weight)`` (bias traded for variance); SNIPS normalises
  the clipped weights, DR clips the weight of its correction term.
- Standard errors: from the per-row influence terms (``w r`` for IPS, ``w (r - V) / mean(w)`` for SNIPS,
  ``v_hat + w (r - q_hat)`` for DR), cluster-robust when a cluster id (the request or the user) is given,
  because rows of one request are not independent; normal-approximation CIs.
- Effective sample size: Kish's ``(sum w)^2 / sum w^2`` of the (clipped) weights.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
import polars as pl
from pydantic import Field
from scipy import stats

from recsys.core.config import FrozenModel

FloatArray = npt.NDArray[np.float64]


class OPEConfig(FrozenModel):
    """Knobs and column names of ``evaluate_log``."""

    max_weight: float | None = Field(
        None, gt=0.0, description="Clip importance weights here (None = no clip)."
    )
    alpha: float = Field(0.05, gt=0.0, lt=1.0, description="CIs are (1 - alpha).")
    reward_col: str = "click"
    propensity_col: str = "propensity"
    target_col: str = "target_propensity"
    cluster_col: str | None = Field("request_id", description="Rows sharing this id are one cluster for SEs.")
    q_hat_col: str = Field("q_hat", description="Reward model's prediction for the logged decision (DR).")
    v_hat_col: str = Field(
        "v_hat", description="Reward model's expected reward under the target policy (DR)."
    )


@dataclass(frozen=True)
class OPEEstimate:
    estimator: str  # "ips", "snips" or "dr"
    value: float
    se: float
    ci_low: float
    ci_high: float
    n: int  # logged rows
    n_clusters: int
    ess: float  # Kish effective sample size of the (clipped) weights
    max_weight: float | None
    n_clipped: int  # rows whose weight was clipped
    alpha: float


def _array(x: npt.ArrayLike, field: str, n: int | None = None) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{field} must be 1-D, got shape {arr.shape}")
    if n is not None and arr.size != n:
        raise ValueError(f"{field} has length {arr.size}, expected {n} (the length of reward)")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{field} contains NaN or infinite values")
    return arr


def _propensities(
    propensity: npt.ArrayLike, target_propensity: npt.ArrayLike, n: int | None = None
) -> tuple[FloatArray, FloatArray]:
    p = _array(propensity, "propensity", n)
    bad = (p <= 0) | (p > 1)
    if bad.any():
        raise ValueError(
            f"propensity must be in (0, 1]: {int(bad.sum())} value(s) outside, e.g. {p[bad][0]:g}"
        )
    q = _array(target_propensity, "target_propensity", p.size)
    bad = (q < 0) | (q > 1)
    if bad.any():
        raise ValueError(
            f"target_propensity must be in [0, 1]: {int(bad.sum())} value(s) outside, e.g. {q[bad][0]:g}"
        )
    return p, q


def _checked(
    reward: npt.ArrayLike, propensity: npt.ArrayLike, target_propensity: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    r = _array(reward, "reward")
    if r.size < 2:
        raise ValueError(f"reward has {r.size} row(s); off-policy estimates need at least 2")
    p, q = _propensities(propensity, target_propensity, r.size)
    return r, p, q


def importance_weights(
    propensity: npt.ArrayLike, target_propensity: npt.ArrayLike, max_weight: float | None = None
) -> tuple[FloatArray, int]:
    """``target / propensity``, clipped at ``max_weight``; returns the weights and how many were clipped."""
    p, q = _propensities(propensity, target_propensity)
    if max_weight is not None and not (math.isfinite(max_weight) and max_weight > 0):
        raise ValueError(f"max_weight must be finite and > 0, got {max_weight}")
    w = q / p
    if max_weight is None:
        return w, 0
    return np.minimum(w, max_weight), int((w > max_weight).sum())


def _clusters(cluster: npt.ArrayLike | None, n: int) -> tuple[npt.NDArray[np.int64], int]:
    if cluster is None:
        return np.arange(n, dtype=np.int64), n
    c = np.asarray(cluster)
    if c.shape != (n,):
        raise ValueError(f"cluster has shape {c.shape}, expected ({n},) (the length of reward)")
    _, inverse = np.unique(c, return_inverse=True)
    return inverse.astype(np.int64), int(inverse.max()) + 1


def _se(centred: FloatArray, groups: npt.NDArray[np.int64], n_groups: int) -> float:
    """Cluster-robust SE of a mean of n rows from the rows' centred influence terms."""
    if n_groups < 2:
        raise ValueError("cluster has a single distinct value; a standard error needs at least 2 clusters")
    sums = np.bincount(groups, weights=centred, minlength=n_groups)
    n = centred.size
    return math.sqrt(n_groups / (n_groups - 1) * float(np.sum(sums * sums)) / (n * n))


def _estimate(
    name: str,
    value: float,
    centred: FloatArray,
    w: FloatArray,
    n_clipped: int,
    cluster: npt.ArrayLike | None,
    max_weight: float | None,
    alpha: float,
) -> OPEEstimate:
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    groups, n_groups = _clusters(cluster, w.size)
    se = _se(centred, groups, n_groups)
    z = float(stats.norm.ppf(1.0 - alpha / 2.0))
    sw, sw2 = float(w.sum()), float(np.sum(w * w))
    ess = sw * sw / sw2 if sw2 > 0 else 0.0
    return OPEEstimate(
        name,
        value,
        se,
        value - z * se,
        value + z * se,
        int(w.size),
        n_groups,
        ess,
        max_weight,
        n_clipped,
        alpha,
    )


def ips(
    reward: npt.ArrayLike,
    propensity: npt.ArrayLike,
    target_propensity: npt.ArrayLike,
    *,
    max_weight: float | None = None,
    cluster: npt.ArrayLike | None = None,
    alpha: float = 0.05,
) -> OPEEstimate:
    """Inverse propensity scoring: ``mean(w * reward)``; unbiased without clipping."""
    r, p, q = _checked(reward, propensity, target_propensity)
    w, n_clipped = importance_weights(p, q, max_weight)
    phi = w * r
    value = float(phi.mean())
    return _estimate("ips", value, phi - value, w, n_clipped, cluster, max_weight, alpha)


def snips(
    reward: npt.ArrayLike,
    propensity: npt.ArrayLike,
    target_propensity: npt.ArrayLike,
    *,
    max_weight: float | None = None,
    cluster: npt.ArrayLike | None = None,
    alpha: float = 0.05,
) -> OPEEstimate:
    """Self-normalised IPS: ``sum(w * reward) / sum(w)``; SE by the delta method."""
    r, p, q = _checked(reward, propensity, target_propensity)
    w, n_clipped = importance_weights(p, q, max_weight)
    mean_w = float(w.mean())
    if mean_w == 0:
        raise ValueError("target_propensity is 0 on every logged row; SNIPS is undefined")
    value = float(np.sum(w * r) / np.sum(w))
    return _estimate("snips", value, w * (r - value) / mean_w, w, n_clipped, cluster, max_weight, alpha)


def doubly_robust(
    reward: npt.ArrayLike,
    propensity: npt.ArrayLike,
    target_propensity: npt.ArrayLike,
    q_hat: npt.ArrayLike,
    v_hat: npt.ArrayLike,
    *,
    max_weight: float | None = None,
    cluster: npt.ArrayLike | None = None,
    alpha: float = 0.05,
) -> OPEEstimate:
    """Doubly robust: ``mean(v_hat + w * (reward - q_hat))``.

    q_hat: the reward model's prediction for the logged decision; v_hat: its expected reward under the
    target policy in the same context (``sum_a pi(a | x) q_hat(x, a)``). Unbiased (unclipped) if either the
    propensities or the reward model are right; low variance when the reward model is good.
    """
    r, p, q = _checked(reward, propensity, target_propensity)
    qh, vh = _array(q_hat, "q_hat", r.size), _array(v_hat, "v_hat", r.size)
    w, n_clipped = importance_weights(p, q, max_weight)
    phi = vh + w * (r - qh)
    value = float(phi.mean())
    return _estimate("dr", value, phi - value, w, n_clipped, cluster, max_weight, alpha)


def _column(log: pl.DataFrame, name: str) -> FloatArray:
    if name not in log.columns:
        raise ValueError(f"log is missing column {name!r}; it has {log.columns}")
    col = log[name]
    if col.null_count():
        raise ValueError(f"log column {name!r} has {col.null_count()} null value(s)")
    return col.cast(pl.Float64).to_numpy()


def evaluate_log(log: pl.DataFrame, config: OPEConfig | None = None) -> pl.DataFrame:
    """IPS and SNIPS on a logged impressions frame, plus DR when the reward-model columns are present.

    One row per estimator with the ``OPEEstimate`` fields.
    """
    cfg = config or OPEConfig()
    r, p, q = (_column(log, c) for c in (cfg.reward_col, cfg.propensity_col, cfg.target_col))
    cluster = None
    if cfg.cluster_col is not None:
        if cfg.cluster_col not in log.columns:
            raise ValueError(
                f"log is missing cluster column {cfg.cluster_col!r}; set cluster_col=None to skip"
            )
        cluster = log[cfg.cluster_col].to_numpy()
    kw = {"max_weight": cfg.max_weight, "cluster": cluster, "alpha": cfg.alpha}
    out = [ips(r, p, q, **kw), snips(r, p, q, **kw)]
    if cfg.q_hat_col in log.columns and cfg.v_hat_col in log.columns:
        out.append(doubly_robust(r, p, q, _column(log, cfg.q_hat_col), _column(log, cfg.v_hat_col), **kw))
    return pl.DataFrame([asdict(e) for e in out], schema_overrides={"max_weight": pl.Float64})
