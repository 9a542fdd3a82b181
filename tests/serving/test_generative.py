"""The generator-backed retriever: registered like any retriever, ``/recommend`` (the engine's recommend)
returns only real catalogue items produced by constrained beam search, with their sequence log-probabilities,
and ``/rank`` scores candidates by the same log-probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from recsys.models.generative_retrieval import (
    GenerativeRetriever,
    GeneratorConfig,
    ServedGenerator,
    TokenLayout,
)
from recsys.models.semantic_ids import SemanticIds, add_dedup_code
from recsys.serving.registry import load_model, register_model
from recsys.serving.schemas import RankRequest, RecommendRequest
from recsys.serving.service import Recommender, ServingConfig
from tests.inprocess_service import service_client

NUM_ITEMS = 40
ITEM_OFFSET = 500  # raw id = offset + item_idx: the engine must map ids


@pytest.fixture(scope="module")
def tag() -> str:
    # 40 items over 3 levels of 4 codes: most of the 64 code prefixes are not real items.
    codes = add_dedup_code(np.random.default_rng(0).integers(0, 4, size=(NUM_ITEMS, 3)))
    ids = SemanticIds(codes, codebook_size=4, levels=3)
    torch.manual_seed(0)
    model = GenerativeRetriever(TokenLayout(ids), GeneratorConfig(dim=16, heads=2, layers=1, max_items=6))
    items = pl.DataFrame(
        {"item_id": [ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)], "item_idx": range(1, NUM_ITEMS + 1)}
    )
    histories = pl.DataFrame(
        {"user_id": [7], "item_id": [[ITEM_OFFSET + 3, ITEM_OFFSET + 9]], "ts": [[1, 2]]}
    )
    return register_model(
        "tiny-genret",
        architecture="genret",
        task="retrieval",
        model=ServedGenerator.wrap(model, ids, beam=3).eval(),
        items=items,
        data_version="tiny",
        histories=histories,
    )


def engine(tag: str, beam: int | None = None) -> Recommender:
    config = ServingConfig(retriever=tag, log_impressions=False, device="cpu", beam_width=beam)
    return Recommender.from_config(config)


def test_codes_survive_registration(tag: str) -> None:
    loaded = load_model(tag)
    module = loaded.module
    assert isinstance(module, ServedGenerator)
    assert module.trie is not None and len(module.trie.items) == NUM_ITEMS
    assert loaded.card.architecture == "genret"


@pytest.mark.parametrize("beam", [None, 8])
def test_recommend_returns_only_real_unseen_items_from_beam_search(tag: str, beam: int | None) -> None:
    served = engine(tag, beam)
    catalogue = {ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)}
    for history in ([3, 9, 14], [1], [5, 6, 7, 8, 20, 33, 2]):
        raw = [ITEM_OFFSET + i for i in history]
        request = RecommendRequest.model_validate(
            {"history": [{"item_id": i, "ts": t} for t, i in enumerate(raw)], "k": 50}
        )
        response = served.recommend(request)
        got = [item.item_id for item in response.items]
        assert got, "beam search generated nothing"
        assert set(got) <= catalogue and not set(got) & set(raw)
        assert len(set(got)) == len(got)
        assert response.scored_by == "beam-search" and response.source == "retrieval"
        scores = [item.score for item in response.items]
        assert scores == sorted(scores, reverse=True) and all(s <= 0.0 for s in scores)
        # A recommended item's score is its sequence log-probability: /rank computes it without search.
        ranked = served.rank(
            RankRequest.model_validate({"history": request.model_dump()["history"], "candidates": got})
        )
        np.testing.assert_allclose(ranked.scores["score"], scores, rtol=1e-5, atol=1e-5)


def test_a_wider_beam_generates_more_items(tag: str) -> None:
    request = RecommendRequest.model_validate({"user_id": 7, "k": 100})
    narrow = engine(tag, 1).recommend(request).items
    wide = engine(tag, 8).recommend(request).items
    assert len(wide) > len(narrow) >= 1
    assert {i.item_id for i in narrow} <= {i.item_id for i in wide}  # beam 1's path is in beam 8's tree


def test_recommend_over_the_services_http_routes(
    tag: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``/recommend`` of the BentoML service's own ASGI app (routes, validation, batching), in process."""
    env = {
        "RECSYS_SERVING_RETRIEVER": tag,
        "RECSYS_SERVING_BEAM_WIDTH": "5",
        "RECSYS_SERVING_IMPRESSIONS_DIR": str(tmp_path / "impressions"),
        "RECSYS_SERVING_TORCH_THREADS": "1",
    }
    catalogue = {ITEM_OFFSET + i for i in range(1, NUM_ITEMS + 1)}
    with service_client(env) as client:
        for body in ({"user_id": 7, "k": 20}, {"history": [{"item_id": ITEM_OFFSET + 11, "ts": 5}], "k": 20}):
            response = client.post("/recommend", json=body)
            assert response.status_code == 200, response.text
            payload = response.json()
            got = [item["item_id"] for item in payload["items"]]
            assert got and set(got) <= catalogue and payload["scored_by"] == "beam-search"
