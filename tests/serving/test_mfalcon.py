"""M-FALCON for the generative ranker: cached history keys/values + micro-batched candidates give the scores
of a full forward pass per candidate; and the retrieval HSTU's user vector from the last query alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.experiments.ranking import build_model as build_ranker
from recsys.models.batch import FeatureSpec, SequenceSpec, SideField, SparseField
from recsys.models.hstu import HSTU
from recsys.models.hstu_ranker import History, HSTURanker, HSTURankerConfig
from recsys.models.registry import build_model
from recsys.models.sequential import last_valid
from recsys.serving.mfalcon import (
    MFalconScorer,
    encode_user,
    history_query_ts,
    naive_scores,
    request_targets,
    truncate,
    truncate_history,
)
from recsys.serving.registry import load_model, register_model, register_ranker
from recsys.serving.schemas import RankRequest, RecommendRequest
from recsys.serving.service import Recommender, ServingConfig
from recsys.warehouse import Warehouse
from tests.serving.test_featurize import MAX_LEN, synthetic_warehouse

N_ITEMS = 50
SPEC = FeatureSpec(
    n_items=N_ITEMS,
    sparse=(
        SparseField(name="user", cardinality=9, group="user"),
        SparseField(name="category", cardinality=6, group="item"),
        SparseField(name="hour", cardinality=25, group="context"),
    ),
    dense=("d0", "d1"),
    sequences=(
        SequenceSpec(
            name="history",
            max_len=10,
            side=(SideField(name="category", cardinality=6), SideField(name="action", cardinality=7)),
        ),
    ),
    tasks=("click", "like"),
)


def _ranker(mode: str = "interleave") -> HSTURanker:
    torch.manual_seed(0)
    model = HSTURanker(
        HSTURankerConfig(
            features=SPEC, embedding_dim=16, num_heads=2, dqk=4, dv=4, dropout=0.1, action_mode=mode
        )
    )
    with torch.no_grad():  # untrained tables are ~0.02: make them large so a wrong position or time shows up
        model.position_embedding.weight.normal_(std=1.0)
        model.time_embedding.weight.normal_(std=1.0)
    return model.eval()


def _history() -> History:
    """Four ragged histories (6, 0, 10 and 3 events) with gaps from seconds to months."""
    g = torch.Generator().manual_seed(3)
    lengths = torch.tensor([6, 0, 10, 3])
    valid = torch.arange(10)[None, :] < lengths[:, None]
    gaps = torch.randint(1, 10**7, (4, 10), generator=g)
    return History(
        items=torch.randint(1, N_ITEMS + 1, (4, 10), generator=g) * valid,
        side={
            "category": torch.randint(1, 6, (4, 10), generator=g) * valid,
            "action": torch.randint(1, 7, (4, 10), generator=g) * valid,
        },
        ts=torch.cumsum(gaps, dim=1) * valid,
        lengths=lengths,
    )


def _candidates(history: History, m: int, seed: int = 1):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    b = history.lengths.shape[0]
    request = history.ts.max(dim=1).values + torch.tensor([30, 4000, 86400 * 40, 7])
    return request_targets(
        history,
        torch.randint(1, N_ITEMS + 1, (b, m), generator=g),
        request,
        sparse={
            "user": torch.randint(1, 9, (b, m), generator=g),
            "category": torch.randint(0, 6, (b, m), generator=g),
            "hour": torch.randint(1, 25, (b, m), generator=g),
        },
        dense=torch.randn(b, m, 2, generator=g),
    )


@pytest.mark.parametrize("mode", ["interleave", "add"])
@pytest.mark.parametrize(("m", "micro_batch"), [(1, 1), (7, 3), (1000, 256)])
def test_m_falcon_equals_a_full_forward_per_candidate(mode: str, m: int, micro_batch: int) -> None:
    model = _ranker(mode)
    history = _history()
    candidates = _candidates(history, m)
    fast = MFalconScorer(model, micro_batch=micro_batch).score(history, candidates)
    slow = naive_scores(model, history, candidates, batch=500)
    for task in ("click", "like"):
        assert fast[task].shape == (4, m)
        torch.testing.assert_close(fast[task], slow[task], rtol=1e-5, atol=1e-5)
    # ... and the scores depend on the candidate (not a constant per user) and on the history.
    assert m == 1 or float(fast["click"][2].std()) > 0
    assert not torch.allclose(fast["click"][0], fast["click"][2])


def test_micro_batch_size_does_not_change_the_scores() -> None:
    model = _ranker()
    history = _history()
    candidates = _candidates(history, 9)
    one = MFalconScorer(model, micro_batch=1).score(history, candidates)
    all_at_once = MFalconScorer(model, micro_batch=64).score(history, candidates)
    torch.testing.assert_close(one["click"], all_at_once["click"], rtol=1e-5, atol=1e-6)


def test_candidates_share_the_position_and_time_after_the_history() -> None:
    """A candidate's score must not depend on where it sits among the candidates or on the others."""
    model = _ranker()
    history = _history()
    candidates = _candidates(history, 8)
    scorer = MFalconScorer(model, micro_batch=8)
    full = scorer.score(history, candidates)["click"]
    flipped = candidates.narrow(0, 8)
    flipped.items = candidates.items.flip(1)
    flipped.sparse = {k: v.flip(1) for k, v in candidates.sparse.items()}
    flipped.dense = candidates.dense.flip(1)
    torch.testing.assert_close(scorer.score(history, flipped)["click"], full.flip(1), rtol=1e-5, atol=1e-6)
    # A later request time is a different time bucket for the candidates: the scores move.
    later = request_targets(
        history, candidates.items, candidates.ts[:, 0] + 86400 * 365, candidates.sparse, candidates.dense
    )
    assert not torch.allclose(scorer.score(history, later)["click"], full)


