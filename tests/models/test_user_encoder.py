"""The user encoder's mask dial: what each query may see, and that visibility really changes the outputs."""

from __future__ import annotations

import math

import pytest
import torch

from recsys.models.user_encoder import UserEncoder, UserEncoderConfig, attention_bias

INF = float("-inf")


def test_bias_causal_soft_and_padding() -> None:
    lengths = torch.tensor([3, 2])
    causal = attention_bias(lengths, 3, None)[:, 0]
    assert causal[0].tolist() == [[0, INF, INF], [0, 0, INF], [0, 0, 0]]
    # Row 1 has two valid tokens: key 2 is padding for every query but the padded query itself.
    assert causal[1].tolist() == [[0, INF, INF], [0, 0, INF], [0, 0, 0]]

    soft = attention_bias(lengths, 3, torch.tensor([1.0, 0.5, 0.25]))[:, 0]
    assert soft[0, 0].tolist() == pytest.approx([0, math.log(0.5), math.log(0.25)])
    assert soft[0, 1].tolist() == pytest.approx([0, 0, math.log(0.25)])
    assert soft[1, 0].tolist() == pytest.approx([0, math.log(0.5), INF])
    full = attention_bias(lengths, 3, torch.ones(3))[:, 0]
    assert full[0].eq(0).all() and full[1, :2, :2].eq(0).all()


def test_causal_outputs_ignore_the_future_and_bidirectional_ones_do_not() -> None:
    torch.manual_seed(0)
    model = UserEncoder(UserEncoderConfig(num_items=20, max_len=6, dim=8, num_heads=2, dropout=0.0)).eval()
    a = torch.tensor([[1, 2, 3, 4, 5, 0]])
    b = torch.tensor([[1, 2, 3, 9, 5, 0]])  # differs at position 3 only
    lengths = torch.tensor([5])
    with torch.no_grad():
        _, ha = model.states(a, lengths, None)
        _, hb = model.states(b, lengths, None)
        assert torch.allclose(ha[0, :3], hb[0, :3]) and not torch.allclose(ha[0, 3], hb[0, 3])
        _, fa = model.states(a, lengths, torch.ones(6))
        _, fb = model.states(b, lengths, torch.ones(6))
        assert not torch.allclose(fa[0, 0], fb[0, 0])
        user, _ = model(a, lengths, torch.ones(6))
    assert user.norm(dim=-1).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="max_len"):
        model(torch.ones(1, 7, dtype=torch.long), torch.tensor([7]))
