"""recsys.simulation.arms: the in-process engine, the reference policies, and ONE integration test of HttpArm
against a real ``bentoml serve`` on 127.0.0.1 (the fixture of tests/serving/test_integration.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from recsys.serving.schemas import HistoryEvent, RecommendOptions, RecommendRequest
from recsys.simulation.arms import (
    ArmClient,
    ArmError,
    HttpArm,
    InProcessArm,
    OracleArm,
    RandomArm,
    arm_from_tag,
)
from recsys.simulation.response import FittedResponse, FittedResponseConfig
from recsys.simulation.simulator import SimulationConfig, simulate
from tests.serving.test_integration import API_KEY, Server, server  # noqa: F401  (the server fixture)
from tests.serving.test_service import (
    ITEM_OFFSET,
    NUM_ITEMS,
    USER_OFFSET,
    register_string_twin,
    train_and_register,
)
from tests.simulation.test_experiment import register_tiny_popularity
from tests.simulation.test_simulator import N_ITEMS, tiny_world


def _request(user: int, ts: int, seen: list[int], k: int = 4) -> RecommendRequest:
    return RecommendRequest(
        user_id=user,
        ts=ts,
        k=k,
        history=[HistoryEvent(item_id=i, ts=ts - 100 + n) for n, i in enumerate(seen)],
        options=RecommendOptions(exclude_seen=True),
    )


def test_in_process_arm_is_the_serving_engine() -> None:
    tag = register_tiny_popularity()
    arm = InProcessArm.from_tag(tag, policy_temperature=0.0)
    assert isinstance(arm, ArmClient) and arm.name == tag and arm.policy_temperature == 0.0
    counts = arm.engine.retriever.catalog.popularity
    ids = arm.engine.retriever.catalog.item_ids
    best = ids[1:][np.argsort(-counts[1:], kind="stable")].tolist()
    requests = [_request(3, 10_000, best[:2]), _request(4, 10_000, [])]
    batch = arm.recommend_many(requests)
    single = [arm.recommend(r) for r in requests]
    for got, one in zip(batch, single, strict=True):
        assert [i.item_id for i in got.items] == [i.item_id for i in one.items]
    assert [i.item_id for i in batch[0].items] == best[2:6]  # greedy popularity, the seen items excluded
    assert [i.item_id for i in batch[1].items] == best[:4]
    assert all(i.propensity == 1.0 for i in batch[0].items)  # greedy: deterministic policy


def test_a_seeded_in_process_arm_serves_the_same_slates_again() -> None:
    tag = register_tiny_popularity()
    requests = [_request(u, 10_000 + u, []) for u in range(1, 9)]

    def slates(seed: int) -> list[tuple[int, list[int]]]:
        arm = InProcessArm.from_tag(tag, policy_temperature=1.0, seed=seed)  # stochastic policy
        return [(r.request_id, [i.item_id for i in r.items]) for r in arm.recommend_many(requests)]

    first = slates(7)
    assert slates(7) == first  # same request ids, same Plackett-Luce draws
    assert len({rid for rid, _ in first}) == len(requests)
    assert {rid for rid, _ in slates(8)}.isdisjoint(rid for rid, _ in first)


def test_reference_policies() -> None:
    world = tiny_world()
    items = np.arange(N_ITEMS)
    oracle = OracleArm(world, items, policy_temperature=0.0)
    ts = world.start_ts()
    response = oracle.recommend(_request(5, ts, [0, 1], k=5))
    logits = world.click_logits(np.array([5]), items[None, :], np.array([ts]))[0]
    logits[[0, 1]] = -np.inf
    assert [i.item_id for i in response.items] == np.argsort(-logits, kind="stable")[:5].tolist()
    random = RandomArm(items, seed=3)
    served = random.recommend(_request(5, ts, [0, 1], k=5)).items
    assert [i.propensity for i in served] == pytest.approx([1 / (N_ITEMS - 2 - p) for p in range(5)])
    assert not {0, 1} & {i.item_id for i in served}
    with pytest.raises(ValueError, match="OracleArm needs user_id and ts"):
        oracle.recommend(RecommendRequest(history=[], k=2))


def _cycle_world(server: Server) -> FittedResponse:  # noqa: F811
    """A fitted world over the served catalogue: the tiny models' users and their cyclic histories."""
    rows = [(u, i, 1000 + 100 * n) for u, h in server.models.histories.items() for n, i in enumerate(h)]
    events = pl.DataFrame(rows, schema=["user_id", "item_id", "ts"], orient="row")
    items = pl.DataFrame({"item_id": [ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)]}).with_columns(
        category=pl.when(pl.col("item_id") % 2 == 0).then(pl.lit("even")).otherwise(pl.lit("odd"))
    )
    return FittedResponse.fit(events, items, FittedResponseConfig(holdout_share=0.3, random_item_ctr=0.1))


