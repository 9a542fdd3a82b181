"""LONGER: token merge, cross-causal mask (sequence blind to the candidate), cached scoring, +RankMixer."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from recsys.models.batch import RankingBatch, SequenceBatch, demo_spec, synthetic_batch
from recsys.models.longer import Longer, LongerConfig, LongerRankMixerConfig
from tests.models import ranking_checks as checks
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

SMALL = checks.TINY_SIZES | {
    "token_dim": 8,
    "merge_k": 2,
    "model_dim": 16,
    "n_heads": 2,
    "n_layers": 3,
    "n_queries": 3,
    "n_cls": 2,
}
CONFIGS = {
    "inner_trans": SMALL,
    "concat": SMALL | {"merge_mode": "concat", "merge_k": 4, "model_dim": 32},
    "no_merge": SMALL | {"merge_k": 1, "n_layers": 2},
    # m = 1 target + 2 CLS + user + context + cross = 6 global tokens, + T_f = 2 -> 8 tokens of width 16
    "rankmixer": SMALL | {"rankmixer": LongerRankMixerConfig(n_tokens=2, n_blocks=1, ffn_expansion=2)},
}


def _factory(name: str) -> checks.ModelFactory:
    return checks.config_factory(Longer, LongerConfig, **CONFIGS[name])


def _model(name: str) -> Longer:
    torch.manual_seed(0)
    return _factory(name)(demo_spec()).eval()


def _other_candidates(batch: RankingBatch, seed: int) -> RankingBatch:
    g = torch.Generator().manual_seed(seed)
    sparse = dict(batch.sparse)
    sparse["category"] = torch.randint(0, 8, sparse["category"].shape, generator=g)
    item = torch.randint(1, 61, batch.item_id.shape, generator=g)
    return replace(batch, item_id=item, sparse=sparse, dense=batch.dense + 1.0)


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_multitask_and_dedup(name: str) -> None:
    checks.check_shapes(_factory(name), demo_spec(tasks=("click", "like")))


@pytest.mark.parametrize("name", ["inner_trans", "rankmixer"])
def test_learns(name: str) -> None:
    checks.check_learns(_factory(name), demo_spec())


def test_round_trip(tmp_path: Path) -> None:
    checks.check_round_trip(_factory("rankmixer"), demo_spec(), tmp_path)


@pytest.mark.parametrize("name", ["inner_trans", "concat"])
def test_padding_and_empty_history(name: str) -> None:
    checks.check_padding_invariance(_factory(name), demo_spec())
    checks.check_empty_history(_factory(name), demo_spec())


@pytest.mark.parametrize("name", ["inner_trans", "no_merge"])
def test_sequence_tokens_are_blind_to_the_candidate(name: str) -> None:
    model = _model(name)
    batch = synthetic_batch(demo_spec(), 6, seed=1)
    other = _other_candidates(batch, seed=2)
    states, other_states = model.forward_states(batch), model.forward_states(other)
    m = model.n_global
    for layer, (a, b) in enumerate(zip(states, other_states, strict=True)):
        torch.testing.assert_close(a[:, m:], b[:, m:], msg=f"sequence tokens changed at layer {layer + 1}")
        assert not torch.allclose(a[:, :m], b[:, :m])  # while the global tokens do depend on the candidate
    # and the cached sequence K/V of a request are the same whichever candidate came with it
    for k1, k2 in zip(model.encode_sequence(batch).keys, model.encode_sequence(other).keys, strict=True):
        torch.testing.assert_close(k1, k2)


@pytest.mark.parametrize("name", CONFIGS)
def test_cached_scoring_equals_full_forward(name: str) -> None:
    model = _model(name)
    batch = synthetic_batch(demo_spec(), 6, seed=3)
    cached = model.score(model.encode_sequence(batch), batch)
    torch.testing.assert_close(cached.logits["click"], model(batch).logits["click"], atol=1e-5, rtol=1e-5)


def test_many_candidates_against_one_cache_per_user() -> None:
    model = _model("inner_trans")
    users = synthetic_batch(demo_spec(), 2, seed=4)  # two requests, one history each
    cache = model.encode_sequence(users)
    n_cand = 5
    cache_index = torch.arange(2).repeat_interleave(n_cand)  # [10]: 5 candidates per user
    candidates = _other_candidates(
        replace(
            users,
            item_id=users.item_id[cache_index],
            sparse={k: v[cache_index] for k, v in users.sparse.items()},
            dense=users.dense[cache_index],
            sequences={},
            labels={},
        ),
        seed=5,
    )
    scored = model.score(cache, candidates, cache_index).logits["click"]
    seq = users.sequences["history"]
    assert seq.item_ids is not None
    full_batch = replace(
        candidates,
        sequences={
            "history": SequenceBatch(
                lengths=seq.lengths[cache_index],
                time_gap=seq.time_gap[cache_index],
                side={k: v[cache_index] for k, v in seq.side.items()},
                item_ids=seq.item_ids[cache_index],
            )
        },
    )
    torch.testing.assert_close(scored, model(full_batch).logits["click"], atol=1e-5, rtol=1e-5)
    assert scored.unique().numel() > 2  # candidates of one user do get different scores


def test_queries_are_the_most_recent_tokens_and_causal() -> None:
    # no merge, k = 3: the sequence queries are the steps at positions L-3, L-2, L-1. Changing the newest step
    # changes only the newest query's state (causal mask), in every layer.
    model = _model("no_merge")
    batch = synthetic_batch(demo_spec(), 4, seed=6)
    full = replace(
        batch.sequences["history"],
        lengths=torch.full((4,), 12),
        item_ids=torch.randint(1, 61, (4, 12), generator=torch.Generator().manual_seed(0)),
        time_gap=torch.arange(12, 0, -1).float().expand(4, 12) * 60.0,
    )
    batch = replace(batch, sequences={"history": full})
    tokens, valid = model.sequence_tokens(batch)
    assert tokens.shape == (4, 12, 16) and bool(valid.all())
    newer = full.item_ids.clone()
    newer[:, -1] = newer[:, -1] % 60 + 1
    changed = replace(batch, sequences={"history": replace(batch.sequences["history"], item_ids=newer)})
    m = model.n_global
    for a, b in zip(model.forward_states(batch), model.forward_states(changed), strict=True):
        assert a.shape == (4, m + 3, 16)
        torch.testing.assert_close(a[:, m : m + 2], b[:, m : m + 2])
        assert not torch.allclose(a[:, m + 2], b[:, m + 2])


def test_rankmixer_variant_checks_token_count() -> None:
    bad = LongerConfig(features=demo_spec(), **SMALL | {"rankmixer": LongerRankMixerConfig(n_tokens=3)})
    with pytest.raises(ValueError, match="multiple of it"):
        Longer(bad)
    with pytest.raises(ValueError, match="not in features"):
        LongerConfig(features=demo_spec(), sequence="clicks")
