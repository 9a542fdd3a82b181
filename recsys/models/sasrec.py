"""SASRec (Kang & McAuley, ICDM 2018): a causal self-attention transformer over the item sequence.

Trained here with the same sampled softmax as HSTU (``models.losses``), so the two differ only in the encoder.
Structure per block, as in the original code: q = LN(x); x = q + MHA(q, x, x, causal); x = LN(x);
x = x + FFN(x) (Linear-ReLU-dropout-Linear-dropout); padding rows zeroed. A final LayerNorm, then the
output is L2-normalised (the sampled-softmax variant's user vector) unless ``normalize`` is off.

Choices left open by the paper and what was picked (config fields):
- LayerNorm with learned affine parameters, eps 1e-8 (the original code); the input stage is the one HSTU
  uses (``models.sequential.SequenceInput``) so both models see identical inputs.
- FFN width = embedding dim (50) and attention dropout = dropout, as the public sampled-softmax baseline.
- SASRec ignores timestamps; it takes them only to share the batch layout with HSTU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.sequential import SequenceInput, valid_mask


class SASRecConfig(FrozenModel):
    num_items: int = Field(gt=0, description="Number of items; indices 1..num_items, 0 is padding.")
    max_len: int = Field(200, gt=0, description="Longest history the model reads.")
    embedding_dim: int = Field(50, gt=0)
    num_blocks: int = Field(2, gt=0)
    num_heads: int = Field(1, gt=0)
    ffn_dim: int = Field(50, gt=0)
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    normalize: bool = Field(True, description="L2-normalise user and item vectors (cosine scores).")
    learned_temperature: float | None = Field(
        None, gt=0.0, description="Initial value of a learned score temperature; None = the loss's constant."
    )
    layer_norm_eps: float = Field(1e-8, gt=0.0)

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> SASRecConfig:
        if self.embedding_dim % self.num_heads:
            raise ValueError(
                f"embedding_dim ({self.embedding_dim}) must be divisible by num_heads ({self.num_heads})"
            )
        return self


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = query.shape
        h = self.heads
        q = self.q(query).view(b, n, h, d // h).transpose(1, 2)  # [B, H, N, d/H]
        k, v = self.kv(context).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)  # 2 x [B, H, N, d/H]
        # Right padding + causal mask: a valid position never sees a padded one, so no key-padding mask.
        a = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # [B, H, N, d/H]
        return self.out(a.transpose(1, 2).reshape(b, n, d))


class PointwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


class SASRecBlock(nn.Module):
    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        d = config.embedding_dim
        self.attention_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.attention = CausalSelfAttention(d, config.num_heads, config.dropout)
        self.ffn_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.ffn = PointwiseFeedForward(d, config.ffn_dim, config.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q = self.attention_norm(x)  # [B, N, D]
        x = q + self.attention(q, x)  # queries normalised, keys/values not (original SASRec)
        x = self.ffn(self.ffn_norm(x))
        return x * mask


class SASRec(nn.Module):
    """[B, N] item history -> [B, N, D] user vectors (one per position; L2-normalised by default)."""

    def __init__(self, config: SASRecConfig) -> None:
        super().__init__()
        self.config = config
        self.input = SequenceInput(
            config.num_items,
            config.max_len,
            config.embedding_dim,
            config.dropout,
            normalize=config.normalize,
            learned_temperature=config.learned_temperature,
        )
        self.blocks = nn.ModuleList(SASRecBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.embedding_dim, eps=config.layer_norm_eps)

    def forward(
        self, items: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        del ts, query_ts  # SASRec is position-only
        mask = valid_mask(lengths, items.shape[1]).unsqueeze(-1)  # [B, N, 1]
        x = self.input(items, lengths)  # [B, N, D]
        for block in self.blocks:
            x = block(x, mask.to(x.dtype))
        return self.input.output(self.final_norm(x)) * mask.to(x.dtype)  # [B, N, D]

    def item_vectors(self) -> torch.Tensor:
        return self.input.item_vectors()  # [num_items + 1, D]

    def score_scale(self) -> torch.Tensor | None:
        return self.input.score_scale()