def test_http_arm_against_a_running_bentoml_server(server: Server) -> None:  # noqa: F811
    arm = HttpArm(server.url, api_key=API_KEY, concurrency=4)
    assert isinstance(arm, ArmClient)
    assert arm.name == server.models.retriever and arm.policy_temperature == 1.0 and arm.pool_size == 200
    with pytest.raises(ArmError, match="401"):
        HttpArm(server.url, api_key="wrong")
    with pytest.raises(ValueError, match="serves .*, not the retriever"):
        arm_from_tag(server.models.popularity, http=server.url, api_key=API_KEY)
    # A short simulation: the HSTU behind HTTP against the popularity model in process.
    world = _cycle_world(server)
    config = SimulationConfig(
        days=2, users_per_day=12, session_length=2, k=3, pre_period_days=1, ope_share=1.0
    )
    control = InProcessArm.from_tag(server.models.popularity)
    log = simulate(config, {"control": control, "treatment": arm}, world)
    treated = log.experiment().filter(pl.col("arm") == "treatment")
    assert treated.height > 0 and set(treated["source"]) == {"retrieval"}
    assert set(treated["item_id"]) <= {ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)}
    assert ((treated["propensity"] > 0) & (treated["propensity"] <= 1)).all()
    assert (treated["propensity"] < 1).any()  # the explore policy, asked for (top-k would log 1.0 only)
    # Off-policy rows: the HTTP arm re-scored the control's requests with its whole pool.
    ope = log.off_policy
    assert ope.height > 0 and ((ope["target_propensity"] >= 0) & (ope["target_propensity"] <= 1)).all()
    assert ope["target_propensity"].sum() > 0
    arm.close()


def test_served_arms_ask_for_exploration_and_speak_the_worlds_ids() -> None:
    """The simulator speaks internal ids; an arm over a model of a string-id dataset translates both ways
    and asks the engine for its explore policy (propensities < 1), whatever the service's default."""
    tiny = train_and_register()
    plain = InProcessArm.from_tag(tiny.retriever, policy_temperature=0.0)
    named = InProcessArm.from_tag(register_string_twin(tiny), policy_temperature=0.0)
    assert named.engine.ids.item_type == "str" and named.engine.ids.user_type == "str"
    user = next(iter(tiny.histories))
    requests = [
        _request(user, 10_000_000, [ITEM_OFFSET + 3, ITEM_OFFSET + 4], k=4),
        _request(USER_OFFSET + 9999, 10_000_000, [], k=3),  # a user the model does not know
    ]
    for a, b in zip(plain.recommend_many(requests), named.recommend_many(requests), strict=True):
        assert [i.item_id for i in a.items] == [i.item_id for i in b.items]  # the world's integer ids
        assert all(isinstance(i.item_id, int) for i in b.items) and a.cold_start == b.cold_start
    stochastic = InProcessArm.from_tag(tiny.retriever, policy_temperature=1.0, seed=0)
    drawn = stochastic.recommend(requests[0])
    assert all(0 < i.propensity < 1 for i in drawn.items)


def test_the_simulator_does_not_import_the_orchestration_layer() -> None:
    """Logic never imports recsys.flows (the simulator used to reach it for PipelineConfig)."""
    root = Path(__file__).resolve().parents[2] / "recsys" / "simulation"
    offenders = []
    for path in sorted(root.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}" for n in names if n == "recsys.flows" or n.startswith("recsys.flows.")
            ]
    assert offenders == []
