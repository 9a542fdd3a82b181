"""SASRec: output layout, causality and padding invariance (what the retrieval training relies on)."""

from __future__ import annotations

import pytest
import torch

from recsys.models.registry import build_model
from recsys.models.sasrec import SASRec, SASRecConfig


def _batch(items: list[list[int]], width: int) -> tuple[torch.Tensor, ...]:
    x = torch.zeros(len(items), width, dtype=torch.long)
    for r, row in enumerate(items):
        x[r, : len(row)] = torch.tensor(row)
    lengths = torch.tensor([len(r) for r in items])
    ts = torch.arange(width).repeat(len(items), 1) * 100
    return x, ts, ts + 100, lengths


@pytest.fixture
def model() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(num_items=20, max_len=12, embedding_dim=8, num_heads=2, ffn_dim=8)).eval()


def test_output_is_unit_norm_at_valid_positions_and_zero_at_padding(model: SASRec) -> None:
    items, ts, qts, lengths = _batch([[1, 2, 3], [4, 5, 6, 7, 8]], width=6)
    with torch.no_grad():
        out = model(items, ts, qts, lengths)
    assert out.shape == (2, 6, 8)
    norms = out.norm(dim=-1)
    torch.testing.assert_close(norms[0, :3], torch.ones(3))
    torch.testing.assert_close(norms[1, :5], torch.ones(5))
    assert float(norms[0, 3:].abs().sum()) == 0.0
    items_vec = model.item_vectors().detach()
    assert items_vec.shape == (21, 8)
    torch.testing.assert_close(items_vec[1:].norm(dim=-1), torch.ones(20))
    assert float(items_vec[0].abs().sum()) == 0.0


def test_position_never_sees_later_items(model: SASRec) -> None:
    items, ts, qts, lengths = _batch([[1, 2, 3, 4, 5]], width=5)
    changed = items.clone()
    changed[0, 4] = 9
    a, b = model(items, ts, qts, lengths), model(changed, ts, qts, lengths)
    torch.testing.assert_close(a[0, :4], b[0, :4])
    assert not torch.allclose(a[0, 4], b[0, 4])


def test_padding_width_does_not_change_valid_outputs(model: SASRec) -> None:
    narrow = model(*_batch([[3, 1, 4]], width=3))
    wide = model(*_batch([[3, 1, 4]], width=10))
    torch.testing.assert_close(narrow[0], wide[0, :3])


def test_heads_must_divide_the_embedding_width() -> None:
    with pytest.raises(ValueError, match="embedding_dim"):
        SASRecConfig(num_items=5, embedding_dim=10, num_heads=3)


def test_history_longer_than_max_len_is_rejected(model: SASRec) -> None:
    with pytest.raises(ValueError, match="max_len"):
        model(*_batch([list(range(1, 14))], width=13))


def test_registry_builds_the_public_benchmark_size() -> None:
    m = build_model("sasrec", num_items=100)
    assert isinstance(m, SASRec)
    assert len(m.blocks) == 2 and m.config.embedding_dim == 50 and m.config.max_len == 200
