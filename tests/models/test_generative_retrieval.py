"""The generator: the trie constraint only lets real items out (property test over random logits), the
decoding call counts, the KV-cached decoding equals a full forward pass, and the GRPO / Sibling-GRPO
advantages equal hand-computed values."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from recsys.models.generative_retrieval import (
    GenerativeRetriever,
    GeneratorConfig,
    NodeEval,
    PolicyEvaluator,
    PrefixTrie,
    SiblingGroup,
    TokenLayout,
    beam_search,
    grpo_advantages,
    next_token_loss,
    rl_loss,
    sample_candidates,
    sibling_advantages,
    sibling_groups,
    topk_sampling_search,
    value_guided_search,
)
from recsys.models.semantic_ids import SemanticIds, add_dedup_code


def _ids(n: int, k: int, seed: int) -> SemanticIds:
    codes = np.random.default_rng(seed).integers(0, k, size=(n, 3))
    return SemanticIds(add_dedup_code(codes), codebook_size=k, levels=3)


class RandomEvaluator:
    """An evaluator with random logits (and values/entropies) in place of a model."""

    def __init__(self, trie: PrefixTrie, users: int, sizes: list[int], seed: int) -> None:
        self.trie, self.sizes = trie, sizes
        self.calls = np.zeros(users, dtype=np.int64)
        self.gen = torch.Generator().manual_seed(seed)

    def evaluate(self, users: Sequence[int], prefixes: Sequence[tuple[int, ...]]) -> NodeEval:
        size = self.sizes[len(prefixes[0])]
        logits = torch.randn(len(prefixes), size, generator=self.gen) * 5
        mask = self.trie.mask(prefixes, size)
        logp = torch.log_softmax(logits.masked_fill(~mask, float("-inf")), -1)
        np.add.at(self.calls, np.asarray(users), 1)
        return NodeEval(logp, torch.rand(len(prefixes), generator=self.gen), torch.rand(len(prefixes)))


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 60),
    k=st.integers(2, 6),
    seed=st.integers(0, 10_000),
    width=st.integers(1, 8),
    budget=st.integers(0, 12),
)
def test_constrained_decoding_only_yields_real_items(
    n: int, k: int, seed: int, width: int, budget: int
) -> None:
    ids = _ids(n, k, seed)
    trie = PrefixTrie(ids.codes)
    sizes = [k, k, k, ids.dedup_size]
    exclude = [set(), {1, 2}]
    for search in (
        lambda ev: beam_search(ev, width, exclude),
        lambda ev: value_guided_search(ev, width, budget, 0.1, exclude),
        lambda ev: topk_sampling_search(ev, budget + 1, width, torch.Generator().manual_seed(seed), exclude),
    ):
        result = search(RandomEvaluator(trie, 2, sizes, seed))
        for u, items in enumerate(result.items):
            assert all(1 <= i <= n for i in items) and len(set(items)) == len(items)
            assert not set(items) & exclude[u]
            assert result.scores[u] == sorted(result.scores[u], reverse=True)
        for u in range(2):  # every evaluated prefix is a real prefix
            assert all(p in trie.children for p in result.nodes[u])


def test_beam_and_value_guided_call_counts() -> None:
    ids = _ids(400, 4, 0)  # 64 first-three-level prefixes: every beam stays full
    trie = PrefixTrie(ids.codes)
    sizes = [4, 4, 4, ids.dedup_size]
    beam = beam_search(RandomEvaluator(trie, 3, sizes, 1), 4)
    np.testing.assert_array_equal(beam.calls, [1 + 3 * 4] * 3)
    ved = value_guided_search(RandomEvaluator(trie, 3, sizes, 1), 4, 9)
    np.testing.assert_array_equal(ved.calls, [1 + 3 * 4 + 9] * 3)
    assert set(beam.items[0]) <= set(ved.items[0]) and len(ved.items[0]) > len(beam.items[0])


def test_topk_sampling_spends_the_beam_budget_on_distinct_nodes() -> None:
    ids = _ids(400, 4, 0)
    trie = PrefixTrie(ids.codes)
    sizes = [4, 4, 4, ids.dedup_size]
    budget = 1 + 3 * 4  # beam 4's calls

    def run(top_k: int, seed: int = 0):  # noqa: ANN202
        gen = torch.Generator().manual_seed(seed)
        return topk_sampling_search(RandomEvaluator(trie, 3, sizes, 1), budget, top_k, gen)

    result = run(2)  # the top-2 tree has 1 + 2 + 4 + 8 = 15 nodes: room for the whole budget
    np.testing.assert_array_equal(result.calls, [budget] * 3)
    for u in range(3):
        assert len(result.nodes[u]) == budget  # sampled without replacement: every call a new node
        for prefix in result.nodes[u]:  # only the top-2 children of an evaluated parent are drawn
            if prefix:
                parent = result.kids[u][prefix[:-1]]
                assert prefix[-1] in sorted(parent, key=lambda c: -parent[c])[:2]
    assert run(2).items == result.items  # seeded: the same draws
    np.testing.assert_array_equal(run(1).calls, [4] * 3)  # top-1: one greedy path, then nothing new


def test_trie_rejects_duplicate_codes() -> None:
    with pytest.raises(ValueError, match="shares its full code"):
        PrefixTrie(np.array([[0, 1, 0, 0], [0, 1, 0, 0]]))


def _model(ids: SemanticIds) -> GenerativeRetriever:
    torch.manual_seed(0)
    return GenerativeRetriever(
        TokenLayout(ids), GeneratorConfig(dim=16, heads=2, layers=2, max_items=6)
    ).eval()


def test_cached_decoding_equals_the_full_forward_pass() -> None:
    ids = _ids(30, 4, 2)
    model = _model(ids)
    histories = [np.array([3, 7, 9]), np.array([5]), np.array([1, 2, 4, 5, 6])]  # + next <= max_items
    nxt = np.array([11, 12, 13])
    with torch.no_grad():
        cache = model.encode_history(histories)
        rows = torch.arange(3)
        prefix = model.item_tokens[torch.from_numpy(nxt)][:, :3]
        cached = model.extend(cache, rows, prefix)  # [3, 3, D]
        full_tokens, pads = model.history_tokens(
            [np.append(h, x) for h, x in zip(histories, nxt, strict=True)]
        )
        full = model(full_tokens, pads)  # [3, T, D]; the last 4 tokens are the next item's
        torch.testing.assert_close(cached, full[:, -4:-1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(cache.last, full[:, -5], atol=1e-5, rtol=1e-5)


def test_next_token_loss_falls_when_training() -> None:
    ids = _ids(20, 4, 3)
    model = _model(ids).train()
    windows = [np.array([1, 2, 3, 4, 5]), np.array([6, 7, 8])]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = float(next_token_loss(model, windows).detach())
    for _ in range(30):
        loss = next_token_loss(model, windows)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(next_token_loss(model, windows).detach()) < 0.5 * first


def test_grpo_advantages_by_hand() -> None:
    np.testing.assert_allclose(grpo_advantages(np.array([1.0, 0.0, 0.0, 1.0]), eps=0.0), [1, -1, -1, 1])


def test_sibling_groups_and_advantages_by_hand() -> None:
    paths = np.array([[0, 1], [0, 2], [0, 2], [1, 0]])
    rewards = np.array([1.0, 0.0, 0.5, 0.25])
    groups = sibling_groups(paths, rewards)
    # depth 0: nodes (0,) mean(1, 0, .5) = .5 and (1,) .25; depth 1 under (0,): (0,1) 1 and (0,2) .25;
    # under (1,): (1,0) alone.
    assert groups == [
        SiblingGroup((), (0, 1), (0.5, 0.25)),
        SiblingGroup((0,), (1, 2), (1.0, 0.25)),
        SiblingGroup((1,), (0,), (0.25,)),
    ]
    adv = sibling_advantages(paths, rewards, eps=0.0)
    # Two siblings a > b: (a - mean) / std = +1 and -1; an only child gets 0.
    np.testing.assert_allclose(adv, [[1, 1], [1, -1], [1, -1], [-1, 0]])


def test_value_mode_trains_only_the_value_head() -> None:
    ids = _ids(30, 4, 4)
    model = _model(ids).train()
    trie = PrefixTrie(ids.codes)
    histories = [np.array([1, 2]), np.array([3, 4, 5])]
    paths = sample_candidates(PolicyEvaluator(model, trie, histories), 4, torch.Generator().manual_seed(0))
    rewards = np.array([[1.0, 0.0, 0.5, 0.0], [0.0, 0.0, 1.0, 0.2]])
    loss, parts = rl_loss(model, trie, histories, paths, rewards, "value")
    loss.backward()
    assert parts["policy_loss"] == 0.0 and parts["value_loss"] > 0
    assert model.tok.weight.grad is None or float(model.tok.weight.grad.abs().sum()) == 0.0
    assert float(model.value_head[0].weight.grad.abs().sum()) > 0
    model.zero_grad()
    loss, parts = rl_loss(model, trie, histories, paths, rewards, "joint")
    loss.backward()
    assert float(model.tok.weight.grad.abs().sum()) > 0
