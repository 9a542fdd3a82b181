"""DeepFM / DLRM-style baseline: field embeddings (sequences pooled away), a pairwise interaction, an MLP.

Fields (each a vector of width e): user fields, candidate item id, item fields, context fields, the dense
token, and every behaviour sequence reduced to one vector by sum or mean pooling of its step embeddings
(``sequence_pool``; a deduplicated sequence is pooled by the unique-id op without building [B, L, e]).

- ``interaction="fm"`` (DeepFM, Guo et al. 2017): logit_t = first order (a scalar weight per item and sparse
  id, a Linear over the dense statistics) + FM second order 0.5 * sum_k((sum_f v_fk)^2 - sum_f v_fk^2)
  + tower_t(MLP(concat of all fields)).
- ``interaction="dot"`` (DLRM, Naumov et al. 2019): the pairwise dot products of all fields (upper triangle)
  concatenated with the fields go through the MLP ("top arch") -> tower_t; no separate FM/first-order terms.
OPEN choices picked here: the sequence pooling (mean by default) and DLRM's top-arch input (fields + dots).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.embeddings import FeatureEmbedding, SequencePool, symlog
from recsys.models.heads import HeadsConfig, TaskHeads
from recsys.models.layers import MLP
from recsys.models.ops.unique_pooling import Backend


class DeepFMConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    embedding_dim: int = Field(16, ge=1)
    interaction: Literal["fm", "dot"] = "fm"
    sequence_pool: SequencePool = "mean"
    deep_hidden: tuple[int, ...] = (128, 64)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    heads: HeadsConfig = HeadsConfig()
    time_gap_buckets: int = Field(24, ge=1)
    unique_backend: Backend = "auto"


class DeepFM(nn.Module):
    def __init__(self, config: DeepFMConfig) -> None:
        super().__init__()
        spec = config.features
        self.spec, self.config = spec, config
        e = config.embedding_dim
        self.sequences = tuple(s.name for s in spec.sequences)
        self.sparse_arch = FeatureEmbedding(spec, e, config.time_gap_buckets, config.unique_backend)
        n_fields = self.sparse_arch.n_semantic_slots(self.sequences)
        deep_in = n_fields * e
        if config.interaction == "dot":
            deep_in += n_fields * (n_fields - 1) // 2
            self.register_buffer("_pairs", torch.triu_indices(n_fields, n_fields, offset=1), persistent=False)
        else:
            self.first_order_item = nn.Embedding(spec.n_items + 1, 1, padding_idx=0)
            self.first_order_sparse = nn.ModuleDict(
                {f.name: nn.Embedding(f.cardinality, 1) for f in spec.sparse}
            )
            self.first_order_dense = nn.Linear(len(spec.dense), 1) if spec.dense else None
            with torch.no_grad():
                for table in [self.first_order_item, *self.first_order_sparse.values()]:
                    table.weight.zero_()
        self.deep_arch = MLP(deep_in, config.deep_hidden, None, config.dropout)
        self.heads = TaskHeads(self.deep_arch.out_dim, spec.tasks, config.heads)

    def forward(self, batch: RankingBatch) -> RankingOutput:
        fields = self.sparse_arch.semantic_slots(
            batch, self.sequences, self.config.sequence_pool
        )  # [B, F, e]
        flat = fields.flatten(1)  # [B, F*e]
        if self.config.interaction == "dot":
            dots = torch.bmm(fields, fields.transpose(1, 2))  # [B, F, F]
            pairs = dots[:, self._pairs[0], self._pairs[1]]  # [B, F(F-1)/2]
            logits = self.heads(self.deep_arch(torch.cat([flat, pairs], dim=1)))
        else:
            shared = self._first_order(batch) + self._fm(fields)  # [B]
            logits = {task: z + shared for task, z in self.heads(self.deep_arch(flat)).items()}
        return RankingOutput(logits=logits, aux_loss=flat.new_zeros(()))

    def _first_order(self, batch: RankingBatch) -> torch.Tensor:
        out = self.first_order_item(batch.item_id).squeeze(-1)  # [B]
        for name, table in self.first_order_sparse.items():
            out = out + table(batch.sparse[name]).squeeze(-1)
        if self.first_order_dense is not None:
            out = out + self.first_order_dense(symlog(batch.dense)).squeeze(-1)
        return out

    @staticmethod
    def _fm(fields: torch.Tensor) -> torch.Tensor:
        square_of_sum = fields.sum(dim=1).pow(2)  # [B, e]
        sum_of_square = fields.pow(2).sum(dim=1)  # [B, e]
        return 0.5 * (square_of_sum - sum_of_square).sum(dim=1)  # [B]
