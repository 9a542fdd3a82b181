"""Shared layers: token mixing, per-token FFN / MoE, masked attention, SwiGLU, masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from recsys.models.layers import (
    MLP,
    MultiHeadAttention,
    PerTokenFFN,
    PerTokenMoE,
    SwiGLU,
    TokenMixing,
    recent_causal_mask,
    token_mixing,
)


def test_token_mixing_matches_its_definition() -> None:
    b, t, d = 2, 4, 8
    x = torch.randn(b, t, d)
    head = d // t
    expected = torch.empty_like(x)
    for h in range(t):  # new token h = head h of token 0, head h of token 1, ...
        expected[:, h] = torch.cat([x[:, j, h * head : (h + 1) * head] for j in range(t)], dim=-1)
    torch.testing.assert_close(token_mixing(x), expected)
    torch.testing.assert_close(token_mixing(x), x.view(b, t, t, head).transpose(1, 2).reshape(b, t, d))
    # applying it twice is the identity when the token count equals the head count
    torch.testing.assert_close(token_mixing(token_mixing(x)), x)


def test_token_mixing_rejects_indivisible_width() -> None:
    with pytest.raises(ValueError, match="multiple of the token count"):
        token_mixing(torch.randn(1, 3, 8))
    with pytest.raises(ValueError, match="multiple of the token count"):
        TokenMixing(3, 8)


def test_per_token_ffn_has_distinct_weights_per_token() -> None:
    torch.manual_seed(0)
    ffn = PerTokenFFN(n_tokens=3, dim=4, expansion=4)
    assert ffn.up.weight.shape == (3, 4, 16) and ffn.down.weight.shape == (3, 16, 4)
    x = torch.randn(1, 1, 4).expand(2, 3, 4)  # the same vector in every token slot
    y = ffn(x)
    assert not torch.allclose(y[:, 0], y[:, 1]) and not torch.allclose(y[:, 1], y[:, 2])
    # token t's output is exactly its own FFN
    t = 2
    manual = F.gelu(x[:, t] @ ffn.up.weight[t] + ffn.up.bias[t]) @ ffn.down.weight[t] + ffn.down.bias[t]
    torch.testing.assert_close(y[:, t], manual)
    # the gradient of token 0's output reaches only token 0's weights
    ffn(x)[:, 0].sum().backward()
    assert ffn.up.weight.grad[0].abs().sum() > 0
    assert ffn.up.weight.grad[1:].abs().sum() == 0


def test_moe_sparse_inference_equals_dense_and_exposes_l1() -> None:
    torch.manual_seed(0)
    moe = PerTokenMoE(n_tokens=4, dim=8, n_experts=3, expansion=2)
    x = torch.randn(5, 4, 8)
    dense, l1 = moe.train()(x)
    sparse, l1_eval = moe.eval()(x)
    torch.testing.assert_close(sparse, dense)
    gates = F.relu(moe.router(x))
    assert (gates == 0).any() and (gates > 0).any()  # ReLU routing: a varying number of active experts
    torch.testing.assert_close(l1, gates.sum(-1).mean())
    torch.testing.assert_close(l1_eval, l1)
    moe.train()
    l1.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_attention_mask_and_safe_softmax() -> None:
    torch.manual_seed(0)
    attn = MultiHeadAttention(dim=8, n_heads=2).eval()
    q, ctx = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    mask = torch.ones(2, 3, 5, dtype=torch.bool)
    mask[0, 1] = False  # query 1 of example 0 may see nothing
    mask[1, :, 3:] = False  # example 1 may not see keys 3 and 4
    out = attn(q, ctx, mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 1], attn.out_proj.bias)  # zero attention output, then the projection
    # masked keys have no influence
    ctx2 = ctx.clone()
    ctx2[1, 3:] = 50.0
    torch.testing.assert_close(attn(q, ctx2, mask)[1], out[1])
    # matches a hand-written softmax attention on an unmasked row
    k, v = attn.kv(ctx)
    qh = attn._heads(attn.q_proj(q))
    weights = torch.softmax(qh[0] @ k[0].transpose(-1, -2) / 2.0, dim=-1)  # d_h = 4 -> scale 1/2
    manual = attn.out_proj((weights @ v[0]).transpose(0, 1).reshape(3, 8))
    torch.testing.assert_close(out[0, [0, 2]], manual[[0, 2]])


def test_recent_causal_mask() -> None:
    valid = torch.tensor([[False, True, True, True]])
    mask = recent_causal_mask(valid, 2)  # queries = positions 2 and 3
    assert mask.tolist() == [[[False, True, True, False], [False, True, True, True]]]


def test_swiglu_and_mlp() -> None:
    torch.manual_seed(0)
    swiglu = SwiGLU(4, 6)
    x = torch.randn(3, 4)
    torch.testing.assert_close(swiglu(x), swiglu.w2(F.silu(swiglu.w1(x)) * swiglu.w3(x)))
    mlp = MLP(4, (8, 8), 2)
    assert mlp(x).shape == (3, 2) and mlp.out_dim == 2
    assert MLP(4, (8,)).out_dim == 8
