"""HSTU (public-benchmark variant): the block's arithmetic against a hand-written loop, causality, padding
invariance (the normaliser is max_len, not the batch width), the time bias, and the base/large presets."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.hstu import HSTU, HSTUConfig
from models.registry import build_model, model_config


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
