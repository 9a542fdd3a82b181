"""LONGER (Chai et al., RecSys 2025): long-sequence transformer with global tokens, token merge and a
cross-causal first layer whose sequence side can be cached per user.

Tokens (model width ``model_dim`` = D):
- Sequence tokens: step embedding (item + side fields) concatenated with the time-gap-to-target bucket
  embedding, plus a learned absolute position embedding (position L_max - 1 is always the most recent step,
  the batch being left-padded), through an MLP to width d = ``token_dim``; padding tokens are zeroed.
- Token merge: K = ``merge_k`` adjacent tokens form one (the sequence is left-padded to a multiple of K), by
  concatenation (width K*d) or by a one-layer transformer inside each group then flattening ("inner_trans",
  the paper's best). OPEN: how widths meet; picked: merged tokens are projected K*d -> D by a Linear
  (identity when K*d == D, which is the paper's setting) and every global token is projected to D.
- Global tokens (m of them; OPEN: which and how many, ``global_tokens``): the target (candidate token +
  item fields), ``n_cls`` learnable CLS tokens, the user token (user fields), the context token (context
  fields) and the user-item cross token (the dense point-in-time statistics), each present when the spec has
  such features.

Layers (pre-norm transformer blocks, ``n_layers`` >= 1):
1. Cross-causal: keys/values = [global; all G merged tokens]; queries = [global; the k = ``n_queries`` most
   recent merged tokens]. Global queries see every global token and every valid sequence token; sequence
   queries see only valid sequence tokens at or before their own position -- never a global token, so no
   sequence state depends on the candidate. Then FFN.
2. Layers 2..L: self-attention over the m + k tokens with the same rule (global: everything valid;
   sequence: causal over sequence only), then FFN.
Read-out: the final global tokens concatenated -> task towers (MLP -> logit).

Serving: ``encode_sequence(batch)`` runs the sequence side once and keeps each layer's sequence K/V;
``score(cache, batch, cache_index)`` runs only the global tokens of many candidates against it. The time gap
is measured to the request time, which all candidates of a request share. ``forward`` computes the joint
attention with the mask above; the two paths agree (a test).

Variant LONGER+RankMixer (``rankmixer`` set; the HyFormer paper's baseline): the non-sequential features are
RankMixer-tokenised into T_f tokens of width D, concatenated with LONGER's m final global tokens and mixed
by RankMixer blocks; mean over tokens -> task towers. D must be a multiple of T_f + m.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.embeddings import FeatureEmbedding, SemanticTokenizer, gather_rows
from recsys.models.heads import HeadsConfig, TaskHeads
from recsys.models.layers import MLP, TransformerBlock, recent_causal_mask
from recsys.models.ops.unique_pooling import Backend
from recsys.models.rankmixer import MoEConfig, RankMixerStack

GlobalToken = Literal["user", "context", "cross"]


class LongerRankMixerConfig(FrozenModel):
    n_tokens: int = Field(2, ge=1, description="T_f: RankMixer tokens of the non-sequential features.")
    n_blocks: int = Field(2, ge=1)
    ffn_expansion: int = Field(4, ge=1)
    projection: Literal["per_token", "shared"] = "per_token"
    moe: MoEConfig | None = None


class LongerConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    embedding_dim: int = Field(16, ge=1, description="e: width of every feature embedding.")
    token_dim: int = Field(16, ge=1, description="d: width of a sequence token before merging.")
    merge_k: int = Field(4, ge=1, description="K adjacent tokens per merged token (1 = no merge).")
    merge_mode: Literal["concat", "inner_trans"] = "inner_trans"
    inner_heads: int = Field(1, ge=1, description="Heads of the InnerTrans block (width d).")
    model_dim: int = Field(64, ge=1, description="D: attention width.")
    n_heads: int = Field(2, ge=1)
    n_layers: int = Field(2, ge=1)
    n_queries: int = Field(16, ge=1, description="k: most recent merged tokens used as queries (paper: 100).")
    n_cls: int = Field(2, ge=0)
    global_tokens: tuple[GlobalToken, ...] = ("user", "context", "cross")
    ffn_expansion: int = Field(4, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    sequence: str | None = Field(None, description="Which sequence of the spec (default: the first).")
    rankmixer: LongerRankMixerConfig | None = None
    heads: HeadsConfig = HeadsConfig()
    time_gap_buckets: int = Field(24, ge=1)
    unique_backend: Backend = "auto"

    @model_validator(mode="after")
    def _check_widths(self) -> LongerConfig:
        if not self.features.sequences:
            raise ValueError("LONGER needs a behaviour sequence in features")
        known = [s.name for s in self.features.sequences]
        if self.sequence is not None and self.sequence not in known:
            raise ValueError(f"sequence {self.sequence!r} is not in features (have {known})")
        if self.model_dim % self.n_heads != 0:
            raise ValueError(f"model_dim ({self.model_dim}) must be a multiple of n_heads ({self.n_heads})")
        if self.merge_mode == "inner_trans" and self.token_dim % self.inner_heads != 0:
            raise ValueError(
                f"token_dim ({self.token_dim}) must be a multiple of inner_heads ({self.inner_heads})"
            )
        return self


@dataclass
class LongerCache:
    """Per-layer sequence keys/values of U users: keys[i], values[i] [U, H, n_i, d_h], valid[i] [U, n_i]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    valid: list[torch.Tensor]


