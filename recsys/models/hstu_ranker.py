"""HSTU as a generative ranker (the GR paper's ranking formulation; spec: models.md, "HSTU as a generative
ranker", and the production block of the HSTU section).

The user's history is a sequence of item and action tokens; a ranked item (a training example, or a
candidate at serving time) is an item token with no action yet, appended after the history events it may
see. At every such target token the model predicts the user's action on the item: one logit per task of the
``FeatureSpec`` (click, like) and, optionally, a softmax over the action bucket (rating or dwell bucket).

Tokens (width D):
- history event j: item token = E_item[item_j] + sum of its item-attribute embeddings (category, creator,
  shared with the candidate's fields of the same name); action token = E_action[action bucket_j]. With
  ``action_mode="interleave"`` (the paper) they are two tokens (item_j, action_j) at positions 2j, 2j + 1;
  with ``"add"`` one token item_j + action_j at position j (half the tokens, a quarter of the attention).
- target token: E_item[item] + its item attributes + every other sparse field of the example (user id and
  profile, hour, weekday, slot position) + Linear(symlog(dense point-in-time statistics)), at the position
  right after the last history event it sees.
- position and time are additive input embeddings (production variant): a learned absolute position and a
  time-gap bucket floor(sqrt(gap_seconds / 60)), gap = time since the previous history event (for a target:
  its own time minus its last visible event's), clamped to ``num_time_buckets - 1``; the first event (and a
  target with no history) uses one extra "no earlier event" bucket.

Block (production variant): x_n = LayerNorm(x) (learned); U, V, Q, K = split(Linear(x_n)); U = SiLU(U)
(SiLU on U only); A = SiLU(Q K^T / sqrt(dqk)) / N masked, out = A V; y = Linear_nobias([U, out,
U * LayerNorm(out)]); x = x + dropout(y). No FFN, no softmax. N (``attention_normalizer``) is a constant, so a
target's output does not depend on what else is in the batch.

Mask: history tokens are causal among themselves (the first ``lengths`` events are valid); a target sees the
history tokens of its first ``limit`` events and itself, never another target. This is exactly the M-FALCON
mask with a per-target prefix: training puts every example of a user in one forward (each target at its own
prefix), serving puts all candidates at the end of the history (``recsys.serving.mfalcon``), and because
history tokens never see a target, the history's keys/values are computed once (``encode``) and each
target only attends against them (``target_states``): O(N^2 + M N) instead of O(M N^2).

OPEN choices and what was picked:
- action_mode: "interleave" (the paper) by default; "add" as the option.
- The time embedding is of the gap to the previous event, not to the request time, so the history's
  encoding does not depend on the target's time and one encoding serves every target of a user (training)
  and every micro-batch (serving); the target carries the gap from its last event to its own time.
- The target token carries the example's non-sequence features (user profile, context, dense statistics) as
  summed side features, so the ranker sees what DIN/DeepFM see; the history tokens carry item attributes and
  the action bucket only.
- Loss only at target tokens (the examples of the split); history item tokens are context.
- ``forward(RankingBatch)``: one target per row (the row's candidate after its left-padded window), which
  makes the model a drop-in ranking model (``RankingOutput``) and is the "full forward per candidate" that
  M-FALCON must equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import Tensor, nn

from recsys.core.config import FrozenModel
from recsys.models.batch import FeatureSpec, RankingBatch, RankingOutput
from recsys.models.heads import HeadsConfig, TaskHeads

ACTION = "action"  # the side field of the history that holds the action (rating / dwell) bucket


class HSTURankerConfig(FrozenModel):
    features: FeatureSpec = Field(description="The feature schema the model is built for.")
    sequence: str = Field("history", description="The FeatureSpec sequence that is the user's history.")
    embedding_dim: int = Field(64, ge=1)
    num_blocks: int = Field(2, ge=1)
    num_heads: int = Field(2, ge=1)
    dqk: int = Field(32, ge=1, description="Query/key width per head.")
    dv: int = Field(32, ge=1, description="Value (and U) width per head.")
    dropout: float = Field(0.2, ge=0.0, lt=1.0, description="Input and block-output dropout.")
    action_mode: Literal["interleave", "add"] = Field(
        "interleave", description="Action as its own token after the item (paper) or added to the item token."
    )
    num_time_buckets: int = Field(
        1024, ge=2, description="floor(sqrt(gap minutes)) buckets (the last one takes every larger gap)."
    )
    attention_normalizer: float = Field(
        100.0, gt=0.0, description="N in SiLU(scores) / N: a constant (about a typical history length)."
    )
    action_head: bool = Field(
        True, description="Also predict the action bucket (softmax) where the example has one."
    )
    heads: HeadsConfig = HeadsConfig()

    @model_validator(mode="after")
    def _check(self) -> HSTURankerConfig:
        names = [s.name for s in self.features.sequences]
        if self.sequence not in names:
            raise ValueError(f"sequence: {self.sequence!r} is not a sequence of features (has {names})")
        side = {s.name for s in self.features.sequence(self.sequence).side}
        if ACTION not in side:
            raise ValueError(f"features: sequence {self.sequence!r} needs the side field {ACTION!r}")
        return self

    @property
    def max_len(self) -> int:
        """History events a target reads (the sequence's max_len)."""
        return self.features.sequence(self.sequence).max_len

    @property
    def tokens_per_event(self) -> int:
        return 2 if self.action_mode == "interleave" else 1


@dataclass
class History:
    """B histories, right-padded: the first ``lengths[b]`` events of row b are valid, oldest first."""

    items: Tensor  # [B, N] int64 item_idx (0 = padding)
    side: dict[str, Tensor]  # side field (item attributes and "action") -> [B, N] int64
    ts: Tensor  # [B, N] int64 seconds (any origin: only differences are read)
    lengths: Tensor  # [B] int64

    def to(self, device: torch.device | str) -> History:
        return History(
            self.items.to(device),
            {k: v.to(device) for k, v in self.side.items()},
            self.ts.to(device),
            self.lengths.to(device),
        )


@dataclass
class Targets:
    """M target items per history row (0 = padding), each seeing the first ``limits`` events of its row."""

    items: Tensor  # [B, M] int64
    sparse: dict[str, Tensor]  # every sparse field of the spec -> [B, M] int64
    dense: Tensor  # [B, M, F] float32 (standardised point-in-time statistics)
    ts: Tensor  # [B, M] int64, the example's (request's) time
    limits: Tensor  # [B, M] int64 in [0, lengths[b]]: history events the target sees
    labels: dict[str, Tensor] = field(default_factory=dict)  # task -> [B, M] float32
    action: Tensor | None = None  # [B, M] int64 action bucket label (0 = none)

    def to(self, device: torch.device | str) -> Targets:
        return Targets(
            self.items.to(device),
            {k: v.to(device) for k, v in self.sparse.items()},
            self.dense.to(device),
            self.ts.to(device),
            self.limits.to(device),
            {k: v.to(device) for k, v in self.labels.items()},
            None if self.action is None else self.action.to(device),
        )

    def narrow(self, start: int, width: int) -> Targets:
        """Columns start..start+width (a micro-batch of candidates)."""

        def cut(t: Tensor) -> Tensor:
            return t[:, start : start + width]

        return Targets(
            cut(self.items),
            {k: cut(v) for k, v in self.sparse.items()},
            cut(self.dense),
            cut(self.ts),
            cut(self.limits),
            {k: cut(v) for k, v in self.labels.items()},
            None if self.action is None else cut(self.action),
        )


@dataclass
class HistoryCache:
    """What targets need from B encoded histories: per block the keys/values of every history token."""

    keys: list[Tensor]  # per block [B, T, H, dqk]
    values: list[Tensor]  # per block [B, T, H, dv]
    token_valid: Tensor  # [B, T] bool
    history: History

    @property
    def batch_size(self) -> int:
        return int(self.history.lengths.shape[0])


def time_buckets(gap: Tensor, num_buckets: int) -> Tensor:
    """floor(sqrt(max(gap, 0) / 60)) clamped to num_buckets - 1 (integer-exact: isqrt of whole minutes)."""
    minutes = gap.clamp(min=0) // 60
    root = torch.sqrt(minutes.to(torch.float64)).floor().to(torch.int64)
    # float64 sqrt of an integer below 2^52 can be off by one at perfect squares: correct it exactly.
    root = root - (root * root > minutes).to(torch.int64)
    root = root + ((root + 1) * (root + 1) <= minutes).to(torch.int64)
    return root.clamp(max=num_buckets - 1)


class RankerBlock(nn.Module):
    def __init__(self, config: HSTURankerConfig) -> None:
        super().__init__()
        c = config
        d, h = c.embedding_dim, c.num_heads
        self.config = c
        self.split_sizes = [h * c.dv, h * c.dv, h * c.dqk, h * c.dqk]
        self.norm = nn.LayerNorm(d)
        self.uvqk = nn.Linear(d, sum(self.split_sizes))
        self.attn_norm = nn.LayerNorm(h * c.dv)
        self.output = nn.Linear(3 * h * c.dv, d, bias=False)
        self.scale = 1.0 / math.sqrt(c.dqk)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """x [.., D] -> U [.., H*dv] (SiLU), V [.., H, dv], Q [.., H, dqk] (scaled), K [.., H, dqk]."""
        c = self.config
        u, v, q, k = torch.split(self.uvqk(self.norm(x)), self.split_sizes, dim=-1)
        lead = x.shape[:-1]
        return (
            F.silu(u),
            v.reshape(*lead, c.num_heads, c.dv),
            (q * self.scale).reshape(*lead, c.num_heads, c.dqk),
            k.reshape(*lead, c.num_heads, c.dqk),
        )

    def finish(self, x: Tensor, u: Tensor, attn: Tensor) -> Tensor:
        """x + dropout(Linear([U, A, U * LN(A)])); attn [.., H, dv]."""
        attn = attn.reshape(*attn.shape[:-2], -1)
        y = self.output(torch.cat([u, attn, u * self.attn_norm(attn)], dim=-1))
        return x + F.dropout(y, p=self.config.dropout, training=self.training)


class HSTURanker(nn.Module):
    """Generative ranker: history tokens + target item tokens -> per-target task logits (module docstring)."""

    def __init__(self, config: HSTURankerConfig) -> None:
        super().__init__()
        self.config = config
        spec = config.features
        d = config.embedding_dim
        seq = spec.sequence(config.sequence)
        self.max_len = seq.max_len
        cards = {f.name: f.cardinality for f in spec.sparse}
        self.item_attrs = tuple(s.name for s in seq.side if s.name != ACTION)
        for s in seq.side:
            if s.name != ACTION:
                cards[s.name] = max(cards.get(s.name, 0), s.cardinality)
        self.target_fields = tuple(f.name for f in spec.sparse)
        self.item_embedding = nn.Embedding(spec.n_items + 1, d, padding_idx=0)
        self.field_embeddings = nn.ModuleDict(
            {n: nn.Embedding(c, d, padding_idx=0) for n, c in cards.items()}
        )
        self.num_actions = next(s.cardinality for s in seq.side if s.name == ACTION)
        self.action_embedding = nn.Embedding(self.num_actions, d, padding_idx=0)
        self.dense = nn.Linear(len(spec.dense), d) if spec.dense else None
        self.no_gap = config.num_time_buckets  # the "no earlier event" bucket
        self.time_embedding = nn.Embedding(config.num_time_buckets + 1, d)
        self.position_embedding = nn.Embedding(config.tokens_per_event * self.max_len + 1, d)
        self.blocks = nn.ModuleList(RankerBlock(config) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(d)
        self.heads = TaskHeads(d, spec.tasks, config.heads)
        self.action_head = nn.Linear(d, self.num_actions) if config.action_head else None
        with torch.no_grad():
            for emb in (self.item_embedding, self.action_embedding, *self.field_embeddings.values()):
                nn.init.normal_(emb.weight, std=0.02)
                emb.weight[0].zero_()
            nn.init.normal_(self.time_embedding.weight, std=0.02)
            nn.init.normal_(self.position_embedding.weight, std=0.02)

    # -- tokens ----------------------------------------------------------------------------------------------
    def _item_tokens(self, items: Tensor, attrs: dict[str, Tensor]) -> Tensor:
        x = self.item_embedding(items)
        for name in self.item_attrs:
            if name in attrs:
                x = x + self.field_embeddings[name](attrs[name])
        return x

    def history_tokens(self, history: History) -> tuple[Tensor, Tensor]:
        """[B, T, D] input tokens of the history and [B, T] validity (T = tokens_per_event x N)."""
        b, n = history.items.shape
        device = history.items.device
        valid = torch.arange(n, device=device)[None, :] < history.lengths[:, None]  # [B, N]
        gap = torch.zeros_like(history.ts)
        if n > 1:
            gap[:, 1:] = history.ts[:, 1:] - history.ts[:, :-1]
        bucket = time_buckets(gap, self.config.num_time_buckets)
        bucket[:, 0] = self.no_gap
        time = self.time_embedding(bucket)  # [B, N, D]
        item = self._item_tokens(history.items, history.side) + time
        action = self.action_embedding(history.side[ACTION]) + time
        if self.config.action_mode == "add":
            x = item + action + self.position_embedding(torch.arange(n, device=device))[None]
            token_valid = valid
        else:
            x = torch.stack([item, action], dim=2).reshape(b, 2 * n, -1)  # item_0, action_0, item_1, ...
            x = x + self.position_embedding(torch.arange(2 * n, device=device))[None]
            token_valid = valid.repeat_interleave(2, dim=1)
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        return x * token_valid.unsqueeze(-1).to(x.dtype), token_valid

    def target_tokens(self, history: History, targets: Targets) -> Tensor:
        """[B, M, D] input tokens of the targets (see the module docstring)."""
        x = self._item_tokens(targets.items, targets.sparse)
        for name in self.target_fields:
            if name not in self.item_attrs and name in targets.sparse:
                x = x + self.field_embeddings[name](targets.sparse[name])
        if self.dense is not None:
            dense = targets.dense
            if dense.shape[-1] == 0:  # no statistics sent (all unknown): the projection of zeros
                x = x + self.dense.bias
            else:
                x = x + self.dense(torch.sign(dense) * torch.log1p(dense.abs()))
        last = (targets.limits - 1).clamp(min=0)  # [B, M]
        prev_ts = history.ts.gather(1, last) if history.ts.shape[1] else torch.zeros_like(targets.ts)
        bucket = time_buckets(targets.ts - prev_ts, self.config.num_time_buckets)
        bucket = torch.where(targets.limits > 0, bucket, torch.full_like(bucket, self.no_gap))
        x = x + self.time_embedding(bucket)
        x = x + self.position_embedding(targets.limits.clamp(max=self.max_len) * self.config.tokens_per_event)
        x = F.dropout(x, p=self.config.dropout, training=self.training)
        return x * (targets.items > 0).unsqueeze(-1).to(x.dtype)

    # -- encoding --------------------------------------------------------------------------------------------
    def encode(self, history: History) -> HistoryCache:
        """Run the history tokens through every block (causal) and keep each block's keys/values."""
        if history.items.shape[1] > self.max_len:
            raise ValueError(
                f"history has {history.items.shape[1]} events but the model's max_len is {self.max_len}"
            )
        x, token_valid = self.history_tokens(history)
        t = x.shape[1]
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        mask = (causal[None] & token_valid[:, None, :]).unsqueeze(1)  # [B, 1, T(query), T(key)]
        weight = _mask_weight(mask, x.dtype, self.config.attention_normalizer)
        keys, values = [], []
        for i, block in enumerate(self.blocks):
            u, v, q, k = block.project(x)
            keys.append(k)
            values.append(v)
            if i == len(self.blocks) - 1:
                break  # the last block's history outputs are never read: only its keys/values are
            attn = _pointwise(torch.einsum("bqhd,bkhd->bhqk", q, k), weight)
            x = block.finish(x, u, torch.einsum("bhqk,bkhd->bqhd", attn, v))
            x = x * token_valid.unsqueeze(-1).to(x.dtype)
        return HistoryCache(keys, values, token_valid, history)

    def target_states(self, cache: HistoryCache, targets: Targets) -> Tensor:
        """[B, M, D] final states of the targets: each attends to its visible history prefix and itself."""
        b, m = targets.items.shape
        if b != cache.batch_size:
            raise ValueError(f"targets have {b} rows but the cache holds {cache.batch_size} histories")
        lengths = cache.history.lengths
        if bool((targets.limits > lengths[:, None]).any()) or bool((targets.limits < 0).any()):
            raise ValueError("targets.limits must lie in [0, lengths] of their history row")
        x = self.target_tokens(cache.history, targets)  # [B, M, D]
        t = cache.token_valid.shape[1]
        limit_tokens = targets.limits * self.config.tokens_per_event  # [B, M]
        seen = torch.arange(t, device=x.device)[None, None, :] < limit_tokens[:, :, None]  # [B, M, T]
        n_norm = self.config.attention_normalizer
        weight = _mask_weight(seen.unsqueeze(1), x.dtype, n_norm)  # [B, 1, M, T]
        for layer, block in enumerate(self.blocks):
            u, v, q, k = block.project(x)  # v [B, M, H, dv], q/k [B, M, H, dqk]
            attn = _pointwise(torch.einsum("bmhd,bthd->bhmt", q, cache.keys[layer]), weight)
            out = torch.einsum("bhmt,bthd->bmhd", attn, cache.values[layer])
            own = F.silu((q * k).sum(-1)) / n_norm  # [B, M, H]: the target's attention to itself
            out = out + own.unsqueeze(-1) * v
            x = block.finish(x, u, out)
        return self.final_norm(x)

    def heads_of(self, states: Tensor) -> dict[str, Tensor]:
        """{task: [B, M] logits} (+ "action" [B, M, A] logits when the action head is on)."""
        out = self.heads(states)
        if self.action_head is not None:
            out[ACTION] = self.action_head(states)
        return out

    def score(self, history: History, targets: Targets) -> dict[str, Tensor]:
        return self.heads_of(self.target_states(self.encode(history), targets))

    # -- the definition, for tests: one masked forward over [history tokens; target tokens] -----------------
    def forward_full(self, history: History, targets: Targets) -> dict[str, Tensor]:
        """The same logits from one forward pass over the concatenated sequence with an explicit mask (no
        cache, no split into history and target passes)."""
        h, token_valid = self.history_tokens(history)
        tg = self.target_tokens(history, targets)
        b, t, m = h.shape[0], h.shape[1], tg.shape[1]
        x = torch.cat([h, tg], dim=1)  # [B, T + M, D]
        idx = torch.arange(t + m, device=x.device)
        is_target = idx >= t
        limit_tokens = targets.limits * self.config.tokens_per_event
        # Key j is visible to query i: history causal, or a target's prefix, or itself.
        q_limit = torch.where(
            is_target[None, :],
            torch.cat([torch.zeros(b, t, dtype=torch.int64, device=x.device), limit_tokens], dim=1),
            idx[None, :] + 1,
        )  # [B, T + M] history keys visible (count)
        key_valid = torch.cat([token_valid, torch.zeros(b, m, dtype=torch.bool, device=x.device)], dim=1)
        mask = (idx[None, None, :] < q_limit[:, :, None]) & key_valid[:, None, :]
        mask = mask | torch.eye(t + m, dtype=torch.bool, device=x.device)[None]
        weight = _mask_weight(mask.unsqueeze(1), x.dtype, self.config.attention_normalizer)
        for block in self.blocks:
            u, v, q, k = block.project(x)
            attn = _pointwise(torch.einsum("bqhd,bkhd->bhqk", q, k), weight)
            x = block.finish(x, u, torch.einsum("bhqk,bkhd->bqhd", attn, v))
        return self.heads_of(self.final_norm(x[:, t:]))

    # -- the ranking-model interface -------------------------------------------------------------------------
    def forward(self, batch: RankingBatch) -> RankingOutput:
        """One target per row: the row's candidate right after its history window (a full forward each)."""
        history, targets = rows_as_targets(batch, self.config.sequence)
        logits = self.score(history, targets)
        out = {task: logits[task][:, 0] for task in self.config.features.tasks}
        return RankingOutput(logits=out, aux_loss=targets.dense.new_zeros(()))


def _mask_weight(mask: Tensor, dtype: torch.dtype, normalizer: float) -> Tensor:
    """The attention mask as the factor 1/N where a key is visible and 0 where not (built once per pass)."""
    return mask.to(dtype) / normalizer


def _pointwise(scores: Tensor, weight: Tensor) -> Tensor:
    """SiLU(scores) / N on visible keys, 0 elsewhere: one multiply by the mask weight (in place when no
    gradient is recorded; a masked score is finite, so 0 x SiLU(score) is 0)."""
    return F.silu(scores, inplace=not torch.is_grad_enabled()).mul_(weight)


def rows_as_targets(batch: RankingBatch, sequence: str = "history") -> tuple[History, Targets]:
    """A RankingBatch (left-padded windows, time gaps to the example) as B histories with one target each.

    Times are relative: the example is at 0 and history event j at -round(time_gap_j)."""
    seq = batch.sequences[sequence]
    if seq.item_ids is None:
        raise ValueError(f"sequence {sequence!r}: the HSTU ranker needs item_ids (not the deduplicated form)")
    b, n = seq.item_ids.shape
    lengths = seq.lengths
    # Left-padded -> right-padded: row r's valid steps are its last lengths[r] columns.
    src = (torch.arange(n, device=lengths.device)[None, :] + (n - lengths)[:, None]).clamp(max=max(n - 1, 0))
    valid = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]

    def right(t: Tensor) -> Tensor:
        return torch.where(valid, t.gather(1, src), torch.zeros_like(t)) if n else t

    gap = torch.round(seq.time_gap.double()).to(torch.int64)
    history = History(
        items=right(seq.item_ids),
        side={k: right(v) for k, v in seq.side.items()},
        ts=right(-gap),
        lengths=lengths,
    )
    targets = Targets(
        items=batch.item_id[:, None],
        sparse={k: v[:, None] for k, v in batch.sparse.items()},
        dense=batch.dense[:, None, :],
        ts=torch.zeros(b, 1, dtype=torch.int64, device=lengths.device),
        limits=lengths[:, None],
    )
    return history, targets
