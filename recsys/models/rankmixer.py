"""RankMixer (Zhu et al., CIKM 2025): semantic tokens, parameter-free token mixing, per-token FFNs.

1. Tokenisation (``models.embeddings.SemanticTokenizer``): the embeddings in semantic order (user fields,
   candidate item id, item fields, context fields, dense token, each behaviour sequence mean/sum-pooled) are
   concatenated, cut into T chunks and each chunk projected to width D -> X [B, T, D]. OPEN: per-token
   projection (default) or one shared projection (``projection``); how the sequences enter (pooling,
   ``sequence_pool``) is also OPEN in the paper, which feeds the outputs of separate sequence modules.
2. L post-norm blocks: S = LN(TokenMixing(X) + X); X' = LN(PerTokenFFN(S) + S). TokenMixing has no
   parameters: X.view(B, T, T, D/T).transpose(1, 2).reshape(B, T, D), so D % T == 0 is required (checked when
   the config is built). PerTokenFFN gives token t its own W1_t [D, kD], W2_t [kD, D], GELU (k = 4).
3. Optional sparse MoE in place of each per-token FFN (``moe``): ReLU router, dense training, sparse
   inference; the gates' L1 norm times ``moe.l1_coef`` is returned as ``RankingOutput.aux_loss``.
4. Mean over tokens -> task towers.

``RankMixerBlock`` / ``RankMixerStack`` are reused by LONGER's RankMixer variant.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.embeddings import FeatureEmbedding, SemanticTokenizer, SequencePool
from recsys.models.heads import HeadsConfig, TaskHeads
from recsys.models.layers import PerTokenFFN, PerTokenMoE, token_mixing
from recsys.models.ops.unique_pooling import Backend


class MoEConfig(FrozenModel):
    n_experts: int = Field(4, ge=1)
    expansion: int = Field(2, ge=1, description="Each expert is D -> expansion*D -> D.")
    l1_coef: float = Field(1e-3, ge=0.0, description="Weight of the gates' L1 penalty in aux_loss.")


class RankMixerStack(nn.Module):
    """L post-norm RankMixer blocks over [B, T, D]; returns (tokens, summed MoE gate L1 penalty)."""

    def __init__(
        self, n_tokens: int, dim: int, n_blocks: int, expansion: int, dropout: float, moe: MoEConfig | None
    ) -> None:
        super().__init__()
        if dim % n_tokens != 0:
            raise ValueError(
                f"RankMixer needs token_dim D = {dim} to be a multiple of the token count T = {n_tokens}"
            )
        self.moe = moe
        self.mix_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        self.ffn_norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(n_blocks))
        if moe is None:
            self.ffns = nn.ModuleList(PerTokenFFN(n_tokens, dim, expansion, dropout) for _ in range(n_blocks))
        else:
            self.ffns = nn.ModuleList(
                PerTokenMoE(n_tokens, dim, moe.n_experts, moe.expansion, dropout) for _ in range(n_blocks)
            )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        penalty = x.new_zeros(())
        for mix_norm, ffn, ffn_norm in zip(self.mix_norms, self.ffns, self.ffn_norms, strict=True):
            s = mix_norm(token_mixing(x) + x)  # [B, T, D]
            if self.moe is None:
                y = ffn(s)
            else:
                y, l1 = ffn(s)
                penalty = penalty + self.moe.l1_coef * l1
            x = ffn_norm(y + s)  # [B, T, D]
        return x, penalty


class RankMixerConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    embedding_dim: int = Field(16, ge=1, description="Width e of every feature embedding.")
    n_tokens: int = Field(8, ge=1, description="T")
    token_dim: int = Field(64, ge=1, description="D; must be a multiple of T")
    n_blocks: int = Field(2, ge=1)
    ffn_expansion: int = Field(4, ge=1, description="k in the per-token FFN D -> kD -> D")
    projection: Literal["per_token", "shared"] = "per_token"
    sequence_pool: SequencePool = "mean"
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    moe: MoEConfig | None = None
    heads: HeadsConfig = HeadsConfig()
    time_gap_buckets: int = Field(24, ge=1)
    unique_backend: Backend = "auto"

    @model_validator(mode="after")
    def _check_mixing(self) -> RankMixerConfig:
        if self.token_dim % self.n_tokens != 0:
            raise ValueError(
                f"token_dim ({self.token_dim}) must be a multiple of n_tokens ({self.n_tokens}): token mixing"
            )
        return self


class RankMixer(nn.Module):
    def __init__(self, config: RankMixerConfig) -> None:
        super().__init__()
        spec = config.features
        self.spec, self.config = spec, config
        self.sequences = tuple(s.name for s in spec.sequences)
        self.sparse_arch = FeatureEmbedding(
            spec, config.embedding_dim, config.time_gap_buckets, config.unique_backend
        )
        self.tokenizer = SemanticTokenizer(
            self.sparse_arch.n_semantic_slots(self.sequences),
            config.embedding_dim,
            config.n_tokens,
            config.token_dim,
            config.projection,
        )
        self.mixer = RankMixerStack(
            config.n_tokens,
            config.token_dim,
            config.n_blocks,
            config.ffn_expansion,
            config.dropout,
            config.moe,
        )
        self.heads = TaskHeads(config.token_dim, spec.tasks, config.heads)

    def tokens(self, batch: RankingBatch) -> torch.Tensor:
        slots = self.sparse_arch.semantic_slots(batch, self.sequences, self.config.sequence_pool)  # [B, G, e]
        return self.tokenizer(slots)  # [B, T, D]

    def forward(self, batch: RankingBatch) -> RankingOutput:
        x, penalty = self.mixer(self.tokens(batch))  # [B, T, D]
        return RankingOutput(logits=self.heads(x.mean(dim=1)), aux_loss=penalty)