def _block_step(
    block: TransformerBlock, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One TransformerBlock with precomputed keys/values (the same maths as ``block(x, context, mask)``)."""
    x = x + block.dropout(block.attn.attend(block.norm1(x), k, v, mask))
    return x + block.dropout(block.ffn(block.norm2(x)))


class Longer(nn.Module):
    def __init__(self, config: LongerConfig) -> None:
        super().__init__()
        spec = config.features
        self.spec, self.config = spec, config
        self.sequence_name = config.sequence or spec.sequences[0].name
        seq_spec = spec.sequence(self.sequence_name)
        self.max_len = seq_spec.max_len
        e, d, dm, k = config.embedding_dim, config.token_dim, config.model_dim, config.merge_k
        self.sparse_arch = FeatureEmbedding(spec, e, config.time_gap_buckets, config.unique_backend)

        # sequence tokens
        self.position = nn.Embedding(self.max_len, 2 * e)
        self.token_mlp = MLP(2 * e, (d,), d, activation="gelu")
        self.inner = (
            TransformerBlock(d, config.inner_heads, config.ffn_expansion, config.dropout)
            if (config.merge_mode == "inner_trans" and k > 1)
            else None
        )
        self.merge_proj = nn.Linear(k * d, dm) if k * d != dm else nn.Identity()

        # global tokens
        n_item_fields = len(spec.fields("item"))
        self.target_proj = nn.Linear((1 + n_item_fields) * e, dm)
        self.cls = nn.Parameter(torch.randn(config.n_cls, dm) * 0.02)
        self.global_projs = nn.ModuleDict()
        for name in config.global_tokens:
            width = {"user": len(spec.fields("user")), "context": len(spec.fields("context")), "cross": 1}[
                name
            ] * e
            present = spec.dense if name == "cross" else spec.fields(name)
            if present:
                self.global_projs[name] = nn.Linear(width, dm)
        self.n_global = 1 + config.n_cls + len(self.global_projs)

        self.layers = nn.ModuleList(
            TransformerBlock(dm, config.n_heads, config.ffn_expansion, config.dropout)
            for _ in range(config.n_layers)
        )
        if config.rankmixer is None:
            self.tokenizer = None
            self.mixer = None
            self.heads = TaskHeads(self.n_global * dm, spec.tasks, config.heads)
        else:
            rm = config.rankmixer
            n_tokens = rm.n_tokens + self.n_global
            if dm % n_tokens != 0:
                raise ValueError(
                    f"LONGER+RankMixer mixes T_f + m = {rm.n_tokens} + {self.n_global} = {n_tokens} tokens; "
                    f"model_dim ({dm}) must be a multiple of it"
                )
            self.tokenizer = SemanticTokenizer(
                self.sparse_arch.n_semantic_slots(), e, rm.n_tokens, dm, rm.projection
            )
            self.mixer = RankMixerStack(n_tokens, dm, rm.n_blocks, rm.ffn_expansion, config.dropout, rm.moe)
            self.heads = TaskHeads(dm, spec.tasks, config.heads)

    # --- tokens ---------------------------------------------------------------------------------------

    def sequence_tokens(self, batch: RankingBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Merged sequence tokens [B, G, D] and their validity [B, G] (G = ceil(L / K)).

        Only the merged tokens that hold a valid step are computed (token MLP, InnerTrans, merge projection
        on those groups, then scattered into the zero [B, G, D] grid): a left-padded sequence of n valid
        steps has its valid steps in its last ceil(n / K) groups, and every other group's output is zero
        (its tokens are zeroed), so the result is the same as computing the whole grid."""
        seq = batch.sequences[self.sequence_name]
        length = seq.seq_len
        if length > self.max_len:
            raise ValueError(f"sequence {self.sequence_name!r} has L = {length} > max_len {self.max_len}")
        k = self.config.merge_k
        b, n_groups = seq.batch_size, -(-length // k)
        pad = n_groups * k - length  # invalid steps left of position 0 (the grid is a multiple of K)
        lengths = seq.lengths.clamp(0, length)
        merged_valid = torch.arange(n_groups, device=lengths.device).unsqueeze(0) >= (
            n_groups - (lengths + k - 1) // k
        ).unsqueeze(1)  # [B, G]
        example, group = merged_valid.nonzero(as_tuple=True)  # the V valid groups
        column = group.unsqueeze(1) * k + torch.arange(k, device=group.device) - pad  # [V, K] step column
        step_valid = column >= (length - lengths[example]).unsqueeze(1)  # [V, K]
        column = column.clamp_min(0)
        flat = example.unsqueeze(1) * length + column  # [V, K] position in the [B * L] grid
        # Invalid steps (left of a history's start, in its first group) are zeroed once, at the end: before
        # that they reach nothing (InnerTrans masks them as keys, and their own outputs are zeroed).
        x = self._step_tokens(batch, flat, column + (self.max_len - length))  # [V, K, d]
        d = x.shape[-1]
        if self.inner is not None:
            x = self.inner(x, mask=step_valid.unsqueeze(1))  # keys: the valid steps of the group
        x = x * step_valid.unsqueeze(-1)
        rows = self.merge_proj(x.reshape(-1, k * d))  # [V, D]
        grid = rows.new_zeros(b * n_groups, rows.shape[-1])
        merged = grid.index_copy(0, example * n_groups + group, rows).view(b, n_groups, -1)
        return merged, merged_valid

    def _step_tokens(self, batch: RankingBatch, flat: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """token_mlp(concat(step, time gap) + position embedding) of the steps at ``flat``. The MLP's first
        Linear is folded into the lookups (gathers from the tables times its weight: the same sums, without
        the [.., 2e] concatenation and its matmul over every step)."""
        emb, name = self.sparse_arch, self.sequence_name
        first = self.token_mlp.net[0]
        if batch.sequences[name].item_ids is None or not isinstance(first, nn.Linear):
            steps = emb.step_rows(batch, name, flat)
            gaps = emb.time_gap_rows(batch, name, flat)
            return self.token_mlp(torch.cat([steps, gaps], dim=-1) + self.position(position))
        e = self.config.embedding_dim
        hidden = emb.projected_step_rows(batch, name, flat, first.weight[:, :e])
        hidden = hidden + emb.time_gap_rows(batch, name, flat, weight=first.weight[:, e:])
        hidden = hidden + gather_rows(self.position, position, self.position.weight @ first.weight.T)
        return self.token_mlp.net[1:](hidden + first.bias)

    def global_tokens(self, batch: RankingBatch) -> torch.Tensor:
        """[B, m, D]: target, CLS tokens, then user / context / cross tokens (those the spec has)."""
        emb = self.sparse_arch
        target = torch.cat([emb.candidate(batch).unsqueeze(1), emb.field_tokens(batch, "item")], dim=1)
        parts = [self.target_proj(target.flatten(1)).unsqueeze(1)]
        parts.append(self.cls.unsqueeze(0).expand(batch.batch_size, -1, -1))
        for name, proj in self.global_projs.items():
            source = emb.dense_token(batch) if name == "cross" else emb.field_tokens(batch, name).flatten(1)
            parts.append(proj(source).unsqueeze(1))
        return torch.cat(parts, dim=1)

    # --- masks ----------------------------------------------------------------------------------------

    def _n_queries(self, n_seq: int) -> int:
        return min(self.config.n_queries, n_seq)

    def _global_rows(self, seq_valid: torch.Tensor, n_global: int) -> torch.Tensor:
        """[B, m, m + n]: a global query sees every global token and every valid sequence token."""
        b = seq_valid.shape[0]
        to_global = torch.ones(b, n_global, n_global, dtype=torch.bool, device=seq_valid.device)
        return torch.cat([to_global, seq_valid.unsqueeze(1).expand(b, n_global, -1)], dim=2)

    def _joint_mask(self, seq_valid: torch.Tensor, n_global: int, n_q: int) -> torch.Tensor:
        """[B, m + n_q, m + n]: global rows as above; sequence rows never see a global token."""
        b = seq_valid.shape[0]
        blind = torch.zeros(b, n_q, n_global, dtype=torch.bool, device=seq_valid.device)
        seq_rows = torch.cat([blind, recent_causal_mask(seq_valid, n_q)], dim=2)
        return torch.cat([self._global_rows(seq_valid, n_global), seq_rows], dim=1)

    # --- forward (joint) -----------------------------------------------------------------------------

    def forward_states(self, batch: RankingBatch) -> list[torch.Tensor]:
        """Joint pass; the token states [B, m + k, D] after each layer (for the read-out and for tests)."""
        g = self.global_tokens(batch)  # [B, m, D]
        s, valid = self.sequence_tokens(batch)  # [B, G, D], [B, G]
        m, n_q = g.shape[1], self._n_queries(s.shape[1])
        context = torch.cat([g, s], dim=1)  # [B, m + G, D]
        x = torch.cat([g, s[:, s.shape[1] - n_q :]], dim=1)  # [B, m + k, D]
        x = self.layers[0](x, context=context, mask=self._joint_mask(valid, m, n_q))
        states = [x]
        q_valid = valid[:, valid.shape[1] - n_q :]
        self_mask = self._joint_mask(q_valid, m, n_q)  # [B, m + k, m + k]
        for layer in self.layers[1:]:
            x = layer(x, mask=self_mask)
            states.append(x)
        return states

    def forward(self, batch: RankingBatch) -> RankingOutput:
        return self._readout(batch, self.forward_states(batch)[-1][:, : self.n_global])

    def _readout(self, batch: RankingBatch, g: torch.Tensor) -> RankingOutput:
        if self.mixer is None:
            return RankingOutput(logits=self.heads(g.flatten(1)), aux_loss=g.new_zeros(()))
        features = self.tokenizer(self.sparse_arch.semantic_slots(batch))  # [B, T_f, D]
        x, penalty = self.mixer(torch.cat([features, g], dim=1))  # [B, T_f + m, D]
        return RankingOutput(logits=self.heads(x.mean(dim=1)), aux_loss=penalty)

    # --- serving: cache the sequence side once, score many candidates ------------------------------

    def encode_sequence(self, batch: RankingBatch) -> LongerCache:
        """Run the sequence side only (it never sees the candidate) and keep each layer's sequence K/V."""
        s, valid = self.sequence_tokens(batch)
        n = s.shape[1]
        n_q = self._n_queries(n)
        cache = LongerCache([], [], [])
        for i, block in enumerate(self.layers):
            k, v = block.attn.kv(block.norm1(s))
            cache.keys.append(k)
            cache.values.append(v)
            cache.valid.append(valid)
            queries = s[:, s.shape[1] - n_q :] if i == 0 else s
            s = _block_step(block, queries, k, v, recent_causal_mask(valid, n_q))
            valid = valid[:, valid.shape[1] - n_q :]
        return cache

    def score(
        self, cache: LongerCache, batch: RankingBatch, cache_index: torch.Tensor | None = None
    ) -> RankingOutput:
        """Score the candidates of ``batch`` against cached sequences: row b uses cache row
        ``cache_index[b]`` (default: row b). Only the non-sequential features of ``batch`` are read."""
        g = self.global_tokens(batch)  # [B, m, D]
        for i, block in enumerate(self.layers):
            k_seq, v_seq, valid = cache.keys[i], cache.values[i], cache.valid[i]
            if cache_index is not None:
                k_seq, v_seq, valid = k_seq[cache_index], v_seq[cache_index], valid[cache_index]
            k_g, v_g = block.attn.kv(block.norm1(g))
            k, v = torch.cat([k_g, k_seq], dim=2), torch.cat([v_g, v_seq], dim=2)
            g = _block_step(block, g, k, v, self._global_rows(valid, g.shape[1]))
        return self._readout(batch, g)
