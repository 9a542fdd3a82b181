"""Layers shared by the ranking models: MLP, RankMixer's token mixing / per-token FFN / sparse MoE, masked
multi-head attention, SwiGLU, feed-forward and a pre-norm transformer block.

Masks are boolean with True = "may attend". Attention is a *safe* softmax: a query row whose keys are all
masked (a padding step, an empty history) returns zeros instead of NaN. Few queries over a long context
(cross-attention) skip the key/value projections of the context: ``MultiHeadAttention.attend_context``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Activation = Literal["relu", "gelu", "silu", "prelu"]


def make_activation(name: Activation) -> nn.Module:
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU()
    if name == "silu":
        return nn.SiLU()
    if name == "prelu":
        return nn.PReLU()
    raise ValueError(f"unknown activation {name!r}")


class MLP(nn.Module):
    """Linear -> activation -> dropout per hidden layer, then an optional final Linear to ``out_dim``."""

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int],
        out_dim: int | None = None,
        dropout: float = 0.0,
        activation: Activation = "relu",
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for h in hidden:
            layers += [nn.Linear(width, h), make_activation(activation), nn.Dropout(dropout)]
            width = h
        if out_dim is not None:
            layers.append(nn.Linear(width, out_dim))
            width = out_dim
        self.net = nn.Sequential(*layers)
        self.out_dim = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def token_mixing(x: torch.Tensor) -> torch.Tensor:
    """RankMixer's parameter-free token mixing: new token h = head h of every token, concatenated.

    [B, T, D] -> [B, T, D] with D % T == 0: ``x.view(B, T, T, D // T).transpose(1, 2).reshape(B, T, D)``.
    """
    b, t, d = x.shape
    if d % t != 0:
        raise ValueError(f"token mixing needs the width D = {d} to be a multiple of the token count T = {t}")
    return x.reshape(b, t, t, d // t).transpose(1, 2).reshape(b, t, d)


class TokenMixing(nn.Module):
    def __init__(self, n_tokens: int, dim: int) -> None:
        super().__init__()
        if dim % n_tokens != 0:
            raise ValueError(
                f"token mixing needs the width D = {dim} to be a multiple of the token count T = {n_tokens}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return token_mixing(x)


class PerTokenLinear(nn.Module):
    """A separate Linear per token: [B, T, in] -> [B, T, out], weight [T, in, out] (one batched einsum)."""

    def __init__(self, n_tokens: int, in_dim: int, out_dim: int) -> None:
        super().__init__()
        bound = in_dim**-0.5
        self.weight = nn.Parameter(torch.empty(n_tokens, in_dim, out_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.zeros(n_tokens, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bti,tio->bto", x, self.weight) + self.bias


class PerTokenFFN(nn.Module):
    """RankMixer's per-token FFN: token t has its own W1_t [D, kD], W2_t [kD, D], GELU between."""

    def __init__(self, n_tokens: int, dim: int, expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.up = PerTokenLinear(n_tokens, dim, expansion * dim)
        self.down = PerTokenLinear(n_tokens, expansion * dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.dropout(F.gelu(self.up(x))))  # [B, T, D]


class PerTokenMoE(nn.Module):
    """RankMixer's sparse MoE per token: E experts per token (each a GELU FFN D -> hD -> D), ReLU router.

    y_t = sum_e relu(router_t(x_t))_e * expert_{t,e}(x_t). ReLU gates make the number of active experts vary
    per token and example; the L1 norm of the gates (returned with the output, averaged over examples and
    tokens) is the sparsity penalty the loss adds. Dense training, sparse inference: in training mode every
    expert runs for every token (simple, and every expert gets gradient through its gate); in eval mode
    only the (example, token, expert) triples with a positive gate are computed, which gives the same output.
    """

    def __init__(
        self, n_tokens: int, dim: int, n_experts: int, expansion: int = 4, dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.n_tokens, self.n_experts = n_tokens, n_experts
        hidden = expansion * dim
        self.router = PerTokenLinear(n_tokens, dim, n_experts)
        b1, b2 = dim**-0.5, hidden**-0.5
        self.w1 = nn.Parameter(torch.empty(n_tokens, n_experts, dim, hidden).uniform_(-b1, b1))
        self.b1 = nn.Parameter(torch.zeros(n_tokens, n_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(n_tokens, n_experts, hidden, dim).uniform_(-b2, b2))
        self.b2 = nn.Parameter(torch.zeros(n_tokens, n_experts, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        gates = F.relu(self.router(x))  # [B, T, E]
        l1 = gates.sum(dim=-1).mean()
        if self.training:
            h = F.gelu(torch.einsum("btd,tedh->bteh", x, self.w1) + self.b1)  # [B, T, E, H]
            out = torch.einsum("bteh,tehd->bted", self.dropout(h), self.w2) + self.b2  # [B, T, E, D]
            return torch.einsum("bte,bted->btd", gates, out), l1
        return self._sparse(x, gates), l1

    def _sparse(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)  # [B, T, D]
        for t in range(self.n_tokens):
            for e in range(self.n_experts):
                rows = torch.nonzero(gates[:, t, e] > 0).squeeze(1)
                if rows.numel() == 0:
                    continue
                xt = x[rows, t]  # [n, D]
                h = F.gelu(xt @ self.w1[t, e] + self.b1[t, e])
                y[rows, t] += gates[rows, t, e].unsqueeze(1) * (h @ self.w2[t, e] + self.b2[t, e])
        return y


class MultiHeadAttention(nn.Module):
    """Multi-head attention with a boolean mask (True = may attend) and a safe softmax.

    Split in two steps so that keys/values can be computed once and cached (LONGER serving):
    ``kv(context)`` -> (k, v) each [B, H, N_k, d_h]; ``attend(query, k, v, mask)`` -> [B, N_q, D].
    """

    def __init__(self, dim: int, n_heads: int, dropout: float = 0.0) -> None:
        super().__init__()
        if dim % n_heads != 0:
            raise ValueError(f"attention width {dim} must be a multiple of n_heads = {n_heads}")
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, N, d_h]

    def kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._heads(self.k_proj(context)), self._heads(self.v_proj(context))

    def attend(
        self, query: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        b, n_q, _ = query.shape
        q = self._heads(self.q_proj(query))  # [B, H, N_q, d_h]
        if k.shape[2] == 0:  # no keys at all: nothing to read
            return torch.zeros_like(query)
        attn_mask = None
        if mask is not None:
            mask = mask.expand(
                b, n_q, k.shape[2]
            )  # [N_q, N_k], [B, 1, N_k] or [B, N_q, N_k] -> [B, N_q, N_k]
            any_key = mask.any(dim=-1, keepdim=True)  # [B, N_q, 1]
            # A fully masked row would be NaN: let it attend to everything, then zero its output.
            attn_mask = (mask | ~any_key).unsqueeze(1)  # [B, 1, N_q, N_k]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, N_q, d_h]
        out = out.transpose(1, 2).reshape(b, n_q, self.n_heads * self.head_dim)
        if mask is not None:
            out = out * any_key.to(out.dtype)
        return self.out_proj(out)

    def forward(
        self, query: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        if context is not None and self._fold_keys(query.shape[1], context.shape[1]):
            return self.attend_context(query, context, mask)
        k, v = self.kv(query if context is None else context)
        return self.attend(query, k, v, mask)

    def _fold_keys(self, n_q: int, n_k: int) -> bool:
        """Whether ``attend_context`` costs less: few queries over a longer context (its scores are D wide
        per head instead of d_h, but no key or value is projected), and no attention dropout."""
        no_dropout = self.dropout == 0.0 or not self.training
        return no_dropout and n_k > n_q and n_q * (self.n_heads - 1) < self.n_heads * self.head_dim

    def attend_context(
        self, query: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``attend(query, *kv(context), mask)`` without projecting the context (same outputs and gradients
        up to rounding; no attention dropout). Per head h, the scores q_h . (Wk_h c + bk_h) equal
        (Wk_h^T q_h) . c plus a constant per query row, which the softmax drops; and as each row of the
        attention P sums to one, P (c Wv_h^T + bv_h) = (P c) Wv_h^T + bv_h. The heads then share the raw
        context as keys and values, so they run as one attention over H * N_q queries."""
        b, n_q, dim = query.shape
        n_k, h, dh = context.shape[1], self.n_heads, self.head_dim
        if n_k == 0:  # no keys at all: nothing to read
            return torch.zeros_like(query)
        q = self.q_proj(query).view(b, n_q, h, dh)
        folded = torch.einsum("bqhe,hed->bhqd", q, self.k_proj.weight.view(h, dh, dim))
        attn_mask = None
        if mask is not None:
            mask = mask.expand(b, n_q, n_k)
            any_key = mask.any(dim=-1, keepdim=True)  # [B, N_q, 1]
            # A fully masked row would be NaN: let it attend to everything, then zero its output.
            attn_mask = (mask | ~any_key).unsqueeze(1).expand(b, h, n_q, n_k).reshape(b, 1, h * n_q, n_k)
        c = context.unsqueeze(1)  # [B, 1, N_k, D]: keys and values of every head
        read = F.scaled_dot_product_attention(
            folded.reshape(b, 1, h * n_q, dim), c, c, attn_mask=attn_mask, scale=dh**-0.5
        ).view(b, h, n_q, dim)
        out = torch.einsum("bhqd,hed->bqhe", read, self.v_proj.weight.view(h, dh, dim))
        out = out.reshape(b, n_q, h * dh) + self.v_proj.bias
        if mask is not None:
            out = out * any_key.to(out.dtype)
        return self.out_proj(out)


class FeedForward(nn.Module):
    def __init__(
        self, dim: int, expansion: int = 4, dropout: float = 0.0, activation: Activation = "gelu"
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, expansion * dim),
            make_activation(activation),
            nn.Dropout(dropout),
            nn.Linear(expansion * dim, dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class SwiGLU(nn.Module):
    """W2(SiLU(W1 x) * W3 x), no biases."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x = q + Attn(LN(q), LN(context)); x = x + FFN(LN(x)).

    ``context`` defaults to the query itself (self-attention). The same LayerNorm normalises queries and
    context, so that when the queries are a subset of the context (LONGER) they see identical inputs.
    """

    def __init__(self, dim: int, n_heads: int, expansion: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, n_heads, dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, expansion, dropout)
        self.dropout = nn.Dropout(dropout)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        q = self.norm1(x)
        c = q if context is None else self.norm1(context)
        x = x + self.dropout(self.attn(q, c, mask))
        return x + self.dropout(self.ffn(self.norm2(x)))


def recent_causal_mask(valid: torch.Tensor, n_queries: int) -> torch.Tensor:
    """[B, N] valid steps -> [B, n_queries, N]: the query for position N - n_queries + q (the most recent
    steps of a left-padded sequence) may see the valid positions at or before its own."""
    n = valid.shape[1]
    query_pos = torch.arange(n - n_queries, n, device=valid.device).unsqueeze(1)  # [n_q, 1]
    causal = torch.arange(n, device=valid.device).unsqueeze(0) <= query_pos  # [n_q, N]
    return causal.unsqueeze(0) & valid.unsqueeze(1)