def test_long_histories_keep_their_most_recent_events() -> None:
    model = _ranker()
    history = _history()
    longer = History(
        items=torch.cat([torch.randint(1, N_ITEMS, (4, 5)), history.items], dim=1),
        side={k: torch.cat([torch.ones(4, 5, dtype=torch.int64), v], dim=1) for k, v in history.side.items()},
        ts=torch.cat([torch.zeros(4, 5, dtype=torch.int64), history.ts], dim=1),
        lengths=history.lengths,
    )
    # Rows are right-padded: put the 5 extra events in front of each row's own events.
    for r in range(4):
        n = int(history.lengths[r])
        extra = torch.arange(1, 6)
        longer.items[r, : 5 + n] = torch.cat([extra, history.items[r, :n]])
        longer.side["category"][r, : 5 + n] = torch.cat(
            [torch.ones(5, dtype=torch.int64), history.side["category"][r, :n]]
        )
        longer.side["action"][r, : 5 + n] = torch.cat(
            [torch.ones(5, dtype=torch.int64), history.side["action"][r, :n]]
        )
        longer.ts[r, : 5 + n] = torch.cat([torch.arange(5), history.ts[r, :n]])
        longer.items[r, 5 + n :] = 0
    longer.lengths = history.lengths + 5
    cut = truncate(longer, 10)
    assert cut.lengths.tolist() == [10, 5, 10, 8]
    assert cut.items[2].tolist() == history.items[2].tolist()  # 15 events -> the 10 most recent
    candidates = _candidates(history, 5)
    scores = MFalconScorer(model).score(
        longer, request_targets(longer, candidates.items, candidates.ts[:, 0])
    )
    torch.testing.assert_close(
        scores["click"][2],
        MFalconScorer(model).score(history, request_targets(history, candidates.items, candidates.ts[:, 0]))[
            "click"
        ][2],
    )


def test_padding_candidates_score_zero_and_bad_arguments_are_named() -> None:
    model = _ranker()
    history = _history()
    candidates = _candidates(history, 3)
    candidates.items[1, 2] = 0
    scores = MFalconScorer(model).score(history, candidates)
    assert float(scores["click"][1, 2]) == 0.0
    with pytest.raises(ValueError, match="micro_batch"):
        MFalconScorer(model, micro_batch=0)
    with pytest.raises(ValueError, match="rows"):
        request_targets(history, torch.ones(2, 3, dtype=torch.int64), torch.zeros(2, dtype=torch.int64))
    model.train()
    with pytest.raises(RuntimeError, match="eval mode"):
        MFalconScorer(model).score(history, candidates)


# -- the retrieval HSTU's user vector ------------------------------------------------------------------------
def _hstu(num_blocks: int, use_time_bias: bool) -> HSTU:
    torch.manual_seed(0)
    model = build_model(
        "hstu",
        num_items=40,
        max_len=12,
        embedding_dim=16,
        num_heads=2,
        dqk=8,
        dv=8,
        dropout=0.0,
        use_time_bias=use_time_bias,
        num_blocks=num_blocks,
    )
    for block in model.blocks:
        torch.nn.init.normal_(block.pos_weight, std=0.5)
        if block.ts_weight is not None:
            torch.nn.init.normal_(block.ts_weight, std=0.5)
    assert isinstance(model, HSTU)
    return model.eval()


