"""Unique-id gather/pool: host dedup, Triton (interpreter) vs PyTorch reference, forward + backward."""

from __future__ import annotations

import pytest
import torch

from recsys.models.ops.unique_pooling import deduplicate, unique_gather


def _case(batch: int, seq_len: int, n_items: int, dim: int, seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_items + 1, (batch, seq_len), generator=g)
    lengths = torch.randint(0, seq_len + 1, (batch,), generator=g)
    # left padding: the valid steps are the last `length` ones
    pad = torch.arange(seq_len).unsqueeze(0) < (seq_len - lengths).unsqueeze(1)
    ids[pad] = 0
    unique, inverse = deduplicate(ids)
    table = torch.randn(n_items + 1, dim, generator=g, dtype=dtype)
    return ids, unique, inverse, table


def test_deduplicate_round_trip_and_padding() -> None:
    ids = torch.tensor([[0, 0, 7, 3], [3, 3, 9, 7]])
    unique, inverse = deduplicate(ids)
    assert unique.tolist() == [3, 7, 9]
    assert inverse.dtype == torch.int32
    assert inverse.tolist() == [[-1, -1, 1, 0], [0, 0, 2, 1]]
    valid = inverse >= 0
    assert torch.equal(unique[inverse[valid].long()], ids[valid])


def test_deduplicate_rejects_float_ids() -> None:
    with pytest.raises(TypeError, match="int32/int64"):
        deduplicate(torch.zeros(2, 3))


@pytest.mark.parametrize("pool", ["none", "sum", "mean"])
def test_reference_equals_plain_lookup(pool: str) -> None:
    ids, unique, inverse, table = _case(5, 9, 12, 6, seed=0)
    dense = table[ids] * (ids != 0).unsqueeze(-1)  # [B, L, D], padding zeroed
    expected = {
        "none": dense,
        "sum": dense.sum(1),
        "mean": dense.sum(1) / (ids != 0).sum(1, keepdim=True).clamp_min(1),
    }
    got = unique_gather(table[unique], inverse, pool=pool, backend="pytorch")
    torch.testing.assert_close(got, expected[pool])


@pytest.mark.parametrize("pool", ["none", "sum", "mean"])
@pytest.mark.parametrize(
    ("batch", "seq_len", "n_items", "dim", "seed"),
    [
        (4, 37, 20, 16, 1),
        (3, 1, 5, 8, 2),
        (6, 70, 300, 130, 3),
        (1, 5, 3, 3, 4),
        (0, 4, 5, 8, 5),
        (3, 0, 5, 8, 6),
    ],
)
def test_triton_matches_reference_forward_backward(
    pool: str, batch: int, seq_len: int, n_items: int, dim: int, seed: int
) -> None:
    _, unique, inverse, table = _case(batch, seq_len, n_items, dim, seed)
    grads = {}
    outs = {}
    for backend in ("pytorch", "triton"):
        rows = table[unique].clone().requires_grad_(True)
        out = unique_gather(rows, inverse, pool=pool, backend=backend)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 100))
        (out * weight).sum().backward()
        outs[backend], grads[backend] = out.detach(), rows.grad
    torch.testing.assert_close(outs["triton"], outs["pytorch"])
    torch.testing.assert_close(grads["triton"], grads["pytorch"])


@pytest.mark.parametrize("pool", ["none", "mean"])
def test_all_padding_gives_zeros_and_empty_gradient(pool: str) -> None:
    ids = torch.zeros(3, 6, dtype=torch.int64)
    unique, inverse = deduplicate(ids)
    assert unique.numel() == 0
    for backend in ("pytorch", "triton"):
        rows = torch.zeros(0, 4, requires_grad=True)
        out = unique_gather(rows, inverse, pool=pool, backend=backend)
        assert torch.count_nonzero(out) == 0
        out.sum().backward()
        assert rows.grad is not None and rows.grad.shape == (0, 4)


def test_gradient_sums_over_repeated_occurrences() -> None:
    ids = torch.tensor([[5, 5, 5, 2]])
    unique, inverse = deduplicate(ids)  # unique = [2, 5]
    for backend in ("pytorch", "triton"):
        rows = torch.ones(2, 3, requires_grad=True)
        unique_gather(rows, inverse, pool="sum", backend=backend).sum().backward()
        assert rows.grad.tolist() == [[1.0] * 3, [3.0] * 3]


def test_bad_arguments_are_named() -> None:
    rows = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="int32"):
        unique_gather(rows, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="pool"):
        unique_gather(rows, torch.zeros(2, 3, dtype=torch.int32), pool="max")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        unique_gather(rows, torch.zeros(2, 3, dtype=torch.int32), backend="cuda")  # type: ignore[arg-type]
