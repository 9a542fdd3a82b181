"""simulation.simulator: arrivals, hash assignment, sessions, the impressions log and the off-policy rows,
on a tiny synthetic world with model-free arms (random and true-oracle slates)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
import pytest
from pydantic import ValidationError

from recsys.serving.schemas import RecommendRequest, RecommendResponse
from recsys.simulation.arms import OracleArm, RandomArm
from recsys.simulation.response import SessionBehaviour, TrueResponse
from recsys.simulation.simulator import EXPERIMENT, PRE, SimulationConfig, simulate
from recsys.simulation.stats import assign_arm, srm_check
from recsys.synthetic.config import CatalogueConfig, SyntheticConfig, UserConfig

N_USERS = 300
N_ITEMS = 100


def tiny_config(seed: int = 0) -> SyntheticConfig:
    return SyntheticConfig(
        seed=seed,
        catalogue=CatalogueConfig(n_items=N_ITEMS, n_categories=5, n_creators=30),
        users=UserConfig(n_users=N_USERS),
    )


def tiny_world(behaviour: SessionBehaviour | None = None) -> TrueResponse:
    """Fresh users (no logged history) of the tiny world."""
    return TrueResponse(tiny_config(), np.arange(N_USERS), behaviour=behaviour)


class RecordingArm:
    """Wraps an arm and keeps every request it answered."""

    def __init__(self, inner: RandomArm | OracleArm) -> None:
        self.inner = inner
        self.name = inner.name
        self.policy_temperature = inner.policy_temperature
        self.pool_size = inner.pool_size
        self.requests: list[RecommendRequest] = []

    def recommend(self, request: RecommendRequest) -> RecommendResponse:
        return self.recommend_many([request])[0]

    def recommend_many(self, requests: Sequence[RecommendRequest]) -> list[RecommendResponse]:
        self.requests += list(requests)
        return self.inner.recommend_many(requests)


SMALL = SimulationConfig(days=3, users_per_day=80, session_length=4, pre_period_days=1, k=5, ope_share=0.2)


def test_hash_assignment_is_stable_and_follows_the_weights() -> None:
    world = tiny_world()
    items = np.arange(N_ITEMS)
    config = SMALL.model_copy(update={"weights": (0.3, 0.7), "days": 4, "users_per_day": 150})
    log = simulate(config, {"control": RandomArm(items), "treatment": RandomArm(items, seed=1)}, world)
    exp = log.arrivals.filter(pl.col("period") == EXPERIMENT)
    per_user = exp.group_by("user_id").agg(pl.col("arm").n_unique().alias("n"), pl.col("arm").first())
    assert per_user["n"].max() == 1  # a returning user stays in the same arm
    assert (exp.group_by("user_id").len()["len"] > 1).any()  # ... and users did return
    expected = assign_arm(per_user["user_id"].to_numpy(), ["control", "treatment"], [0.3, 0.7], salt="ab")
    assert per_user["arm"].to_list() == expected.tolist()
    counts = per_user.group_by("arm").len()
    observed = dict(zip(counts["arm"], counts["len"], strict=True))
    assert not srm_check(observed, {"control": 0.3, "treatment": 0.7}).flagged
    assert 0.6 < observed["treatment"] / per_user.height < 0.8
    # The pre-period serves everyone with the control, and the impressions carry the arrival's arm.
    assert set(log.arrivals.filter(pl.col("period") == PRE)["arm"]) == {"control"}
    joined = log.experiment().join(
        exp.select("user_id", "day", pl.col("arm").alias("a")), on=["user_id", "day"]
    )
    assert (joined["arm"] == joined["a"]).all()


def test_the_log_follows_the_impressions_contract() -> None:
    world = tiny_world()
    items = np.arange(N_ITEMS)
    arm = RecordingArm(RandomArm(items))
    log = simulate(SMALL, {"control": arm, "treatment": OracleArm(world, items)}, world)
    imp = log.impressions
    contract = ["request_id", "user_id", "item_id", "ts", "position", "propensity", "click", "like"]
    assert imp.columns[:10] == [*contract, "dwell", "p_click"]
    assert imp["position"].min() == 0 and imp["position"].max() == SMALL.k - 1
    assert ((imp["propensity"] > 0) & (imp["propensity"] <= 1)).all()
    assert (imp["dwell"].is_null() == ~imp["click"]).all()  # dwell only with a click
    assert not (imp["like"] & ~imp["click"]).any()
    assert ((imp["p_click"] >= 0) & (imp["p_click"] <= 1)).all()
    # Random arm: propensity of position p is 1 / (items not yet placed) over the unseen catalogue.
    random_rows = imp.filter(pl.col("arm") == "control").group_by("request_id").agg(pl.col("propensity"))
    for props in random_rows["propensity"].to_list()[:20]:
        n = round(1 / props[0])
        assert props == pytest.approx([1 / (n - p) for p in range(len(props))])
    # Histories grow: a request sends the clicks simulated before it.
    clicks = imp.filter(pl.col("click") & (pl.col("arm") == "control")).sort("ts")
    user, first_click_ts = int(clicks["user_id"][0]), int(clicks["ts"][0])
    later = [r for r in arm.requests if r.user_id == user and r.ts > first_click_ts]
    clicked_items = set(clicks.filter(pl.col("user_id") == user)["item_id"].to_list())
    assert later and clicked_items & {e.item_id for e in later[-1].history}
    # exclude_seen: no served item was in the request's history.
    for request in arm.requests[:200]:
        assert request.options.exclude_seen and request.ts is not None
    # Sessions: at most session_length requests per user and day.
    assert log.arrivals["requests"].max() <= SMALL.session_length


def test_a_user_who_always_leaves_makes_one_request() -> None:
    world = tiny_world(SessionBehaviour(leave_after_click=1.0, leave_after_no_click=1.0))
    items = np.arange(N_ITEMS)
    log = simulate(SMALL, {"control": RandomArm(items), "treatment": RandomArm(items, seed=2)}, world)
    assert set(log.arrivals["requests"].to_list()) == {1}
    assert (
        log.impressions.group_by("user_id", "day").agg(pl.col("request_id").n_unique())["request_id"].max()
        == 1
    )


def test_off_policy_rows_of_the_same_policy_have_equal_propensities() -> None:
    world = tiny_world()
    items = np.arange(N_ITEMS)
    log = simulate(SMALL, {"control": RandomArm(items), "treatment": RandomArm(items, seed=5)}, world)
    ope = log.off_policy
    assert ope.height > 0 and set(ope["policy"]) == {"treatment"}
    assert ope["target_propensity"].to_numpy() == pytest.approx(ope["propensity"].to_numpy())
    # The outcome columns are the logged ones.
    joined = ope.join(log.impressions, on=["request_id", "position"], suffix="_log")
    assert joined.height == ope.height
    assert (joined["click"] == joined["click_log"]).all() and (
        joined["item_id"] == joined["item_id_log"]
    ).all()
    # Uniform target over the unseen catalogue: the true value is the mean true P(click) at that position.
    assert ope["true_value"].mean() == pytest.approx(ope["p_click"].mean(), rel=0.35)
    assert (
        ope["q_hat"].is_not_nan().all() and ope["v_hat"].is_not_nan().all()
    )  # reward model from the pre-period


def test_bad_configs_and_arms_are_refused() -> None:
    with pytest.raises(ValidationError, match="weights must have one value per arm"):
        SimulationConfig(weights=(1.0,))
    with pytest.raises(ValidationError, match="control 'x' is not one of the arms"):
        SimulationConfig(control="x")
    with pytest.raises(ValidationError, match="arms must be non-empty, distinct"):
        SimulationConfig(arms=("a", "a"))
    world = tiny_world()
    items = np.arange(N_ITEMS)
    with pytest.raises(ValueError, match=r"arms: got clients for \['control'\]"):
        simulate(SMALL, {"control": RandomArm(items)}, world)
    with pytest.raises(ValueError, match="users_per_day .* exceeds the world's population"):
        simulate(
            SMALL.model_copy(update={"users_per_day": N_USERS + 1}),
            {"control": RandomArm(items), "treatment": RandomArm(items)},
            world,
        )
