"""Ranking / CTR metrics (specs/evaluation.md, "Ranking / CTR"), vectorised with NumPy.

- AUC: the probability that a random positive scores above a random negative, ties counting one half
  (Mann-Whitney with average ranks; equals scikit-learn's ``roc_auc_score``).
- GAUC: per-user AUC averaged with weights = the user's number of examples, over the users that have both
  classes (users with one class are left out; ``n_gauc_users`` says how many counted).
- Log loss: mean binary cross-entropy, predictions clipped to [eps, 1 - eps].
- NE (normalised entropy): log loss / entropy of the base rate (the log loss of always predicting the mean
  label); below 1 means better than the constant predictor.
- Calibration: mean prediction / observed positive rate (1 is calibrated). ECE: over 10 equal-width bins of
  the prediction, sum_b (n_b / n) |mean prediction_b - positive rate_b| (a prediction of exactly 1 falls in
  the last bin).
- Oracle share (synthetic data): (AUC - 0.5) / (oracle AUC - 0.5), the oracle being the same metrics computed
  from the generator's true probabilities.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from numpy.typing import ArrayLike

EPS = 1e-7


def _labels_scores(
    labels: ArrayLike, scores: ArrayLike, probabilities: bool
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    p = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != p.shape:
        raise ValueError(f"labels ({y.size}) and predictions ({p.size}) differ in length")
    if y.size == 0:
        raise ValueError("no examples to evaluate")
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0 or 1")
    if not np.isfinite(p).all():
        raise ValueError("predictions contain NaN or infinite values")
    if probabilities and ((p < 0).any() or (p > 1).any()):
        raise ValueError("predictions must be probabilities in [0, 1] (apply the sigmoid to logits)")
    return y, p


def _grouped_auc(
    y: np.ndarray, p: np.ndarray, groups: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-group AUC, average ranks for ties -> (auc [G] (NaN where one class), n_examples [G], group ids)."""
    order = np.lexsort((p, groups))
    g, s, lab = groups[order], p[order], y[order]
    n = len(g)
    new_group = np.r_[True, g[1:] != g[:-1]]
    group_start = np.maximum.accumulate(np.where(new_group, np.arange(n), 0))  # [n]
    new_tie = new_group | np.r_[True, s[1:] != s[:-1]]
    tie_id = np.cumsum(new_tie) - 1
    tie_first = np.flatnonzero(new_tie)
    tie_last = np.r_[tie_first[1:], n] - 1
    rank = (tie_first[tie_id] + tie_last[tie_id]) / 2.0 - group_start + 1.0  # 1-based within the group
    group_index = np.cumsum(new_group) - 1
    n_groups = int(group_index[-1]) + 1
    n_pos = np.bincount(group_index, weights=lab, minlength=n_groups)
    n_all = np.bincount(group_index, minlength=n_groups).astype(np.float64)
    n_neg = n_all - n_pos
    rank_pos = np.bincount(group_index, weights=rank * lab, minlength=n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        auc = (rank_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    auc[(n_pos == 0) | (n_neg == 0)] = np.nan
    return auc, n_all, g[new_group]


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """ROC AUC of any real-valued scores (ties count one half). Raises if only one class is present."""
    y, p = _labels_scores(labels, scores, probabilities=False)
    value = _grouped_auc(y, p, np.zeros(y.size, dtype=np.int64))[0][0]
    if np.isnan(value):
        raise ValueError("AUC needs both positive and negative labels")
    return float(value)


def gauc(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> tuple[float, int]:
    """(GAUC, number of users counted): per-user AUC weighted by the user's example count, over users with
    both classes. Raises if no user has both classes."""
    y, p = _labels_scores(labels, scores, probabilities=False)
    g = np.asarray(groups).reshape(-1)
    if g.shape != y.shape:
        raise ValueError(f"groups ({g.size}) and labels ({y.size}) differ in length")
    per_user, weight, _ = _grouped_auc(y, p, g)
    ok = ~np.isnan(per_user)
    if not ok.any():
        raise ValueError("GAUC needs at least one user with both positive and negative labels")
    return float(np.sum(per_user[ok] * weight[ok]) / np.sum(weight[ok])), int(ok.sum())


def log_loss(labels: ArrayLike, probs: ArrayLike, eps: float = EPS) -> float:
    y, p = _labels_scores(labels, probs, probabilities=True)
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def base_rate_entropy(labels: ArrayLike) -> float:
    """Entropy (nats) of a Bernoulli with the observed positive rate: the log loss of predicting that rate."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1)
    rate = float(y.mean())
    if rate <= 0.0 or rate >= 1.0:
        raise ValueError(f"the base rate is {rate}: normalised entropy needs both classes")
    return -(rate * math.log(rate) + (1.0 - rate) * math.log(1.0 - rate))


def normalized_entropy(labels: ArrayLike, probs: ArrayLike, eps: float = EPS) -> float:
    return log_loss(labels, probs, eps) / base_rate_entropy(labels)


def calibration(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean prediction / observed positive rate (1 = calibrated on average)."""
    y, p = _labels_scores(labels, probs, probabilities=True)
    if y.sum() == 0:
        raise ValueError("calibration needs at least one positive label")
    return float(p.mean() / y.mean())


def expected_calibration_error(labels: ArrayLike, probs: ArrayLike, n_bins: int = 10) -> float:
    """Sum over equal-width prediction bins of (bin share) * |mean prediction - positive rate|."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    y, p = _labels_scores(labels, probs, probabilities=True)
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    gap = np.abs(
        np.bincount(bins, weights=p, minlength=n_bins) - np.bincount(bins, weights=y, minlength=n_bins)
    )
    return float(gap.sum() / y.size)  # sum_b (n_b / n) |mean_p - mean_y| = sum_b |sum_p - sum_y| / n


def oracle_share(model_auc: float, oracle_auc: float) -> float:
    """(AUC - 0.5) / (oracle AUC - 0.5): the share of the attainable lift above chance the model reaches."""
    if oracle_auc <= 0.5:
        raise ValueError(f"oracle AUC must exceed 0.5 to define the share, got {oracle_auc}")
    return (model_auc - 0.5) / (oracle_auc - 0.5)


@dataclass(frozen=True)
class RankingMetrics:
    n_examples: int
    positive_rate: float
    auc: float
    gauc: float | None  # None when no groups were given
    n_gauc_users: int | None
    log_loss: float
    normalized_entropy: float
    calibration: float
    ece: float
    oracle_auc: float | None = None  # on synthetic data: the same metrics from the true probabilities
    oracle_share: float | None = None

    def as_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def ranking_metrics(
    labels: ArrayLike,
    probs: ArrayLike,
    groups: ArrayLike | None = None,
    oracle_probs: ArrayLike | None = None,
    n_bins: int = 10,
) -> RankingMetrics:
    """Every ranking metric at once; ``probs`` are probabilities (sigmoid of the logits)."""
    y, p = _labels_scores(labels, probs, probabilities=True)
    model_auc = auc(y, p)
    g_auc, n_users = gauc(y, p, groups) if groups is not None else (None, None)
    oracle_auc = share = None
    if oracle_probs is not None:
        oracle_auc = auc(y, _labels_scores(y, oracle_probs, probabilities=True)[1])
        share = oracle_share(model_auc, oracle_auc)
    return RankingMetrics(
        n_examples=int(y.size),
        positive_rate=float(y.mean()),
        auc=model_auc,
        gauc=g_auc,
        n_gauc_users=n_users,
        log_loss=log_loss(y, p),
        normalized_entropy=normalized_entropy(y, p),
        calibration=calibration(y, p),
        ece=expected_calibration_error(y, p, n_bins),
        oracle_auc=oracle_auc,
        oracle_share=share,
    )
