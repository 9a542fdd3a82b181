"""The packed computations (valid history steps only) against the padded ones they replace: same outputs on
valid positions (zeros elsewhere) and the same gradients, over histories of mixed lengths including empty
ones. The references below are the padded formulations, written out."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from recsys.models.batch import RankingBatch, SequenceBatch, demo_spec, synthetic_batch
from recsys.models.deepfm import DeepFM, DeepFMConfig
from recsys.models.din import DIN, DINConfig
from recsys.models.embeddings import FeatureEmbedding, gather_rows
from recsys.models.layers import MultiHeadAttention
from recsys.models.longer import Longer, LongerConfig
from tests.models.ranking_checks import single_thread  # noqa: F401  (autouse fixture)

MAX_LEN = 19  # not a multiple of the merge K: the grid is left-padded


def _batch(seed: int = 0, n: int = 24) -> RankingBatch:
    """A random batch whose histories run from empty to full (every length mod K occurs)."""
    spec = demo_spec(max_len=MAX_LEN)
    batch = synthetic_batch(spec, n, seed=seed)
    g = torch.Generator().manual_seed(seed)
    lengths = torch.arange(n) % (MAX_LEN + 1)
    valid = torch.arange(MAX_LEN).unsqueeze(0) >= (MAX_LEN - lengths).unsqueeze(1)
    side = {
        s.name: torch.randint(1, s.cardinality, (n, MAX_LEN), generator=g) * valid
        for s in spec.sequence("history").side
    }
    batch.sequences["history"] = SequenceBatch(
        lengths=lengths,
        time_gap=torch.rand(n, MAX_LEN, generator=g) * 1e6 * valid,
        side=side,
        item_ids=torch.randint(1, spec.n_items + 1, (n, MAX_LEN), generator=g) * valid,
    )
    batch.validate(spec)
    return batch


def _padded_tokens_longer(model: Longer, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """LONGER's sequence tokens over the whole padded grid (the formulation before packing)."""
    seq = batch.sequences[model.sequence_name]
    length = seq.seq_len
    valid = seq.valid_mask()
    steps = model.sparse_arch.sequence(batch, model.sequence_name)
    gaps = model.sparse_arch.time_gap_embedding(batch, model.sequence_name)
    positions = torch.arange(model.max_len - length, model.max_len)
    x = model.token_mlp(torch.cat([steps, gaps], dim=-1) + model.position(positions)) * valid.unsqueeze(-1)
    k = model.config.merge_k
    pad = (-length) % k
    if pad:
        x = nn.functional.pad(x, (0, 0, pad, 0))
        valid = nn.functional.pad(valid, (pad, 0), value=False)
    b, n, d = x.shape
    groups, group_valid = x.view(b, n // k, k, d), valid.view(b, n // k, k)
    if model.inner is not None:
        flat = groups.reshape(b * (n // k), k, d)
        out = model.inner(flat, mask=group_valid.reshape(b * (n // k), 1, k))
        groups = out.view(b, n // k, k, d) * group_valid.unsqueeze(-1)
    merged = model.merge_proj(groups.reshape(b, n // k, k * d))
    merged_valid = group_valid.any(dim=-1)
    return merged * merged_valid.unsqueeze(-1), merged_valid


def _padded_forward_din(model: DIN, batch: RankingBatch) -> torch.Tensor:
    candidate = model.sparse_arch.candidate(batch)
    parts = [model.sparse_arch.semantic_slots(batch).flatten(1), candidate]
    for name in model.sequences:
        steps = model.sparse_arch.sequence(batch, name) + model.sparse_arch.time_gap_embedding(batch, name)
        parts.append(model.attention[name](steps, candidate, batch.sequences[name].valid_mask()))
    return model.heads(model.deep_arch(torch.cat(parts, dim=1)))["click"]


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _assert_same(new: torch.Tensor, old: torch.Tensor, model: nn.Module) -> None:
    """Values equal; then the gradients of one random projection of both equal too."""
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    weight = torch.randn(new.shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    (new * weight).sum().backward()
    g_new = _grads(model)
    model.zero_grad()
    (old * weight).sum().backward()
    g_old = _grads(model)
    assert g_new
    # A parameter without a gradient on one side must have a zero one on the other (the key bias of folded
    # attention: a constant per softmax row, so its gradient is exactly zero).
    params = dict(model.named_parameters())
    for k in g_new.keys() | g_old.keys():
        zero = torch.zeros_like(params[k])
        a, b = g_new.get(k, zero), g_old.get(k, zero)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


@pytest.mark.parametrize(("merge_k", "mode"), [(4, "inner_trans"), (4, "concat"), (1, "concat")])
def test_longer_packed_tokens_match_the_padded_grid(merge_k: int, mode: str) -> None:
    torch.manual_seed(0)
    model = Longer(
        LongerConfig(
            features=demo_spec(max_len=MAX_LEN),
            embedding_dim=8,
            token_dim=8,
            merge_k=merge_k,
            merge_mode=mode,  # type: ignore[arg-type]
            model_dim=16,
            n_queries=3,
        )
    )
    batch = _batch()
    new, new_valid = model.sequence_tokens(batch)
    old, old_valid = _padded_tokens_longer(model, batch)
    assert torch.equal(new_valid, old_valid)
    assert bool((new[~new_valid] == 0).all())
    _assert_same(new, old, model)


@pytest.mark.parametrize("norm", ["none", "softmax"])
def test_din_packed_attention_matches_the_padded_one(norm: str) -> None:
    torch.manual_seed(0)
    model = DIN(DINConfig(features=demo_spec(max_len=MAX_LEN), embedding_dim=8, attention_norm=norm))  # type: ignore[arg-type]
    batch = _batch(seed=3)
    _assert_same(model(batch).logits["click"], _padded_forward_din(model, batch), model)


@pytest.mark.parametrize("mode", ["sum", "mean"])
def test_pooled_sequence_sums_only_the_valid_steps(mode: str) -> None:
    torch.manual_seed(0)
    emb = FeatureEmbedding(demo_spec(max_len=MAX_LEN), dim=6)
    batch = _batch(seed=4)
    seq = batch.sequences["history"]
    valid = seq.valid_mask()
    old = (emb.sequence(batch, "history") * valid.unsqueeze(-1)).sum(1)
    if mode == "mean":
        old = old / valid.sum(1, keepdim=True).clamp_min(1)
    new = emb.pooled_sequence(batch, "history", mode)  # type: ignore[arg-type]
    assert bool((new[seq.lengths == 0] == 0).all())
    _assert_same(new, old, emb)
    # and a whole model built on it
    torch.manual_seed(0)
    model = DeepFM(DeepFMConfig(features=demo_spec(max_len=MAX_LEN), embedding_dim=8))
    assert torch.isfinite(model(batch).logits["click"]).all()


def test_gather_rows_matches_embedding_including_the_padding_row() -> None:
    table = nn.Embedding(10, 3, padding_idx=0)
    index = torch.tensor([[0, 3, 3], [9, 0, 1]])
    weight = torch.randn(2, 3, 3)
    (gather_rows(table, index) * weight).sum().backward()
    new = table.weight.grad.clone()
    table.zero_grad()
    (table(index) * weight).sum().backward()
    torch.testing.assert_close(new, table.weight.grad)
    assert bool((new[0] == 0).all()) and bool((new[3] != 0).any())


@pytest.mark.parametrize(("heads", "n_q", "n_k"), [(2, 3, 11), (1, 4, 9), (3, 2, 17)])
def test_attention_with_folded_keys_matches_projected_keys(heads: int, n_q: int, n_k: int) -> None:
    """``attend_context`` (keys/values folded into the queries) against ``attend`` over projected K/V, with
    padding keys, a query row that sees no key at all, and gradients to every weight and input."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(12, heads)
    query = torch.randn(3, n_q, 12, requires_grad=True)
    context = torch.randn(3, n_k, 12, requires_grad=True)
    mask = torch.rand(3, n_q, n_k) > 0.4
    mask[0, 0] = False  # a row with no key
    mask[1] = False  # an example with no keys
    assert attn._fold_keys(n_q, n_k)
    new = attn(query, context, mask)
    old = attn.attend(query, *attn.kv(context), mask)
    _assert_same(new, old, attn)
    # the inputs' gradients too
    weight = torch.randn(new.shape)
    g_new = torch.autograd.grad((attn(query, context, mask) * weight).sum(), (query, context))
    g_old = torch.autograd.grad(
        (attn.attend(query, *attn.kv(context), mask) * weight).sum(), (query, context)
    )
    for a, b in zip(g_new, g_old, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_attention_keeps_projected_keys_with_dropout_or_many_queries() -> None:
    attn = MultiHeadAttention(12, 2, dropout=0.1)
    assert not attn._fold_keys(2, 50)  # training with attention dropout: P's rows no longer sum to one
    assert attn.eval()._fold_keys(2, 50)
    assert not attn._fold_keys(20, 50)  # H * N_q queries of width D would cost more than projecting
    assert not attn._fold_keys(8, 8)  # self-attention
