"""The service logic (``serving.service.Recommender``) with a small HSTU trained in seconds on tiny data."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from pydantic import ValidationError

from recsys.evaluation.retrieval import leave_one_out
from recsys.models.registry import build_model
from recsys.serving.impressions import ImpressionLogger, read_spool
from recsys.serving.registry import list_models, load_model, register_model, resolve
from recsys.serving.schemas import RankRequest, RankResponse, RecommendRequest
from recsys.serving.service import (
    AdaptiveBatcher,
    InvalidRequest,
    Recommender,
    RequestIds,
    ServerProcessConfig,
    ServingConfig,
)
from recsys.training.loop import LoopConfig, OptimizerConfig, fit
from recsys.training.retrieval import RetrievalTask, RetrievalTrainConfig

NUM_ITEMS = 12
ITEM_OFFSET = 100  # raw item id = ITEM_OFFSET + item_idx: the service must map ids, not pass them through
USER_OFFSET = 1000
NOW = 10_000_000


@dataclass(frozen=True)
class TinyModels:
    retriever: str  # tag of the trained HSTU
    popularity: str  # tag of the popularity model on the same catalogue
    histories: dict[int, list[int]]  # user_id -> raw item ids


def cyclic_sequences(users: int = 48, seed: int = 0) -> pl.DataFrame:
    """Each user walks the item cycle 1 -> 2 -> ... -> 12 -> 1 from a random start (next item is known)."""
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(1, users + 1):
        start, n = int(rng.integers(0, NUM_ITEMS)), int(rng.integers(4, 15))
        rows.append((u, [(start + i) % NUM_ITEMS + 1 for i in range(n)], [1000 + 100 * i for i in range(n)]))
    return pl.DataFrame(
        {"user_idx": [r[0] for r in rows], "item_idx": [r[1] for r in rows], "ts": [r[2] for r in rows]}
    )


def train_and_register(name: str = "tiny-hstu") -> TinyModels:
    """Train HSTU on the cycle (a few seconds) and register it with a popularity model on the same catalogue.

    Training is deterministic, so a model already in the (per-session) store is reused, not trained again."""
    sequences = cyclic_sequences()
    if list_models(name) and list_models(f"{name}-pop"):
        return TinyModels(resolve(name), resolve(f"{name}-pop"), _raw_histories(sequences))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model on a shared machine: extra threads only add contention
    try:
        split = leave_one_out(sequences, NUM_ITEMS)
        torch.manual_seed(0)
        model = build_model(
            "hstu", num_items=NUM_ITEMS, max_len=16, dropout=0.0, embedding_dim=32, dqk=32, dv=32
        )
        task = RetrievalTask(model, split, RetrievalTrainConfig(max_len=15, batch_size=16, ks=(1, 5)))
        loop = LoopConfig(
            max_epochs=12,
            patience=12,
            monitor="hr@1",
            progress=False,
            device="cpu",
            optimizer=OptimizerConfig(lr=1e-2),
        )
        result = fit(task, loop)
    finally:
        torch.set_num_threads(before)
    counts = np.bincount(np.concatenate(sequences["item_idx"].to_list()), minlength=NUM_ITEMS + 1)
    items = pl.DataFrame(
        {
            "item_id": [ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)],
            "item_idx": list(range(1, NUM_ITEMS + 1)),
            "category": ["even" if i % 2 == 0 else "odd" for i in range(1, NUM_ITEMS + 1)],
            "popularity": counts[1:].astype(float),
        }
    )
    histories = pl.DataFrame(
        {
            "user_id": [USER_OFFSET + u for u in sequences["user_idx"].to_list()],
            "item_id": [[ITEM_OFFSET + i for i in h] for h in sequences["item_idx"].to_list()],
            "ts": sequences["ts"].to_list(),
        }
    )
    tag = register_model(
        name,
        architecture="hstu",
        task="retrieval",
        model=model,
        items=items,
        data_version="tinycycle",
        metrics=result.best_valid,
        histories=histories,
    )
    pop = build_model("popularity", num_items=NUM_ITEMS)
    pop.load_counts(torch.from_numpy(counts).float())
    pop_tag = register_model(
        f"{name}-pop",
        architecture="popularity",
        task="retrieval",
        model=pop,
        items=items,
        data_version="tinycycle",
    )
    return TinyModels(tag, pop_tag, _raw_histories(sequences))


def _raw_histories(sequences: pl.DataFrame) -> dict[int, list[int]]:
    return {
        USER_OFFSET + int(u): [ITEM_OFFSET + i for i in h]
        for u, h in zip(sequences["user_idx"].to_list(), sequences["item_idx"].to_list(), strict=True)
    }


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny() -> TinyModels:
    return train_and_register()


@pytest.fixture(scope="module")
def engine(tiny: TinyModels) -> Iterator[Recommender]:
    """Greedy policy (T = 0): deterministic lists whose scores can be checked exactly."""
    eng = Recommender(
        ServingConfig(retriever=tiny.retriever, policy_temperature=0.0), load_model(tiny.retriever)
    )
    yield eng
    eng.close()


def _history(items: list[int], start: int = 1000) -> list[dict[str, int]]:
    return [{"item_id": ITEM_OFFSET + i, "ts": start + 100 * n} for n, i in enumerate(items)]


def _retrieval_scores(engine: Recommender, items: list[int], request_ts: int) -> dict[int, float]:
    """Reference scores straight from the model: cos(user vector, item) / temperature for every raw id."""
    model = engine.retriever.module
    idx = torch.tensor([items])
    ts = torch.tensor([[1000 + 100 * n for n in range(len(items))]])
    query = torch.tensor([[*ts[0, 1:].tolist(), request_ts]])
    with torch.no_grad():
        user = model(idx, ts, query, torch.tensor([len(items)]))[0, -1]
        scores = (model.item_vectors() @ user) / engine.retriever.card.temperature
    return {ITEM_OFFSET + i: float(scores[i]) for i in range(1, NUM_ITEMS + 1)}


# -- recommend ---------------------------------------------------------------------------------------------
def test_recommend_continues_the_cycle_with_exact_scores(engine: Recommender) -> None:
    response = engine.recommend(RecommendRequest(history=_history([3, 4, 5]), k=4, ts=NOW))
    ids = [it.item_id for it in response.items]
    assert ids[0] == ITEM_OFFSET + 6  # the trained model knows what follows 3, 4, 5
    assert not {ITEM_OFFSET + 3, ITEM_OFFSET + 4, ITEM_OFFSET + 5} & set(ids)  # exclude_seen
    expected = _retrieval_scores(engine, [3, 4, 5], NOW)
    best = sorted((s, i) for i, s in expected.items() if i not in (103, 104, 105))[::-1][:4]
    assert ids == [i for _, i in best]
    for item in response.items:
        assert item.score == pytest.approx(expected[item.item_id], rel=1e-5, abs=1e-5)
    assert [it.position for it in response.items] == [0, 1, 2, 3]
    assert response.source == "retrieval" and response.cold_start is None
    assert response.models.retriever == engine.retriever.tag and response.models.ranker is None


def test_a_known_user_is_served_from_the_stored_history(engine: Recommender, tiny: TinyModels) -> None:
    user, history = next((u, h) for u, h in tiny.histories.items() if len(h) <= 6)
    response = engine.recommend(RecommendRequest(user_id=user, k=3, ts=NOW))
    assert response.cold_start is None and len(response.items) == 3
    assert not set(history) & {it.item_id for it in response.items}
    nxt = ITEM_OFFSET + (history[-1] - ITEM_OFFSET) % NUM_ITEMS + 1
    assert response.items[0].item_id == nxt


def test_filters_and_exclusions(engine: Recommender) -> None:
    response = engine.recommend(
        RecommendRequest(
            history=_history([1, 2]),
            k=20,
            ts=NOW,
            options={"categories": ["even"], "exclude_items": [ITEM_OFFSET + 4], "exclude_seen": False},
        )
    )
    ids = {it.item_id for it in response.items}
    assert ids == {ITEM_OFFSET + i for i in (2, 6, 8, 10, 12)}  # even items, 4 excluded, seen 2 allowed
    nothing = engine.recommend(
        RecommendRequest(history=_history([1]), k=5, options={"categories": ["no-such"]})
    )
    assert nothing.items == []


def test_cold_start_is_popularity_and_flagged(engine: Recommender) -> None:
    popular = np.argsort(-engine.retriever.catalog.popularity[1:], kind="stable")[:3] + 1 + ITEM_OFFSET
    unknown = engine.recommend(RecommendRequest(user_id=424242, k=3))
    assert unknown.cold_start == "unknown_user" and unknown.source == "popularity"
    assert [it.item_id for it in unknown.items] == popular.tolist()
    empty = engine.recommend(RecommendRequest(history=[], k=3))
    assert empty.cold_start == "empty_history" and [it.item_id for it in empty.items] == popular.tolist()
    strangers = engine.recommend(
        RecommendRequest(history=[{"item_id": 5, "ts": 1}, {"item_id": 7, "ts": 2}], k=3)
    )
    assert strangers.cold_start == "empty_history" and strangers.unknown_history_items == [5, 7]


def test_unknown_history_items_are_ignored_and_reported(engine: Recommender) -> None:
    with_stranger = engine.recommend(
        RecommendRequest(history=[*_history([3, 4]), {"item_id": 9, "ts": 1250}], ts=NOW)
    )
    plain = engine.recommend(RecommendRequest(history=_history([3, 4]), ts=NOW))
    assert with_stranger.unknown_history_items == [9] and with_stranger.cold_start is None
    assert [it.item_id for it in with_stranger.items] == [it.item_id for it in plain.items]


# -- rank --------------------------------------------------------------------------------------------------
def test_rank_scores_every_candidate_in_request_order(engine: Recommender) -> None:
    candidates = [ITEM_OFFSET + 9, ITEM_OFFSET + 6, ITEM_OFFSET + 1]
    response = engine.rank(RankRequest(history=_history([3, 4, 5]), candidates=candidates, ts=NOW))
    expected = _retrieval_scores(engine, [3, 4, 5], NOW)
    assert response.scores["score"] == pytest.approx([expected[c] for c in candidates], rel=1e-5, abs=1e-5)
    assert response.ranking == sorted(candidates, key=lambda c: -expected[c])
    assert response.ranking[0] == ITEM_OFFSET + 6 and response.propensities == [1.0] * 3
    # Built without validation on the hot path: it must still be exactly what validation would give.
    assert RankResponse.model_validate(response.model_dump()) == response


def test_rank_refuses_an_unknown_candidate_naming_it(engine: Recommender) -> None:
    request = RankRequest(history=_history([3]), candidates=[ITEM_OFFSET + 1, 77777, ITEM_OFFSET + 2])
    with pytest.raises(InvalidRequest, match=r"candidates: unknown item ids \[77777\]") as err:
        engine.rank(request)
    assert err.value.field == "candidates" and engine.retriever.tag in str(err.value)


def test_rank_for_an_unknown_user_uses_popularity(engine: Recommender) -> None:
    response = engine.rank(RankRequest(user_id=-3, candidates=[ITEM_OFFSET + 1, ITEM_OFFSET + 2]))
    pop = engine.retriever.catalog.popularity
    assert response.cold_start == "unknown_user" and response.source == "popularity"
    assert response.scores["score"] == pytest.approx([np.log1p(pop[1]), np.log1p(pop[2])])


def test_responses_say_which_path_scored_them(engine: Recommender) -> None:
    """Without a ranker: the retrieval model's user-item dot product; a cold user: the popularity prior."""
    warm = engine.rank(RankRequest(history=_history([3, 4, 5]), candidates=[ITEM_OFFSET + 6], ts=NOW))
    assert warm.source == "retrieval" and warm.scored_by == "user-dot"
    cold = engine.rank(RankRequest(user_id=-3, candidates=[ITEM_OFFSET + 1]))
    assert cold.source == "popularity" and cold.scored_by == "popularity"
    listed = engine.recommend(RecommendRequest(history=_history([3, 4, 5]), k=3, ts=NOW))
    assert listed.scored_by == "user-dot"