@pytest.mark.parametrize("num_blocks", [1, 3])
@pytest.mark.parametrize("use_time_bias", [True, False])
def test_user_vector_from_the_last_query_alone_equals_the_model(num_blocks: int, use_time_bias: bool) -> None:
    model = _hstu(num_blocks, use_time_bias)
    items = torch.tensor([[3, 4, 5, 6, 7, 0, 0], [1, 2, 3, 4, 5, 6, 7], [0] * 7, [9, 0, 0, 0, 0, 0, 0]])
    ts = torch.tensor(
        [[10, 200, 3000, 40000, 500000, 0, 0], [1, 5, 50, 500, 5000, 50000, 500000], [0] * 7, [8] + [0] * 6]
    )
    lengths = torch.tensor([5, 7, 0, 1])
    request_ts = torch.tensor([600_000, 10**8, 99, 50])
    with torch.no_grad():
        fast = encode_user(model, items, ts, lengths, request_ts)
        full = last_valid(model(items, ts, history_query_ts(ts, lengths, request_ts), lengths), lengths)
    torch.testing.assert_close(fast[[0, 1, 3]], full[[0, 1, 3]], rtol=1e-5, atol=1e-6)
    assert torch.count_nonzero(fast[2]) == 0


def test_truncate_history_keeps_the_most_recent_items() -> None:
    items = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 0, 0, 0, 0, 0, 0]])
    ts = torch.arange(1, 9).expand(2, 8).clone()
    short_items, _, short_lengths = truncate_history(items, ts, torch.tensor([8, 2]), 5)
    assert short_items.tolist() == [[4, 5, 6, 7, 8], [9, 10, 0, 0, 0]]
    assert short_lengths.tolist() == [5, 2]


# -- the service: a registered generative ranker scores /rank and /recommend through M-FALCON ----------------
def test_the_service_ranks_with_the_generative_ranker_through_m_falcon(tmp_path: Path) -> None:
    built = synthetic_warehouse(tmp_path)
    torch.manual_seed(0)
    model, _ = build_ranker("hstu-ranker", built.data, MAX_LEN, {"embedding_dim": 16, "dqk": 8, "dv": 8})
    with torch.no_grad():
        model.position_embedding.weight.normal_(std=1.0)
        model.time_embedding.weight.normal_(std=1.0)
    with Warehouse(built.path) as wh:
        tag = register_ranker(
            "tiny-gen-ranker", architecture="hstu-ranker", model=model, wh=wh, data=built.data
        )
        items = wh.sql("SELECT item_id, item_idx FROM syn.item_index ORDER BY item_idx")
        user = int(wh.sql("SELECT user_id FROM syn.sequences ORDER BY len(item_idx) DESC LIMIT 1")[0, 0])
    pop = build_model("popularity", num_items=items.height)
    retriever = register_model(
        "tiny-gen-ranker-pop",
        architecture="popularity",
        task="retrieval",
        model=pop,
        items=items.with_columns(popularity=pl.lit(1.0)),
        data_version=built.data.data_version,
    )
    config = ServingConfig(
        retriever=retriever, ranker=tag, policy_temperature=0.0, pool_size=20, micro_batch=7
    )
    engine = Recommender(config, load_model(retriever), load_model(tag))
    try:
        ts = int(built.data.splits["test"].ts.max()) + 3600
        candidates = items["item_id"].to_numpy()[:40]
        response = engine.rank(RankRequest(user_id=user, candidates=candidates.tolist(), ts=ts))
        assert response.source == "ranker" and response.scored_by == "m-falcon"
        # The scores are those of the model's full forward pass per candidate row (training's batches).
        ranker = engine.ranker
        assert ranker is not None and ranker.featurizer is not None
        f = ranker.featurizer
        batch = f.batch([f.user_features(user, ts)], [f.map_items(candidates)])
        with torch.no_grad():
            direct = ranker.module(batch).logits
        for task in built.data.tasks:
            np.testing.assert_allclose(
                response.scores[task], direct[task].double().numpy(), rtol=1e-4, atol=1e-4
            )
        listed = engine.recommend(RecommendRequest(user_id=user, k=5, ts=ts))
        assert listed.source == "ranker" and listed.scored_by == "m-falcon"
        assert [it.score for it in listed.items] == sorted((it.score for it in listed.items), reverse=True)
    finally:
        engine.close()
