"""DIN (Zhou et al., KDD 2018): target attention of the candidate over each behaviour sequence.

For every sequence, a small "activation unit" MLP scores each step h_l against the candidate c from
[h_l, c, h_l - c, h_l * c]; the user's interest in the candidate is sum_l w_l * h_l over the valid steps.
The interests (one per sequence) are concatenated with the candidate token and the non-sequential fields
(user fields, candidate item id, item fields, context fields, dense token) and go through an MLP to the
task towers.

OPEN choices picked here: the unit's activation is PReLU (the paper's Dice is a data-adaptive PReLU);
weights are *not* softmax-normalised (``attention_norm="none"``, as in the paper, which keeps the intensity
of interest) with "softmax" as the option; the step key includes the time-gap bucket embedding
(``use_time_gap``), so that recency can modulate the weights.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.embeddings import FeatureEmbedding, PackedSteps, pack_steps
from recsys.models.heads import HeadsConfig, TaskHeads
from recsys.models.layers import MLP, Activation
from recsys.models.ops.unique_pooling import Backend


class DINConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    embedding_dim: int = Field(16, ge=1)
    attention_hidden: tuple[int, ...] = (64, 32)
    attention_activation: Activation = "prelu"
    attention_norm: Literal["none", "softmax"] = "none"
    use_time_gap: bool = True
    deep_hidden: tuple[int, ...] = (128, 64)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    heads: HeadsConfig = HeadsConfig()
    time_gap_buckets: int = Field(24, ge=1)
    unique_backend: Backend = "auto"

    @model_validator(mode="after")
    def _check_sequences(self) -> DINConfig:
        if not self.features.sequences:
            raise ValueError("DIN needs at least one behaviour sequence in features")
        return self


class TargetAttention(nn.Module):
    """DIN's activation unit: [B, L, e] steps x [B, e] candidate -> interest [B, e]."""

    def __init__(self, dim: int, hidden: tuple[int, ...], activation: Activation, norm: str) -> None:
        super().__init__()
        self.unit = MLP(4 * dim, hidden, 1, activation=activation)
        self.norm = norm

    def forward(self, steps: torch.Tensor, candidate: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        c = candidate.unsqueeze(1).expand_as(steps)  # [B, L, e]
        scores = self.unit(torch.cat([steps, c, steps - c, steps * c], dim=-1)).squeeze(-1)  # [B, L]
        if self.norm == "softmax":
            scores = scores.masked_fill(~valid, float("-inf"))
            weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty history -> all zeros
        else:
            weights = scores * valid
        return torch.einsum("bl,ble->be", weights, steps)  # [B, e]

    def packed(self, steps: torch.Tensor, candidate: torch.Tensor, packed: PackedSteps) -> torch.Tensor:
        """The same interest from the valid steps only: ``steps`` [N, e] are the rows of ``packed``."""
        c = candidate[packed.example]  # [N, e]
        scores = self.unit(torch.cat([steps, c, steps - c, steps * c], dim=-1)).squeeze(-1)  # [N]
        if self.norm == "softmax":  # softmax per example over its valid steps, via the padded grid
            grid = scores.new_full((packed.batch_size * packed.seq_len,), float("-inf"))
            grid = grid.index_copy(0, packed.flat, scores).view(packed.batch_size, packed.seq_len)
            scores = torch.softmax(grid, dim=-1).reshape(-1)[packed.flat]
        weighted = scores.unsqueeze(-1) * steps
        return weighted.new_zeros(candidate.shape).index_add(0, packed.example, weighted)  # [B, e]


class DIN(nn.Module):
    def __init__(self, config: DINConfig) -> None:
        super().__init__()
        spec = config.features
        self.spec, self.config = spec, config
        e = config.embedding_dim
        self.sequences = tuple(s.name for s in spec.sequences)
        self.sparse_arch = FeatureEmbedding(spec, e, config.time_gap_buckets, config.unique_backend)
        self.attention = nn.ModuleDict(
            {
                name: TargetAttention(
                    e, config.attention_hidden, config.attention_activation, config.attention_norm
                )
                for name in self.sequences
            }
        )
        n_in = (self.sparse_arch.n_semantic_slots() + len(self.sequences) + 1) * e
        self.deep_arch = MLP(n_in, config.deep_hidden, None, config.dropout)
        self.heads = TaskHeads(self.deep_arch.out_dim, spec.tasks, config.heads)

    def forward(self, batch: RankingBatch) -> RankingOutput:
        candidate = self.sparse_arch.candidate(batch)  # [B, e]
        parts = [self.sparse_arch.semantic_slots(batch).flatten(1), candidate]
        for name in self.sequences:  # the valid steps only (padding weighs nothing)
            packed = pack_steps(batch.sequences[name])
            steps = self.sparse_arch.step_rows(batch, name, packed.flat)  # [N, e]
            if self.config.use_time_gap:
                steps = steps + self.sparse_arch.time_gap_rows(batch, name, packed.flat)
            parts.append(self.attention[name].packed(steps, candidate, packed))
        x = torch.cat(parts, dim=1)
        return RankingOutput(logits=self.heads(self.deep_arch(x)), aux_loss=x.new_zeros(()))
