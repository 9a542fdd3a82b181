"""A transformer user encoder whose attention mask is a dial: causal, bidirectional, or anything between.

The user representation model of GG-SM (arXiv 2602.10622; spec: models.md, "GG-SM"): a decoder-style
transformer over the user's behaviour sequence, its outputs mean-pooled into one L2-normalised user vector,
trained contrastively against an embedding of the user's next-period behaviour (``encode_future``).

The mask is given as a *visibility* of future tokens: ``visibility[..., j]`` in [0, 1] is how much a query
at position i < j may see key j. It enters the attention logits as ``log(visibility_j)``: 0 keeps the
causal mask (log 0 = -inf), 1 is plain bidirectional attention, values between scale the future key's
weight in the softmax by ``visibility_j``. Keys at or before the query are always visible; padding never.

Block (pre-LayerNorm, as SASRec's reference code and most user-encoder work):
``x = x + Dropout(MHA(LN(x)))``, ``x = x + Dropout(FFN(LN(x)))``, a final LayerNorm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from recsys.core.config import FrozenModel


class UserEncoderConfig(FrozenModel):
    num_items: int = Field(gt=0, description="Items are indexed 1..num_items; 0 is padding.")
    max_len: int = Field(200, gt=0, description="The most recent events the encoder reads.")
    dim: int = Field(64, gt=0)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    ffn_mult: int = Field(4, ge=1)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


def attention_bias(lengths: Tensor, n: int, visibility: Tensor | None) -> Tensor:
    """[B, 1, N, N] additive attention bias of right-padded rows for a future-token ``visibility``.

    visibility: None (causal), or [N] / [B, N] in [0, 1], the visibility of each key position when it lies in
    the query's future. A padded query row sees only itself (its output is discarded), so no row is empty.
    """
    device = lengths.device
    idx = torch.arange(n, device=device)
    valid = idx[None, :] < lengths[:, None]  # [B, N]
    future = idx[None, :, None] < idx[None, None, :]  # [1, N(query), N(key)]
    if visibility is None:
        future_bias = torch.full((1, 1, n), float("-inf"), device=device)
    else:
        vis = visibility.to(device=device, dtype=torch.float32).clamp(0.0, 1.0)
        vis = vis[None, None, :] if vis.dim() == 1 else vis[:, None, :]  # [B or 1, 1, N]
        future_bias = torch.log(vis)  # log 0 = -inf: invisible
    bias = torch.where(future, future_bias, 0.0)  # [B or 1, N, N]
    bias = bias.masked_fill(~valid[:, None, :], float("-inf"))  # padded keys: never
    own = torch.eye(n, dtype=torch.bool, device=device)[None]
    bias = torch.where(~valid[:, :, None] & own, 0.0, bias)  # a padded query sees itself too
    return bias[:, None]  # [B, 1, N, N]


class _Block(nn.Module):
    def __init__(self, c: UserEncoderConfig) -> None:
        super().__init__()
        self.heads = c.num_heads
        self.attn_norm = nn.LayerNorm(c.dim)
        self.qkv = nn.Linear(c.dim, 3 * c.dim)
        self.out = nn.Linear(c.dim, c.dim)
        self.ffn_norm = nn.LayerNorm(c.dim)
        self.ffn = nn.Sequential(
            nn.Linear(c.dim, c.ffn_mult * c.dim), nn.GELU(), nn.Linear(c.ffn_mult * c.dim, c.dim)
        )
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, N, d/H]
        # No dropout on the [B, H, N, N] attention weights: on a CPU drawing that mask costs as much as the
        # attention itself; the residual branches keep their dropout.
        att = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype))
        x = x + self.dropout(self.out(att.transpose(1, 2).reshape(b, n, d)))  # [B, N, D]
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class UserEncoder(nn.Module):
    """``forward(items, lengths, visibility) -> (user [B, D] L2-normalised, tokens [B, N, D])``.

    ``tokens`` are the token states that enter the first block (item + position embeddings): the loss's
    gradient with respect to them says how much each token matters through every attention path (GG-SM
    reads its norms). The final states would not: mean pooling gives each the same gradient."""

    def __init__(self, config: UserEncoderConfig) -> None:
        super().__init__()
        if config.dim % config.num_heads:
            raise ValueError(f"dim ({config.dim}) must be divisible by num_heads ({config.num_heads})")
        self.config = config
        self.item_embedding = nn.Embedding(config.num_items + 1, config.dim, padding_idx=0)
        self.position_embedding = nn.Embedding(config.max_len, config.dim)
        self.blocks = nn.ModuleList(_Block(config) for _ in range(config.num_layers))
        self.final_norm = nn.LayerNorm(config.dim)
        self.user_head = nn.Linear(config.dim, config.dim)
        self.future_head = nn.Sequential(
            nn.Linear(config.dim, config.dim), nn.GELU(), nn.Linear(config.dim, config.dim)
        )
        self.dropout = nn.Dropout(config.dropout)
        nn.init.normal_(self.item_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding.weight, std=0.02)

    def states(
        self, items: Tensor, lengths: Tensor, visibility: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(tokens entering the first block, final states), both [B, N, D]; items [B, N] right-padded ids
        (N <= max_len), lengths [B]; ``visibility`` as in ``attention_bias``."""
        b, n = items.shape
        if n > self.config.max_len:
            raise ValueError(f"items has {n} positions, more than max_len={self.config.max_len}")
        positions = torch.arange(n, device=items.device)
        tokens = self.dropout(
            self.item_embedding(items) + self.position_embedding(positions)[None]
        )  # [B, N, D]
        bias = attention_bias(lengths, n, visibility)
        x = tokens
        for block in self.blocks:
            x = block(x, bias)
        return tokens, self.final_norm(x)

    def forward(
        self, items: Tensor, lengths: Tensor, visibility: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        tokens, hidden = self.states(items, lengths, visibility)
        positions = torch.arange(items.shape[1], device=items.device)
        valid = (positions[None, :] < lengths[:, None]).to(hidden.dtype)[..., None]  # [B, N, 1]
        pooled = (hidden * valid).sum(1) / valid.sum(1).clamp(min=1.0)  # [B, D]
        return F.normalize(self.user_head(pooled), dim=-1), tokens

    def encode_future(self, items: Tensor, lengths: Tensor) -> Tensor:
        """[B, D] L2-normalised embedding of a set of next-period items (right-padded ids, lengths)."""
        valid = (torch.arange(items.shape[1], device=items.device)[None, :] < lengths[:, None]).float()
        emb = self.item_embedding(items) * valid[..., None]  # [B, K, D]
        mean = emb.sum(1) / valid.sum(1, keepdim=True).clamp(min=1.0)  # [B, D]
        return F.normalize(self.future_head(mean), dim=-1)
