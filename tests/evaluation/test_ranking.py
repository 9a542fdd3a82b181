"""Ranking metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from recsys.evaluation.ranking import (
    auc,
    calibration,
    expected_calibration_error,
    gauc,
    log_loss,
    normalized_entropy,
    oracle_share,
    ranking_metrics,
)


def _data(n: int = 2000, seed: int = 0, ties: bool = False):
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.01, 0.99, n)
    if ties:
        p = np.round(p, 1)  # many tied scores
    y = (rng.uniform(size=n) < p).astype(np.float64)
    users = rng.integers(0, 50, n)
    return y, p, users


@pytest.mark.parametrize("ties", [False, True])
def test_auc_matches_sklearn(ties: bool) -> None:
    y, p, _ = _data(ties=ties)
    assert auc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)


def test_auc_hand_computed_with_a_tie() -> None:
    # positives 0.8, 0.4; negatives 0.4, 0.1 -> pairs: (0.8>0.4) 1, (0.8>0.1) 1, (0.4=0.4) 0.5, (0.4>0.1) 1
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)


def test_gauc_is_example_weighted_mean_over_users_with_both_classes() -> None:
    y, p, users = _data(n=3000, seed=1)
    expected_num = expected_den = 0.0
    for u in np.unique(users):
        sel = users == u
        if 0 < y[sel].sum() < sel.sum():
            expected_num += roc_auc_score(y[sel], p[sel]) * sel.sum()
            expected_den += sel.sum()
    value, n_users = gauc(y, p, users)
    assert value == pytest.approx(expected_num / expected_den, abs=1e-12)
    assert n_users == 50


def test_gauc_hand_computed_skips_single_class_users() -> None:
    # user a: AUC 1 over 3 examples; user b: AUC 0 over 2 examples; user c: only positives -> skipped
    labels = [1, 0, 0, 1, 0, 1, 1]
    scores = [0.9, 0.2, 0.1, 0.3, 0.6, 0.5, 0.4]
    users = ["a", "a", "a", "b", "b", "c", "c"]
    value, n_users = gauc(labels, scores, users)
    assert n_users == 2
    assert value == pytest.approx((1.0 * 3 + 0.0 * 2) / 5)


def test_log_loss_and_normalized_entropy() -> None:
    y, p, _ = _data(seed=2)
    assert log_loss(y, p) == pytest.approx(sk_log_loss(y, p), abs=1e-12)
    rate = y.mean()
    entropy = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert normalized_entropy(y, p) == pytest.approx(sk_log_loss(y, p) / entropy, abs=1e-12)
    # predicting the base rate everywhere has NE exactly 1
    assert normalized_entropy(y, np.full_like(p, rate)) == pytest.approx(1.0, abs=1e-12)


def test_calibration_and_ece_hand_computed() -> None:
    labels = [1, 0, 0, 1]
    probs = [0.15, 0.15, 0.85, 1.0]
    # mean prediction 0.5375 / rate 0.5
    assert calibration(labels, probs) == pytest.approx(1.075)
    # bin 1 (0.1-0.2): 2 examples, mean p 0.15, rate 0.5 -> |.| = 0.35; bin 8: p 0.85, rate 0 -> 0.85;
    # bin 9 (p = 1.0 lands in the last bin): p 1.0, rate 1 -> 0
    assert expected_calibration_error(labels, probs) == pytest.approx((2 * 0.35 + 0.85 + 0.0) / 4)


def test_perfectly_calibrated_probabilities_have_small_ece() -> None:
    y, p, _ = _data(n=200_000, seed=3)
    assert expected_calibration_error(y, p) < 0.01
    assert calibration(y, p) == pytest.approx(1.0, abs=0.01)


def test_oracle_share_and_bundle() -> None:
    y, p, users = _data(seed=4)
    rng = np.random.default_rng(5)
    noisy = np.clip(p + rng.normal(0, 0.3, p.size), 0.0, 1.0)
    metrics = ranking_metrics(y, noisy, groups=users, oracle_probs=p)
    assert metrics.oracle_auc == pytest.approx(roc_auc_score(y, p))
    assert metrics.oracle_share == pytest.approx(
        (roc_auc_score(y, noisy) - 0.5) / (roc_auc_score(y, p) - 0.5)
    )
    assert 0.0 < metrics.oracle_share < 1.0
    assert metrics.as_dict()["n_examples"] == y.size
    assert oracle_share(0.75, 0.8) == pytest.approx(0.25 / 0.3)


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="both positive and negative"):
        auc([1, 1], [0.2, 0.3])
    with pytest.raises(ValueError, match="differ in length"):
        auc([1, 0], [0.2])
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        auc([2, 0], [0.2, 0.1])
    with pytest.raises(ValueError, match="probabilities"):
        log_loss([1, 0], [1.5, 0.1])
    with pytest.raises(ValueError, match="NaN"):
        auc([1, 0], [float("nan"), 0.1])
    with pytest.raises(ValueError, match="oracle AUC"):
        oracle_share(0.7, 0.5)
    with pytest.raises(ValueError, match="at least one user"):
        gauc([1, 0], [0.4, 0.3], ["a", "b"])
