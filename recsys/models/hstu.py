"""HSTU (Zhai et al., ICML 2024), the public-benchmark variant behind the paper's MovieLens/Amazon tables.

Per block, on x [B, N, D]:
  x_n = LayerNorm_noaffine(x, eps 1e-6)
  U, V, Q, K = split(SiLU(x_n @ W_uvqk))                    one projection, no bias
  A = SiLU(Q K^T + rab_pos(j - i) + rab_ts(bucket)) / N     causal incl. diagonal, no softmax, no 1/sqrt(d)
  y = U * LayerNorm_noaffine(A V)
  x = x + Linear(dropout(y))                                  no FFN
The relative attention bias (2N - 1 position weights + 129 time-bucket weights, per block, shared by the
heads) and the pointwise attention are computed by ``models.ops.hstu_attention``; the time bucket of (i, j) is
clamp(floor(ln(max(|query_ts_i - ts_j|, 1)) / 0.301), 0, 128) with query_ts_i = time of item i + 1.

Choices left open and what was picked:
- N, the attention normaliser, is the model's ``max_len`` (the padded maximum length of the public code),
  the same for every batch whatever its actual padded width.
- Initialisation as the public code: W_uvqk ~ N(0, 0.02), bias weights ~ N(0, 0.02), output Linear
  Xavier-uniform weight; the input stage is ``models.sequential.SequenceInput``.
- Padded rows of the output are zeroed (the public code leaves them unused but non-zero).

The mask and the position/time-bucket indices of the relative bias depend on the batch only, so
``HSTU.forward`` computes them once (``models.ops.hstu_attention.hstu_attention_index``) and every block
reuses them with its own two tables; on the Triton backend the kernels build the bias per tile instead and
no index is made.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.ops.hstu_attention import (
    AttentionIndex,
    hstu_attention,
    hstu_attention_index,
    resolve_backend,
)
from recsys.models.sequential import SequenceInput, valid_mask

NUM_TIME_BUCKETS = 128  # buckets 0..128 -> 129 weights, fixed by the op


class HSTUConfig(FrozenModel):
    num_items: int = Field(gt=0, description="Number of items; indices 1..num_items, 0 is padding.")
    max_len: int = Field(200, gt=0, description="Longest history; also the attention normaliser N.")
    embedding_dim: int = Field(50, gt=0)
    num_blocks: int = Field(2, gt=0)
    num_heads: int = Field(1, gt=0)
    dqk: int = Field(50, gt=0, description="Query/key width per head.")
    dv: int = Field(50, gt=0, description="Value (and U) width per head.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Input-embedding and block-output dropout.")
    normalize: bool = Field(True, description="L2-normalise user and item vectors (cosine scores).")
    learned_temperature: float | None = Field(
        None, gt=0.0, description="Initial value of a learned score temperature; None = the loss's constant."
    )
    use_time_bias: bool = Field(True, description="Add the bucketed time-gap bias (needs timestamps).")
    attention_backend: Literal["auto", "pytorch", "triton"] = Field(
        "auto", description="Passed to models.ops.hstu_attention; 'auto' uses Triton on CUDA only."
    )


HSTU_LARGE = {"num_blocks": 8, "num_heads": 2, "dqk": 25, "dv": 25}


class HSTUBlock(nn.Module):
    def __init__(self, config: HSTUConfig) -> None:
        super().__init__()
        self.config = config
        h, d = config.num_heads, config.embedding_dim
        self.split_sizes = [h * config.dv, h * config.dv, h * config.dqk, h * config.dqk]
        self.uvqk = nn.Parameter(torch.empty(d, sum(self.split_sizes)).normal_(0.0, 0.02))
        self.output = nn.Linear(h * config.dv, d)
        nn.init.xavier_uniform_(self.output.weight)
        self.pos_weight = nn.Parameter(torch.empty(2 * config.max_len - 1).normal_(0.0, 0.02))
        self.ts_weight = (
            nn.Parameter(torch.empty(NUM_TIME_BUCKETS + 1).normal_(0.0, 0.02))
            if config.use_time_bias
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        ts: torch.Tensor,
        query_ts: torch.Tensor,
        index: AttentionIndex | None = None,
    ) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]. ``index``: ``HSTU.attention_index`` of this batch (None: built here)."""
        c = self.config
        b, n, d = x.shape
        x_n = F.layer_norm(x, (d,), eps=1e-6)  # [B, N, D]
        u, v, q, k = torch.split(F.silu(x_n @ self.uvqk), self.split_sizes, dim=-1)
        attn = hstu_attention(
            q.reshape(b, n, c.num_heads, c.dqk),
            k.reshape(b, n, c.num_heads, c.dqk),
            v.reshape(b, n, c.num_heads, c.dv),
            lengths,
            normalizer=float(c.max_len),
            pos_weight=self.pos_weight,
            ts_weight=self.ts_weight,
            query_ts=query_ts if self.ts_weight is not None else None,
            key_ts=ts if self.ts_weight is not None else None,
            index=index,
            backend=c.attention_backend,
        ).reshape(b, n, c.num_heads * c.dv)  # [B, N, H*dv]
        y = u * F.layer_norm(attn, (attn.shape[-1],), eps=1e-6)  # [B, N, H*dv]
        return x + self.output(F.dropout(y, p=c.dropout, training=self.training))  # [B, N, D]


class HSTU(nn.Module):
    """[B, N] item history (+ timestamps) -> [B, N, D] user vectors (one per position, L2-normalised by
    default)."""

    def __init__(self, config: HSTUConfig) -> None:
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
        self.blocks = nn.ModuleList(HSTUBlock(config) for _ in range(config.num_blocks))

    def forward(
        self, items: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, lengths: torch.Tensor
    ) -> torch.Tensor:
        mask = valid_mask(lengths, items.shape[1]).unsqueeze(-1)  # [B, N, 1]
        x = self.input(items, lengths)  # [B, N, D]
        index = self.attention_index(lengths, ts, query_ts)
        for block in self.blocks:
            x = block(x, lengths, ts, query_ts, index)
        return self.input.output(x) * mask.to(x.dtype)  # [B, N, D]

    def attention_index(
        self, lengths: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor
    ) -> AttentionIndex | None:
        """The mask and bias indices every block shares, or None when the Triton kernels will run."""
        c = self.config
        if resolve_backend(c.attention_backend, lengths.device) != "pytorch":
            return None
        return hstu_attention_index(
            lengths,
            ts.shape[1],
            max_pos=c.max_len,
            num_buckets=NUM_TIME_BUCKETS + 1 if c.use_time_bias else None,
            query_ts=query_ts if c.use_time_bias else None,
            key_ts=ts if c.use_time_bias else None,
        )

    def item_vectors(self) -> torch.Tensor:
        return self.input.item_vectors()  # [num_items + 1, D]

    def score_scale(self) -> torch.Tensor | None:
        return self.input.score_scale()
