"""HyFormer: query generation, per-layer decoding and boosting, one and two sequences, encoder options."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from recsys.models.batch import demo_spec, synthetic_batch
from recsys.models.hyformer import HyFormer, HyFormerConfig
from tests.models import ranking_checks as checks
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

# S*N + M tokens: 1*2 + 2 = 4 or 2*2 + 2 = 6 -> model_dim 24 divides both
SMALL = checks.TINY_SIZES | {
    "model_dim": 24,
    "n_feature_tokens": 2,
    "n_queries": 2,
    "query_hidden": 16,
    "n_layers": 2,
    "n_heads": 2,
    "longer_queries": 4,
    "ffn_expansion": 2,
}
ENCODERS = ("transformer", "longer", "swiglu")


def _factory(encoder: str = "transformer", **extra: object) -> checks.ModelFactory:
    return checks.config_factory(HyFormer, HyFormerConfig, **SMALL | {"sequence_encoder": encoder} | extra)


@pytest.mark.parametrize("encoder", ENCODERS)
@pytest.mark.parametrize("n_sequences", [1, 2])
def test_shapes_multitask_and_dedup(encoder: str, n_sequences: int) -> None:
    checks.check_shapes(_factory(encoder), demo_spec(n_sequences=n_sequences, tasks=("click", "like")))


@pytest.mark.parametrize("encoder", ENCODERS)
def test_learns(encoder: str) -> None:
    checks.check_learns(_factory(encoder), demo_spec(n_sequences=2))


def test_round_trip(tmp_path: Path) -> None:
    checks.check_round_trip(_factory(), demo_spec(n_sequences=2), tmp_path)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padding_and_empty_history(encoder: str) -> None:
    checks.check_padding_invariance(_factory(encoder), demo_spec(n_sequences=2))
    checks.check_empty_history(_factory(encoder), demo_spec(n_sequences=2))


def test_both_sequences_reach_the_score() -> None:
    torch.manual_seed(0)
    spec = demo_spec(n_sequences=2)
    model = _factory()(spec).eval()
    batch = synthetic_batch(spec, 6, seed=1)
    base = model(batch).logits["click"]
    for name in ("history", "history_1"):
        seq = batch.sequences[name]
        assert seq.item_ids is not None
        shuffled = replace(seq, item_ids=torch.where(seq.item_ids > 0, seq.item_ids % 60 + 1, 0))
        changed = replace(batch, sequences={**batch.sequences, name: shuffled})
        assert not torch.allclose(model(changed).logits["click"], base), f"{name} has no influence"


def test_sequence_subset_and_token_count() -> None:
    spec = demo_spec(n_sequences=2)
    model = _factory(sequences=("history_1",))(spec)
    assert model.n_tokens == 1 * 2 + 2
    assert model(synthetic_batch(spec, 3)).logits["click"].shape == (3,)
    with pytest.raises(ValidationError, match="multiple of it"):
        HyFormerConfig(features=spec, **SMALL | {"model_dim": 20})
    with pytest.raises(ValidationError, match="not in features"):
        HyFormerConfig(features=spec, **SMALL | {"sequences": ("nope",)})
