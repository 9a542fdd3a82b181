"""HSTU (public-benchmark variant): the block's arithmetic against a hand-written loop, causality, padding
invariance (the normaliser is max_len, not the batch width), the time bias, and the base/large presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from recsys.models.hstu import HSTU, HSTUConfig
from recsys.models.registry import build_model, model_config


def _config(**kw: object) -> HSTUConfig:
    base = {"num_items": 20, "max_len": 8, "embedding_dim": 4, "num_blocks": 1, "dqk": 2, "dv": 2}
    return HSTUConfig(**{**base, **kw})


def _batch(
    rows: list[list[int]], width: int, ts_rows: list[list[int]] | None = None
) -> tuple[torch.Tensor, ...]:
    items = torch.zeros(len(rows), width, dtype=torch.long)
    ts = torch.zeros(len(rows), width, dtype=torch.long)
    qts = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        n = len(row)
        t = ts_rows[r] if ts_rows else [1000 * (i + 1) for i in range(n + 1)]
        items[r, :n] = torch.tensor(row)
        ts[r, :n] = torch.tensor(t[:n])
        qts[r, :n] = torch.tensor(t[1 : n + 1])
    return items, ts, qts, torch.tensor([len(r) for r in rows])


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def test_block_matches_the_formula_written_out() -> None:
    torch.manual_seed(0)
    cfg = _config(dropout=0.0)
    model = HSTU(cfg).eval()
    block = model.blocks[0]
    with torch.no_grad():
        block.pos_weight.normal_()
        block.ts_weight.normal_()
    x = torch.randn(1, 3, 4)
    ts = torch.tensor([[0, 50, 4000]])
    qts = torch.tensor([[50, 4000, 90000]])
    lengths = torch.tensor([3])
    got = block(x, lengths, ts, qts)

    h = F.silu(_ln(x[0]) @ block.uvqk)  # [3, 8]
    u, v, q, k = h[:, 0:2], h[:, 2:4], h[:, 4:6], h[:, 6:8]
    out = torch.zeros(3, 2)
    for i in range(3):
        for j in range(i + 1):  # causal, diagonal included
            gap = abs(int(qts[0, i]) - int(ts[0, j]))
            bucket = min(max(math.floor(math.log(max(gap, 1)) / 0.301), 0), 128)
            s = q[i] @ k[j] + block.pos_weight[j - i + cfg.max_len - 1] + block.ts_weight[bucket]
            out[i] += F.silu(s) / cfg.max_len * v[j]  # no softmax, normalised by max_len
    expected = x[0] + block.output(u * _ln(out))
    torch.testing.assert_close(got[0], expected, rtol=1e-5, atol=1e-5)


def test_output_unit_norm_causal_and_zero_padded() -> None:
    torch.manual_seed(1)
    model = HSTU(_config(num_blocks=2)).eval()
    items, ts, qts, lengths = _batch([[1, 2, 3, 4], [5, 6]], width=5)
    with torch.no_grad():
        out = model(items, ts, qts, lengths)
    assert out.shape == (2, 5, 4)
    torch.testing.assert_close(out[0, :4].norm(dim=-1), torch.ones(4))
    assert float(out[1, 2:].abs().sum()) == 0.0
    changed = items.clone()
    changed[0, 3] = 9
    out2 = model(changed, ts, qts, lengths)
    torch.testing.assert_close(out[0, :3], out2[0, :3])
    assert not torch.allclose(out[0, 3], out2[0, 3])


def test_padding_width_does_not_change_valid_outputs() -> None:
    torch.manual_seed(2)
    model = HSTU(_config(num_blocks=2)).eval()
    narrow = model(*_batch([[3, 1, 4]], width=3))
    wide = model(*_batch([[3, 1, 4]], width=8))
    torch.testing.assert_close(narrow[0], wide[0, :3])


def test_time_bias_uses_the_query_time() -> None:
    torch.manual_seed(3)
    model = HSTU(_config()).eval()
    with torch.no_grad():
        model.blocks[0].ts_weight.normal_()
    items, ts, qts, lengths = _batch([[1, 2, 3]], width=3)
    later = qts.clone()
    later[0, 2] += 10**7  # only the last position's query time moves (into another bucket)
    a, b = model(items, ts, qts, lengths), model(items, ts, later, lengths)
    torch.testing.assert_close(a[0, :2], b[0, :2])
    assert not torch.allclose(a[0, 2], b[0, 2])

    no_time = HSTU(_config(use_time_bias=False)).eval()
    assert no_time.blocks[0].ts_weight is None
    torch.testing.assert_close(no_time(items, ts, qts, lengths), no_time(items, ts, later, lengths))


def test_base_and_large_presets() -> None:
    base = build_model("hstu", num_items=100)
    large = build_model("hstu-large", num_items=100)
    assert isinstance(base, HSTU) and isinstance(large, HSTU)
    assert len(base.blocks) == 2 and tuple(base.blocks[0].uvqk.shape) == (50, 4 * 50)
    assert len(large.blocks) == 8 and tuple(large.blocks[0].uvqk.shape) == (50, 4 * 2 * 25)
    assert large.blocks[0].output.in_features == 50 and large.config.num_heads == 2
    assert base.input.item_embedding.num_embeddings == 101
    assert model_config("hstu-large", num_items=5, num_blocks=3).num_blocks == 3  # explicit fields win


def test_unknown_model_name_is_a_clear_error() -> None:
    with pytest.raises(KeyError, match="unknown model 'hstu-xl'"):
        build_model("hstu-xl", num_items=5)


def _previous_block_forward(
    block: torch.nn.Module, x: torch.Tensor, lengths: torch.Tensor, ts: torch.Tensor, qts: torch.Tensor
) -> torch.Tensor:
    """The block as it was before the shared attention index: mask, position and bucket rebuilt per block,
    each table read with its own gather."""
    c = block.config
    b, n, d = x.shape
    u, v, q, k = torch.split(F.silu(_ln(x) @ block.uvqk), block.split_sizes, dim=-1)
    q, k = q.reshape(b, n, c.num_heads, c.dqk), k.reshape(b, n, c.num_heads, c.dqk)
    v = v.reshape(b, n, c.num_heads, c.dv)
    ar = torch.arange(n)
    allowed = (ar[None, :] <= ar[:, None]) & (ar[:, None] < lengths[:, None, None])
    allowed = allowed & (ar[None, :] < lengths[:, None, None])  # [B, N, N]
    max_pos = c.max_len
    pos = torch.minimum(ar[None, :], lengths[:, None])
    rel = (pos[:, None, :] - pos[:, :, None]).clamp(-(max_pos - 1), max_pos - 1) + max_pos - 1
    bias = block.pos_weight[rel]
    gap = (qts[:, :, None] - ts[:, None, :]).abs().clamp(min=1)
    thresholds = torch.tensor([math.ceil(math.exp(0.301 * kk)) for kk in range(1, 129)])
    bias = bias + block.ts_weight[torch.bucketize(gap, thresholds, right=True)]
    scores = torch.einsum("bihd,bjhd->bhij", q, k) + bias[:, None]
    attn = torch.where(allowed[:, None], F.silu(scores) / c.max_len, 0.0)
    out = torch.einsum("bhij,bjhd->bihd", attn, v).reshape(b, n, -1)
    return x + block.output(u * _ln(out))


def test_shared_attention_index_matches_the_per_block_formulation_with_grads() -> None:
    torch.manual_seed(4)
    model = HSTU(_config(num_blocks=3, num_heads=2, max_len=9, dropout=0.0)).train()
    with torch.no_grad():
        for block in model.blocks:
            block.pos_weight.normal_()
            block.ts_weight.normal_()
    gaps = [[0, 1, 3, 60, 4000, 90_000, 10**6, 3 * 10**7, 10**8, 10**8 + 5]]
    times = [list(torch.tensor(g).cumsum(0).tolist()) for g in gaps]
    items, ts, qts, lengths = _batch([[1, 2, 3, 4, 5, 6, 7, 8, 9], [4, 5]], width=9, ts_rows=times * 2)
    target = torch.randn(2, 9, 4)

    def loss_of(out: torch.Tensor) -> torch.Tensor:
        return (out * target).sum()

    new = model(items, ts, qts, lengths)
    new_grads = torch.autograd.grad(loss_of(new), list(model.parameters()))

    mask = (torch.arange(9)[None, :] < lengths[:, None]).unsqueeze(-1)
    x = model.input(items, lengths)
    for block in model.blocks:
        x = _previous_block_forward(block, x, lengths, ts, qts)
    old = F.normalize(x, dim=-1) * mask
    old_grads = torch.autograd.grad(loss_of(old), list(model.parameters()))

    torch.testing.assert_close(new, old, rtol=1e-6, atol=1e-6)
    names = [name for name, _ in model.named_parameters()]
    for name, got, want in zip(names, new_grads, old_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    assert float(new_grads[names.index("blocks.1.ts_weight")].abs().sum()) > 0  # the time bias is in play


def test_attention_index_is_built_once_per_forward_for_the_reference_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import recsys.models.hstu as hstu_module

    calls = []
    real = hstu_module.hstu_attention_index
    monkeypatch.setattr(
        hstu_module, "hstu_attention_index", lambda *a, **kw: calls.append(1) or real(*a, **kw)
    )
    model = HSTU(_config(num_blocks=3)).eval()
    model(*_batch([[1, 2, 3]], width=3))
    assert len(calls) == 1
    items, ts, qts, lengths = _batch([[1, 2]], width=2)
    assert HSTU(_config(attention_backend="triton")).attention_index(lengths, ts, qts) is None
    index = model.attention_index(lengths, ts, qts)
    assert index is not None and index.num_buckets == 129 and index.max_pos == 8
    assert HSTU(_config(use_time_bias=False)).attention_index(lengths, ts, qts).num_buckets is None
