"""HyFormer (arXiv 2601.12681): sequence modelling and feature interaction interleaved in every layer.

Tokens (width D = ``model_dim``):
- M non-sequential tokens F [B, M, D]: RankMixer tokenisation of the non-sequential features (user fields,
  candidate item id, item fields, context fields, dense token) into M = ``n_feature_tokens`` chunks.
- For each behaviour sequence s (one or more; ``sequences``, default all of the spec): step embedding
  concatenated with the time-gap bucket embedding, plus a learned absolute position embedding (the most
  recent step always gets the last position), projected to D by a per-sequence Linear; padding zeroed.

Query generation (first layer): GlobalInfo = concat(F_1..F_M, MeanPool(seq_s) for each s) [B, (M + S) D];
N = ``n_queries`` queries per sequence, each from its own FFN (GlobalInfo -> ``query_hidden`` -> D, GELU):
Q_s [B, N, D].

Every layer l, for each sequence s:
1. Sequence encoding (``sequence_encoder``, OPEN in the paper, all three offered): "transformer" (a pre-norm
   self-attention + FFN block over the valid steps), "longer" (LONGER-style: the first layer's queries are
   the ``longer_queries`` most recent steps, cross-causal over the whole sequence; later layers are causal
   self-attention over those steps) or "swiglu" (x + SwiGLU(LN(x)) per step, no attention).
2. Query decoding: Q~_s = Q_s + MultiHeadCrossAttention(LN(Q_s), K_l, V_l), K_l / V_l being projections of
   LN(this layer's sequence representation), padding keys masked. OPEN choice picked: the residual and the
   pre-norms (the spec writes the bare attention; without a residual the queries would be rebuilt from
   scratch every layer and GlobalInfo's content lost).
3. Query boosting: Q = [Q~_1 .. Q~_S, F_1 .. F_M] [B, S*N + M, D]; Q = Q + PerTokenFFN(TokenMixing(Q)),
   exactly as written (so D must be a multiple of S*N + M). The first S*N boosted tokens are the next
   layer's queries, the last M its non-sequential tokens.
Read-out: LayerNorm, concatenate all final tokens (queries and non-sequential) -> task towers.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.embeddings import FeatureEmbedding, SemanticTokenizer
from recsys.models.heads import HeadsConfig, TaskHeads
from recsys.models.layers import (
    MultiHeadAttention,
    PerTokenFFN,
    PerTokenLinear,
    SwiGLU,
    TransformerBlock,
    recent_causal_mask,
    token_mixing,
)
from recsys.models.ops.unique_pooling import Backend

SequenceEncoder = Literal["transformer", "longer", "swiglu"]


class HyFormerConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    embedding_dim: int = Field(16, ge=1, description="e: width of every feature embedding.")
    model_dim: int = Field(
        96, ge=1, description="D; a multiple of S*N + M (token mixing): 96 fits S = 1 and 2."
    )
    n_feature_tokens: int = Field(4, ge=1, description="M: non-sequential tokens.")
    projection: Literal["per_token", "shared"] = "per_token"
    n_queries: int = Field(2, ge=1, description="N: queries per sequence.")
    query_hidden: int = Field(64, ge=1, description="Hidden width of each query's generating FFN.")
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(2, ge=1)
    sequence_encoder: SequenceEncoder = "transformer"
    longer_queries: int = Field(16, ge=1, description="Most recent steps kept by the 'longer' encoder.")
    ffn_expansion: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sequences: tuple[str, ...] | None = Field(
        None, description="Sequences to use (default: all of the spec)."
    )
    heads: HeadsConfig = HeadsConfig()
    time_gap_buckets: int = Field(24, ge=1)
    unique_backend: Backend = "auto"

    @property
    def sequence_names(self) -> tuple[str, ...]:
        return (
            self.sequences if self.sequences is not None else tuple(s.name for s in self.features.sequences)
        )

    @property
    def n_tokens(self) -> int:
        """S*N + M: the tokens that query boosting mixes."""
        return len(self.sequence_names) * self.n_queries + self.n_feature_tokens

    @model_validator(mode="after")
    def _check_tokens(self) -> HyFormerConfig:
        if not self.sequence_names:
            raise ValueError("HyFormer needs at least one behaviour sequence")
        known = [s.name for s in self.features.sequences]
        missing = [name for name in self.sequence_names if name not in known]
        if missing:
            raise ValueError(f"sequences {missing} are not in features (have {known})")
        if self.model_dim % self.n_tokens != 0:
            raise ValueError(
                f"HyFormer mixes S*N + M = {len(self.sequence_names)}*{self.n_queries} + "
                f"{self.n_feature_tokens} = {self.n_tokens} tokens; "
                f"model_dim ({self.model_dim}) must be a multiple of it"
            )
        if self.model_dim % self.n_heads != 0:
            raise ValueError(f"model_dim ({self.model_dim}) must be a multiple of n_heads ({self.n_heads})")
        return self


class SequenceEncoderLayer(nn.Module):
    """One layer of a sequence's encoder: [B, n, D] + valid [B, n] -> [B, n', D] + valid [B, n']."""

    def __init__(
        self, kind: SequenceEncoder, dim: int, heads: int, expansion: int, dropout: float, n_recent: int
    ):
        super().__init__()
        self.kind, self.n_recent = kind, n_recent
        if kind == "swiglu":
            self.norm = nn.LayerNorm(dim)
            self.ffn = SwiGLU(dim, expansion * dim)
        else:
            self.block = TransformerBlock(dim, heads, expansion, dropout)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.kind == "swiglu":
            x = x + self.ffn(self.norm(x))
        elif self.kind == "transformer":
            x = self.block(x, mask=valid.unsqueeze(1))  # bidirectional over the valid steps
        else:
            n_q = min(self.n_recent, x.shape[1])
            mask = recent_causal_mask(valid, n_q)  # [B, n_q, n]
            x = self.block(x[:, x.shape[1] - n_q :], context=x, mask=mask)
            valid = valid[:, valid.shape[1] - n_q :]
        return x * valid.unsqueeze(-1), valid


class QueryDecoder(nn.Module):
    """Q~ = Q + MHA(LN(Q), LN(seq)) with padding keys masked."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.q_norm = nn.LayerNorm(dim)
        self.kv_norm = nn.LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, heads, dropout)

    def forward(self, queries: torch.Tensor, seq: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # K_l, V_l = projections of LN(seq); MultiHeadAttention folds them into the few queries.
        return queries + self.attn(self.q_norm(queries), self.kv_norm(seq), valid.unsqueeze(1))


class HyFormer(nn.Module):
    def __init__(self, config: HyFormerConfig) -> None:
        super().__init__()
        spec = config.features
        self.sequences = config.sequence_names
        self.spec, self.config = spec, config
        e, dm, n_seq = config.embedding_dim, config.model_dim, len(self.sequences)
        m, n_q = config.n_feature_tokens, config.n_queries
        self.n_tokens = config.n_tokens
        self.sparse_arch = FeatureEmbedding(spec, e, config.time_gap_buckets, config.unique_backend)
        self.tokenizer = SemanticTokenizer(self.sparse_arch.n_semantic_slots(), e, m, dm, config.projection)
        self.positions = nn.ModuleDict(
            {s: nn.Embedding(spec.sequence(s).max_len, 2 * e) for s in self.sequences}
        )
        self.seq_proj = nn.ModuleDict({s: nn.Linear(2 * e, dm) for s in self.sequences})
        global_dim = (m + n_seq) * dm
        self.query_up = PerTokenLinear(n_seq * n_q, global_dim, config.query_hidden)
        self.query_down = PerTokenLinear(n_seq * n_q, config.query_hidden, dm)
        self.encoders = nn.ModuleList(
            nn.ModuleDict(
                {
                    s: SequenceEncoderLayer(
                        config.sequence_encoder,
                        dm,
                        config.n_heads,
                        config.ffn_expansion,
                        config.dropout,
                        config.longer_queries,
                    )
                    for s in self.sequences
                }
            )
            for _ in range(config.n_layers)
        )
        self.decoders = nn.ModuleList(
            nn.ModuleDict({s: QueryDecoder(dm, config.n_heads, config.dropout) for s in self.sequences})
            for _ in range(config.n_layers)
        )
        self.boosters = nn.ModuleList(
            PerTokenFFN(self.n_tokens, dm, config.ffn_expansion, config.dropout)
            for _ in range(config.n_layers)
        )
        self.out_norm = nn.LayerNorm(dm)
        self.heads = TaskHeads(self.n_tokens * dm, spec.tasks, config.heads)

    def sequence_tokens(self, batch: RankingBatch, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, L, D] input tokens of sequence ``name`` and their validity [B, L]."""
        seq = batch.sequences[name]
        length, max_len = seq.seq_len, self.positions[name].num_embeddings
        if length > max_len:
            raise ValueError(f"sequence {name!r} has L = {length} > max_len {max_len}")
        steps = self.sparse_arch.sequence(batch, name)  # [B, L, e]
        gaps = self.sparse_arch.time_gap_embedding(batch, name)  # [B, L, e]
        pos = self.positions[name](torch.arange(max_len - length, max_len, device=steps.device))  # [L, 2e]
        valid = seq.valid_mask()
        return self.seq_proj[name](torch.cat([steps, gaps], dim=-1) + pos) * valid.unsqueeze(-1), valid

    def forward(self, batch: RankingBatch) -> RankingOutput:
        n_q = self.config.n_queries
        features = self.tokenizer(self.sparse_arch.semantic_slots(batch))  # F: [B, M, D]
        seqs = {s: self.sequence_tokens(batch, s) for s in self.sequences}
        pooled = [
            (x.sum(dim=1) / valid.sum(dim=1, keepdim=True).clamp_min(1)).unsqueeze(1)
            for x, valid in seqs.values()
        ]
        global_info = torch.cat([features, *pooled], dim=1).flatten(1)  # [B, (M + S) D]
        expanded = global_info.unsqueeze(1).expand(-1, len(self.sequences) * n_q, -1)
        queries = self.query_down(nn.functional.gelu(self.query_up(expanded)))  # [B, S*N, D]
        for encoders, decoders, booster in zip(self.encoders, self.decoders, self.boosters, strict=True):
            decoded = []
            for i, name in enumerate(self.sequences):
                x, valid = encoders[name](*seqs[name])
                seqs[name] = (x, valid)
                decoded.append(decoders[name](queries[:, i * n_q : (i + 1) * n_q], x, valid))  # [B, N, D]
            q = torch.cat([*decoded, features], dim=1)  # [B, S*N + M, D]
            q = q + booster(token_mixing(q))
            queries, features = q[:, : len(self.sequences) * n_q], q[:, len(self.sequences) * n_q :]
        out = self.out_norm(torch.cat([queries, features], dim=1)).flatten(1)  # [B, (S*N + M) D]
        return RankingOutput(logits=self.heads(out), aux_loss=out.new_zeros(()))
