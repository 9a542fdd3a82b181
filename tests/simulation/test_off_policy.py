"""Off-policy estimators on a contextual bandit with a known target-policy value."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl
import pytest
from scipy import stats as sps

from recsys.simulation.off_policy import (
    OPEConfig,
    OPEEstimate,
    doubly_robust,
    evaluate_log,
    importance_weights,
    ips,
    snips,
)

REPS, N_ROUNDS, N_CONTEXTS, N_ACTIONS = 100, 3_000, 20, 5


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class Bandit:
    """REPS independent logs of N_ROUNDS rounds each, and the exact value of the target policy."""

    true_value: float
    reward: np.ndarray  # [REPS, N_ROUNDS]
    propensity: np.ndarray  # logging policy's probability of the logged action
    target: np.ndarray  # target policy's probability of the logged action
    q_hat: np.ndarray  # reward model's prediction for the logged action
    v_hat: np.ndarray  # reward model's expected reward under the target policy in the logged context


def make_bandit(seed: int = 3, model_noise: float = 0.02) -> Bandit:
    rng = np.random.default_rng(seed)
    p_context = rng.dirichlet(np.full(N_CONTEXTS, 2.0))
    p_reward = rng.uniform(0.05, 0.6, (N_CONTEXTS, N_ACTIONS))  # known P(click | context, action)
    logging = softmax(rng.normal(0.0, 1.0, (N_CONTEXTS, N_ACTIONS)))  # softmax over unrelated scores
    target = softmax(6.0 * p_reward)  # a different policy that favours the good actions
    true_value = float(p_context @ (target * p_reward).sum(axis=1))
    ctx = rng.choice(N_CONTEXTS, size=(REPS, N_ROUNDS), p=p_context)
    u = rng.random((REPS, N_ROUNDS, 1))
    action = np.minimum((u > np.cumsum(logging[ctx], axis=-1)).sum(axis=-1), N_ACTIONS - 1)
    reward = (rng.random((REPS, N_ROUNDS)) < p_reward[ctx, action]).astype(np.float64)
    model = np.clip(p_reward + rng.normal(0.0, model_noise, p_reward.shape), 0.01, 0.99)
    return Bandit(
        true_value,
        reward,
        logging[ctx, action],
        target[ctx, action],
        model[ctx, action],
        (target * model).sum(axis=1)[ctx],
    )


@pytest.fixture(scope="module")
def bandit() -> Bandit:
    return make_bandit()


def run(bandit: Bandit, estimator: str, max_weight: float | None = None) -> list[OPEEstimate]:
    out = []
    for r in range(REPS):
        args = (bandit.reward[r], bandit.propensity[r], bandit.target[r])
        if estimator == "ips":
            out.append(ips(*args, max_weight=max_weight))
        elif estimator == "snips":
            out.append(snips(*args, max_weight=max_weight))
        else:
            out.append(doubly_robust(*args, bandit.q_hat[r], bandit.v_hat[r], max_weight=max_weight))
    return out


def coverage(estimates: list[OPEEstimate], truth: float) -> float:
    return float(np.mean([e.ci_low <= truth <= e.ci_high for e in estimates]))


@pytest.mark.parametrize("estimator", ["ips", "snips", "dr"])
def test_ci_covers_the_true_target_value_about_95_percent(bandit: Bandit, estimator: str) -> None:
    estimates = run(bandit, estimator)
    lo, hi = sps.binom.interval(0.99, REPS, 0.95)
    assert lo / REPS <= coverage(estimates, bandit.true_value) <= hi / REPS
    values = np.array([e.value for e in estimates])
    # Unbiased: the mean over repetitions is within 3 standard errors of the truth.
    assert abs(values.mean() - bandit.true_value) < 3 * values.std(ddof=1) / np.sqrt(REPS)
    # The reported SE matches the spread across repetitions.
    assert np.mean([e.se for e in estimates]) == pytest.approx(values.std(ddof=1), rel=0.2)


def test_dr_with_a_good_reward_model_has_lower_variance_than_ips(bandit: Bandit) -> None:
    ips_values = np.array([e.value for e in run(bandit, "ips")])
    dr_values = np.array([e.value for e in run(bandit, "dr")])
    assert dr_values.var(ddof=1) < 0.75 * ips_values.var(ddof=1)
    # With the exact reward model, DR's only noise is the clicks' own: lower still.
    exact = make_bandit(model_noise=0.0)
    exact_dr = np.array([e.value for e in run(exact, "dr")])
    assert exact_dr.var(ddof=1) < dr_values.var(ddof=1) * 1.05


def test_clipping_reduces_variance_and_counts_clipped_rows(bandit: Bandit) -> None:
    raw, clipped = run(bandit, "ips"), run(bandit, "ips", max_weight=5.0)
    raw_v, clip_v = np.array([e.value for e in raw]), np.array([e.value for e in clipped])
    assert clip_v.var(ddof=1) < raw_v.var(ddof=1)
    assert np.mean([e.se for e in clipped]) < np.mean([e.se for e in raw])
    assert all(e.n_clipped > 0 and e.max_weight == 5.0 for e in clipped)
    assert np.mean([e.ess for e in clipped]) > np.mean([e.ess for e in raw])
    w, n_clipped = importance_weights(bandit.propensity[0], bandit.target[0], max_weight=5.0)
    assert w.max() == 5.0 and n_clipped == clipped[0].n_clipped


def test_values_se_and_ess_on_a_hand_computed_log() -> None:
    reward = np.array([1.0, 0.0, 1.0, 0.0])
    prop = np.array([0.5, 0.5, 0.25, 1.0])
    target = np.array([1.0, 0.5, 0.5, 0.0])  # weights 2, 1, 2, 0
    est = ips(reward, prop, target)
    assert est.value == pytest.approx((2 + 0 + 2 + 0) / 4)
    phi = np.array([2.0, 0.0, 2.0, 0.0])
    assert est.se == pytest.approx(phi.std(ddof=1) / 2)
    assert est.ess == pytest.approx(5**2 / 9)
    assert snips(reward, prop, target).value == pytest.approx(4 / 5)
    dr = doubly_robust(reward, prop, target, q_hat=np.full(4, 0.5), v_hat=np.full(4, 0.6))
    assert dr.value == pytest.approx(0.6 + np.mean([2 * 0.5, 1 * -0.5, 2 * 0.5, 0.0]))


def test_cluster_robust_se_accounts_for_rows_of_one_request(bandit: Bandit) -> None:
    r, p, t = bandit.reward[0], bandit.propensity[0], bandit.target[0]
    single = ips(r, p, t)
    # Every decision logged twice within the same request: same value; rows are not 2x the information.
    twice = (np.repeat(r, 2), np.repeat(p, 2), np.repeat(t, 2))
    naive = ips(*twice)
    clustered = ips(*twice, cluster=np.repeat(np.arange(r.size), 2))
    assert clustered.value == pytest.approx(single.value)
    assert clustered.se == pytest.approx(single.se, rel=1e-3)
    assert naive.se == pytest.approx(single.se / np.sqrt(2), rel=1e-2)
    assert clustered.n_clusters == r.size


def test_evaluate_log_reads_an_impressions_frame(bandit: Bandit) -> None:
    n = N_ROUNDS
    log = pl.DataFrame(
        {
            "request_id": np.arange(n),
            "click": bandit.reward[0].astype(bool),
            "propensity": bandit.propensity[0],
            "target_propensity": bandit.target[0],
            "q_hat": bandit.q_hat[0],
            "v_hat": bandit.v_hat[0],
        }
    )
    out = evaluate_log(log, OPEConfig(max_weight=10.0))
    assert out["estimator"].to_list() == ["ips", "snips", "dr"]
    dr = out.row(2, named=True)
    ref = doubly_robust(
        bandit.reward[0],
        bandit.propensity[0],
        bandit.target[0],
        bandit.q_hat[0],
        bandit.v_hat[0],
        max_weight=10.0,
    )
    assert (dr["value"], dr["se"], dr["ess"]) == pytest.approx((ref.value, ref.se, ref.ess))
    assert evaluate_log(log.drop("q_hat"))["estimator"].to_list() == ["ips", "snips"]
    with pytest.raises(ValueError, match="missing column 'propensity'"):
        evaluate_log(log.drop("propensity"))
    with pytest.raises(ValueError, match="'target_propensity' has 1 null"):
        evaluate_log(
            log.with_columns(
                pl.when(pl.col("request_id") == 3)
                .then(None)
                .otherwise(pl.col("target_propensity"))
                .alias("target_propensity")
            )
        )
    with pytest.raises(ValueError, match="max_weight"):
        OPEConfig(max_weight=0.0)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"propensity": [0.5, 0.5]}, "propensity has length 2, expected 3"),
        ({"target_propensity": [0.5]}, "target_propensity has length 1, expected 3"),
        ({"propensity": [0.5, 0.0, 0.5]}, "propensity must be in \\(0, 1\\]"),
        ({"propensity": [0.5, 1.2, 0.5]}, "propensity must be in \\(0, 1\\]"),
        ({"target_propensity": [0.5, -0.1, 0.5]}, "target_propensity must be in \\[0, 1\\]"),
        ({"reward": [1.0, np.nan, 0.0]}, "reward contains NaN"),
        ({"max_weight": -1.0}, "max_weight"),
        ({"cluster": [1, 1, 1]}, "at least 2 clusters"),
        ({"cluster": [1, 2]}, "cluster has shape"),
    ],
)
def test_input_errors_name_the_field(kwargs: dict, match: str) -> None:
    args = {"reward": [1.0, 0.0, 1.0], "propensity": [0.5, 0.5, 0.5], "target_propensity": [0.2, 0.3, 0.4]}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ips(**args)
    with pytest.raises(ValueError, match="q_hat has length 2"):
        doubly_robust([1.0, 0.0, 1.0], [0.5] * 3, [0.2] * 3, q_hat=[0.1, 0.1], v_hat=[0.1] * 3)