def test_a_popularity_retriever_serves_counts(tiny: TinyModels) -> None:
    eng = Recommender(
        ServingConfig(retriever=tiny.popularity, policy_temperature=0), load_model(tiny.popularity)
    )
    response = eng.recommend(RecommendRequest(history=_history([1]), k=2, ts=NOW))
    assert response.source == "popularity"
    pop = eng.retriever.catalog.popularity
    assert [it.score for it in response.items] == pytest.approx(sorted(np.log1p(pop[2:]), reverse=True)[:2])


# -- input checks ------------------------------------------------------------------------------------------
def test_configured_limits_name_the_field(tiny: TinyModels) -> None:
    config = ServingConfig(retriever=tiny.retriever, max_history=3, max_candidates=2, max_k=4)
    eng = Recommender(config, load_model(tiny.retriever))
    cases = [
        (lambda: eng.recommend(RecommendRequest(history=_history([1, 2, 3, 4]), k=1)), "history"),
        (lambda: eng.recommend(RecommendRequest(user_id=1, k=5)), "k"),
        (lambda: eng.rank(RankRequest(user_id=1, candidates=[1, 2, 3])), "candidates"),
        (lambda: eng.rank(RankRequest(user_id=1, candidates=[7, 7])), "candidates"),
        (
            lambda: eng.recommend(RecommendRequest(user_id=1, k=1, options={"exclude_items": [1, 2, 3]})),
            "options.exclude_items",
        ),
    ]
    for call, name in cases:
        with pytest.raises(InvalidRequest) as err:
            call()
        assert err.value.field == name and str(err.value).startswith(f"{name}: ")


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"user_id": ""}, "user_id"),
        ({"user_id": 1.5}, "user_id"),
        ({"user_id": True}, "user_id"),
        ({"user_id": 2**63}, "user_id"),
        ({"history": [{"item_id": 1, "ts": float("nan")}]}, "ts"),
        ({"history": [{"item_id": 2.0, "ts": 1}]}, "item_id"),
        ({"history": [{"item_id": 1, "ts": -5}]}, "ts"),
        ({"user_id": 1, "k": 0}, "k"),
        ({"user_id": 1, "options": {"categories": []}}, "categories"),
        ({"user_id": 1, "surprise": 1}, "surprise"),
        ({}, "user_id or history"),
    ],
)
def test_malformed_recommend_requests_are_rejected_naming_the_field(payload: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        RecommendRequest.model_validate(payload)
    assert field in str(err.value)


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"user_id": 1, "candidates": []}, "candidates"),
        ({"user_id": 1, "candidates": [1, None]}, "candidates"),
    ],
)
def test_malformed_rank_requests_are_rejected_naming_the_field(payload: dict, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        RankRequest.model_validate(payload)
    assert field in str(err.value)


def test_config_from_env_names_the_variable() -> None:
    config = ServingConfig.from_env({"RECSYS_SERVING_RETRIEVER": "m:latest", "RECSYS_SERVING_MAX_K": "7"})
    assert config.max_k == 7 and config.ranker is None
    with pytest.raises(ValueError, match="RECSYS_SERVING_MAX_K"):
        ServingConfig.from_env({"RECSYS_SERVING_RETRIEVER": "m", "RECSYS_SERVING_MAX_K": "lots"})
    with pytest.raises(ValueError, match="RECSYS_SERVING_RETRIEVER"):
        ServingConfig.from_env({})


# -- policy, impressions, batching -------------------------------------------------------------------------
def test_served_lists_are_logged_with_their_propensities(tiny: TinyModels, tmp_path: Path) -> None:
    logger = ImpressionLogger(tmp_path, flush_interval_s=3600)
    config = ServingConfig(retriever=tiny.retriever, policy_temperature=1.0, impressions_max_positions=3)
    eng = Recommender(config, load_model(tiny.retriever), logger=logger)
    response = eng.recommend(
        RecommendRequest(user_id=99, history=_history([3, 4, 5]), k=4, ts=NOW, policy="explore")
    )
    ranked = eng.rank(RankRequest(history=_history([3]), candidates=[101, 102, 103, 104, 105], ts=NOW))
    top_k = eng.recommend(RecommendRequest(user_id=99, history=_history([3, 4, 5]), k=4, ts=NOW))
    eng.close()
    # Position 0's propensity is the softmax of the pool's scores (pool = every unseen item here).
    pool = _retrieval_scores(eng, [3, 4, 5], NOW)
    pool_scores = np.array([s for i, s in pool.items() if i not in (103, 104, 105)])
    top = response.items[0]
    assert top.propensity == pytest.approx(np.exp(top.score) / np.exp(pool_scores).sum(), rel=1e-4)
    assert all(0 < it.propensity <= 1 for it in response.items)
    frame = read_spool(tmp_path)
    served = frame.filter(frame["request_id"] == response.request_id)
    assert served["item_id"].to_list() == [it.item_id for it in response.items][:3]  # capped at 3 positions
    assert served["propensity"].to_list() == pytest.approx([it.propensity for it in response.items][:3])
    assert served["user_id"].to_list() == [99] * 3 and served["ts"].to_list() == [NOW] * 3
    assert served["model_version"].to_list() == [tiny.retriever] * 3
    rank_rows = frame.filter(frame["request_id"] == ranked.request_id)
    assert (
        rank_rows["item_id"].to_list() == ranked.ranking[:3]
        and rank_rows["endpoint"].to_list() == ["rank"] * 3
    )
    # The default top-k is logged too, as the deterministic policy it is: propensity 1, temperature 0.
    greedy = frame.filter(frame["request_id"] == top_k.request_id)
    assert greedy["item_id"].to_list() == [it.item_id for it in top_k.items][:3]
    assert greedy["propensity"].to_list() == [1.0] * 3 and greedy["policy_temperature"].to_list() == [0.0] * 3
    explored = frame.filter(frame["request_id"] == response.request_id)
    assert explored["policy_temperature"].to_list() == [1.0] * 3


def test_recommend_is_the_top_k_unless_exploration_is_asked_for(tiny: TinyModels) -> None:
    """With a sampling temperature configured, a plain request still gets the k best scores in order (the
    same list every time); ``policy: explore`` gets Plackett-Luce draws with propensities below 1."""
    config = ServingConfig(retriever=tiny.retriever, policy_temperature=5.0, request_id_seed=0)
    eng = Recommender(config, load_model(tiny.retriever))
    request = RecommendRequest(history=_history([3, 4, 5]), k=6, ts=NOW)
    expected = _retrieval_scores(eng, [3, 4, 5], NOW)
    best = [i for _, i in sorted(((s, i) for i, s in expected.items() if i not in (103, 104, 105)))[::-1]]
    for _ in range(3):
        served = eng.recommend(request)
        assert [it.item_id for it in served.items] == best[:6]
        assert [it.propensity for it in served.items] == [1.0] * 6
    explore = request.model_copy(update={"policy": "explore"})
    draws = [eng.recommend(explore) for _ in range(8)]
    assert all(it.propensity < 1.0 for d in draws for it in d.items)
    assert len({tuple(it.item_id for it in d.items) for d in draws}) > 1  # T = 5: the order varies
    ranked = eng.rank(RankRequest(history=_history([3]), candidates=[101, 102, 106, 107], ts=NOW))
    assert ranked.propensities == [1.0] * 4
    by_score = sorted(zip(ranked.scores["score"], [101, 102, 106, 107], strict=True), reverse=True)
    assert ranked.ranking == [c for _, c in by_score]
    eng.close()


# -- the dataset's own ids ---------------------------------------------------------------------------------
def sku(item_idx: int) -> str:
    return f"sku-{item_idx:03d}"


def user_name(user_idx: int) -> str:
    return f"u_{user_idx:04d}"


def register_string_twin(tiny: TinyModels) -> str:
    """The tiny HSTU registered for a dataset whose ids are strings: the catalogue carries ``raw_id`` and the
    histories ``raw_user_id`` (what ``catalog_from_warehouse`` / ``histories_from_warehouse`` give for a
    dataset ingested with string ids). Internal ids are the integer twin's."""
    loaded = load_model(tiny.retriever)
    internal = loaded.catalog.item_ids[1:]
    items = pl.DataFrame(
        {
            "item_id": internal,
            "item_idx": np.arange(1, NUM_ITEMS + 1),
            "category": loaded.catalog.category[1:].tolist(),
            "popularity": loaded.catalog.popularity[1:],
            "raw_id": [sku(int(i) - ITEM_OFFSET) for i in internal],
        }
    )
    users = sorted(tiny.histories)
    histories = pl.DataFrame(
        {
            "user_id": users,
            "item_id": [tiny.histories[u] for u in users],
            "ts": [[1000 + 100 * n for n in range(len(tiny.histories[u]))] for u in users],
            "raw_user_id": [user_name(u - USER_OFFSET) for u in users],
        }
    )
    return register_model(
        "tiny-hstu-strings",
        architecture="hstu",
        task="retrieval",
        model=loaded.module,
        items=items,
        data_version="tinycycle",
        histories=histories,
    )


@pytest.fixture(scope="module")
def string_engine(tiny: TinyModels) -> Iterator[Recommender]:
    tag = register_string_twin(tiny)
    eng = Recommender(ServingConfig(retriever=tag), load_model(tag))
    yield eng
    eng.close()


def test_string_ids_in_and_out(string_engine: Recommender, engine: Recommender, tiny: TinyModels) -> None:
    """The same model answers in SKUs what it answers in integers, for users named by their own ids."""
    history = [{"item_id": sku(i), "ts": 1000 + 100 * n} for n, i in enumerate([3, 4, 5])]
    named = string_engine.recommend(RecommendRequest(history=history, k=4, ts=NOW))
    numbered = engine.recommend(RecommendRequest(history=_history([3, 4, 5]), k=4, ts=NOW))
    assert [it.item_id for it in named.items] == [sku(it.item_id - ITEM_OFFSET) for it in numbered.items]
    assert [it.score for it in named.items] == pytest.approx([it.score for it in numbered.items])
    user = next(iter(tiny.histories))
    by_name = string_engine.recommend(RecommendRequest(user_id=user_name(user - USER_OFFSET), k=3, ts=NOW))
    by_number = engine.recommend(RecommendRequest(user_id=user, k=3, ts=NOW))
    assert by_name.cold_start is None
    assert [it.item_id for it in by_name.items] == [sku(it.item_id - ITEM_OFFSET) for it in by_number.items]
    ranked = string_engine.rank(
        RankRequest(history=history, candidates=[sku(9), sku(6), sku(1)], ts=NOW, policy="explore")
    )
    assert set(ranked.ranking) == {sku(9), sku(6), sku(1)}
    excluded = string_engine.recommend(
        RecommendRequest(history=history, k=3, ts=NOW, options={"exclude_items": [sku(6), "sku-nope"]})
    )
    assert sku(6) not in [it.item_id for it in excluded.items]


def test_string_ids_unknowns_and_wrong_types(string_engine: Recommender, engine: Recommender) -> None:
    stranger = string_engine.recommend(RecommendRequest(user_id="u_9999", k=3))
    assert stranger.cold_start == "unknown_user" and stranger.source == "popularity"
    assert all(isinstance(it.item_id, str) and it.item_id.startswith("sku-") for it in stranger.items)
    odd = string_engine.recommend(
        RecommendRequest(history=[{"item_id": "sku-x", "ts": 1}, {"item_id": sku(2), "ts": 2}], ts=NOW)
    )
    assert odd.unknown_history_items == ["sku-x"] and odd.cold_start is None
    with pytest.raises(InvalidRequest, match=r"candidates: unknown item ids \['sku-x', 'sku-y'\]"):
        string_engine.rank(RankRequest(user_id="u_0001", candidates=[sku(1), "sku-x", "sku-y"]))
    wrong = [
        (RecommendRequest(user_id=1001, k=3), "user_id"),
        (RecommendRequest(history=[{"item_id": 101, "ts": 1}]), "history.item_id"),
        (RecommendRequest(user_id="u_0001", options={"exclude_items": [101]}), "options.exclude_items"),
    ]
    for request, name in wrong:
        with pytest.raises(InvalidRequest, match="this model's .* ids are strings") as err:
            string_engine.recommend(request)
        assert err.value.field == name
    with pytest.raises(InvalidRequest, match="user ids are integers; got a string 'u_0001'"):
        engine.recommend(RecommendRequest(user_id="u_0001"))


def test_batched_scoring_equals_one_request_at_a_time(engine: Recommender) -> None:
    requests = [
        RecommendRequest(history=_history([3, 4, 5]), k=3, ts=NOW),
        RecommendRequest(history=_history([7]), k=2, ts=NOW, options={"categories": ["odd"]}),
        RecommendRequest(user_id=55555, k=2),
        RecommendRequest(history=_history([11, 12, 1, 2, 3, 4, 5, 6, 7, 8]), k=3, ts=NOW),
    ]
    jobs = [engine.recommend_job(r) for r in requests]
    together = engine.recommend_many(jobs)
    for job, pool in zip(jobs, together, strict=True):
        alone = engine.recommend_many([job])[0]
        assert pool.item_ids.tolist() == alone.item_ids.tolist() and pool.source == alone.source
        np.testing.assert_allclose(pool.scores, alone.scores, rtol=1e-5, atol=1e-5)
    rank_jobs = [
        engine.rank_job(RankRequest(history=_history([3, 4]), candidates=[101, 105, 106], ts=NOW)),
        engine.rank_job(RankRequest(history=_history(list(range(1, 13))), candidates=[112], ts=NOW)),
    ]
    for job, pool in zip(rank_jobs, engine.rank_many(rank_jobs), strict=True):
        np.testing.assert_allclose(pool.scores, engine.rank_many([job])[0].scores, rtol=1e-5, atol=1e-5)


def test_adaptive_batcher_groups_concurrent_requests() -> None:
    calls: list[list[int]] = []

    def slow_double(jobs: list[int]) -> list[int]:
        calls.append(list(jobs))
        time.sleep(0.05)
        return [2 * j for j in jobs]

    async def main() -> list[int]:
        batcher = AdaptiveBatcher(slow_double, max_batch_size=4)
        return await asyncio.gather(*(batcher.submit(j) for j in range(9)))

    assert asyncio.run(main()) == [2 * j for j in range(9)]
    assert sorted(j for c in calls for j in c) == list(range(9))
    assert max(len(c) for c in calls) == 4 and len(calls) < 9  # concurrent requests were batched

    def broken(jobs: list[int]) -> list[int]:
        raise RuntimeError("model failed")

    async def failing() -> None:
        await AdaptiveBatcher(broken, max_batch_size=2).submit(1)

    with pytest.raises(RuntimeError, match="model failed"):
        asyncio.run(failing())


def test_request_ids_are_unique_63_bit_and_apart_across_engines() -> None:
    a, b = RequestIds(prefix=5), RequestIds(prefix=6)
    ids_a = [a.next() for _ in range(1000)]
    ids_b = [b.next() for _ in range(1000)]
    assert len(set(ids_a) | set(ids_b)) == 2000
    assert all(0 <= i < 2**63 for i in ids_a + ids_b)
    assert ids_a[0] >> 32 == 5  # the prefix names the engine
    assert 0 <= RequestIds().prefix < 2**31
    with pytest.raises(ValueError, match="prefix"):
        RequestIds(prefix=2**31)


def test_process_settings_come_from_the_environment_and_bad_values_are_named() -> None:
    settings = ServerProcessConfig.from_env({"RECSYS_SERVING_WORKERS": "3", "RECSYS_SERVING_ACCESS_LOG": "1"})
    assert (settings.workers, settings.access_log) == (3, True)
    defaults = ServerProcessConfig.from_env({})
    assert defaults.workers == 2 and defaults.keepalive_requests == 100 and defaults.metrics  # a 2-core box
    off = ServerProcessConfig.from_env(
        {"RECSYS_SERVING_KEEPALIVE_REQUESTS": "0", "RECSYS_SERVING_METRICS": "no"}
    )
    assert (off.keepalive_requests, off.metrics) == (0, False)
    with pytest.raises(ValueError, match="RECSYS_SERVING_KEEPALIVE_REQUESTS"):
        ServerProcessConfig.from_env({"RECSYS_SERVING_KEEPALIVE_REQUESTS": "-1"})
    with pytest.raises(ValueError, match="RECSYS_SERVING_WORKERS"):
        ServerProcessConfig.from_env({"RECSYS_SERVING_WORKERS": "0"})
    # The full configuration validates the same variables.
    with pytest.raises(ValueError, match="RECSYS_SERVING_ACCESS_LOG"):
        ServingConfig.from_env({"RECSYS_SERVING_RETRIEVER": "m", "RECSYS_SERVING_ACCESS_LOG": "maybe"})
