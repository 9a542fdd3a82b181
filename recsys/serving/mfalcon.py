"""M-FALCON for HSTU: encode a user's history once, cache each block's keys/values, then score any number of
candidates in micro-batches against the cache (spec: models.md, HSTU, M-FALCON).

The sequence the scores are defined on is ``[history (L items); candidates (m items)]`` with
``num_candidates = m`` in ``recsys.models.ops.hstu_attention``:

- a candidate attends to the whole history and to itself only, never to another candidate;
- every candidate takes the position right after the history (``L``) -- in the relative position bias (the op
  does this) and in the absolute position embedding of the input stage (done here, see below);
- every candidate uses the request time as its query time, so its time bias against history item j is
  ``bucket(request_ts - ts_j)``; the history keeps ``query_ts[i] = ts[i + 1]`` and the request time at its
  last position, exactly as in training and in ``recsys.evaluation.retrieval``.

Because history tokens never see a candidate (causal mask), the history's per-block keys, values and hidden
states do not depend on the candidates: they are computed once (``encode_history``) and every candidate only
needs its own query/key/value against the cached keys -- O(L^2 + m L) work instead of O(m L^2) for scoring
each candidate with its own forward pass. Micro-batching candidates changes nothing in the result
(candidates are independent), only the peak memory.

OPEN choices, and what was picked:
- Candidate input: item embedding * sqrt(D) + the position embedding of position L (the shared slot).
  Hence a history of at most ``max_len - 1`` items (the slot must exist): longer histories are cut to their
  most recent ``max_len - 1`` items by ``truncate_history``.
- A candidate's own key time (for the bias of its attention to itself) is the request time: gap 0, bucket 0.
- What a candidate's output state is turned into: ``CandidateHead``. ``TargetDotHead`` scores a candidate by
  ``cos(state_c, item_c) / temperature`` -- the retrieval model's own scoring function applied at the
  candidate's slot -- and ``UserDotHead`` is the plain retrieval score ``cos(user, item_c) / temperature``
  that reads only the cached history state. ``recsys.serving.service`` documents which one it serves and why.

``models.hstu.HSTUBlock.forward`` returns only its output, so the per-block U/V/Q/K are recomputed here from
the block's own parameters (``block.uvqk``, ``block.output``, ``block.pos_weight``, ``block.ts_weight``); the
reference path (``reference_candidate_states``) goes through ``recsys.models.ops.hstu_attention`` with
``num_candidates`` on the concatenated sequence, so a test can prove that both agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.models.hstu import HSTU, HSTUBlock
from recsys.models.ops.hstu_attention import Backend, hstu_attention
from recsys.models.ops.pytorch.hstu_attention import time_bucket
from recsys.models.sequential import l2_normalize, valid_mask

__all__ = [
    "CandidateHead",
    "HistoryCache",
    "MFalconScorer",
    "TargetDotHead",
    "UserDotHead",
    "candidate_states",
    "encode_history",
    "encode_user",
    "history_query_ts",
    "naive_candidate_states",
    "reference_candidate_states",
    "truncate_history",
]


@dataclass(frozen=True)
class HistoryCache:
    """Everything candidates need from B encoded histories (right-padded, L = the widest history).

    keys[l] [B, L, H, dqk] and values[l] [B, L, H, dv] are block l's history keys/values; hist_bias[l] [B, L]
    the bias of a candidate's attention to each history item (position + time, the same for every candidate
    of a user) and self_bias[l] [B] the bias of a candidate's attention to itself. ``user`` [B, D] is the
    L2-normalised output at the last history position (the retrieval user vector).
    """

    keys: list[Tensor]
    values: list[Tensor]
    hist_bias: list[Tensor]
    self_bias: list[Tensor]
    valid: Tensor  # [B, L] bool
    lengths: Tensor  # [B] int64
    user: Tensor  # [B, D]

    @property
    def batch_size(self) -> int:
        return int(self.lengths.shape[0])


def truncate_history(items: Tensor, ts: Tensor, lengths: Tensor, max_history: int) -> tuple[Tensor, ...]:
    """Keep each row's most recent ``max_history`` items (right-padded in, right-padded out)."""
    if max_history < 1:
        raise ValueError(f"max_history must be >= 1, got {max_history}")
    if items.shape[1] <= max_history:
        return items, ts, lengths
    start = (lengths - max_history).clamp(min=0)  # [B]
    index = start[:, None] + torch.arange(max_history, device=items.device)[None, :]  # [B, max_history]
    new_lengths = lengths.clamp(max=max_history)
    keep = valid_mask(new_lengths, max_history)
    return items.gather(1, index) * keep, ts.gather(1, index) * keep, new_lengths


def history_query_ts(ts: Tensor, lengths: Tensor, request_ts: Tensor) -> Tensor:
    """[B, L] query times of the history: ts[i + 1], and the request time at the last valid position."""
    b, n = ts.shape
    query = torch.zeros_like(ts)
    if n > 1:
        query[:, :-1] = ts[:, 1:]
    last = (lengths - 1).clamp(min=0)
    rows = torch.arange(b, device=ts.device)
    query[rows, last] = torch.where(lengths > 0, request_ts.to(ts.dtype), query[rows, last])
    return query * valid_mask(lengths, n).to(ts.dtype)


def _embed(model: HSTU, items: Tensor, positions: Tensor, keep: Tensor) -> Tensor:
    """The input stage with explicit positions (``SequenceInput`` uses arange): [B, N] -> [B, N, D]."""
    inp = model.input
    x = inp.item_embedding(items) * math.sqrt(inp.dim) + inp.position_embedding(positions)  # [B, N, D]
    x = inp.dropout(x)
    return x * keep.unsqueeze(-1).to(x.dtype)


def _uvqk(block: HSTUBlock, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """U [.., H*dv], V [.., H, dv], Q [.., H, dqk], K [.., H, dqk] of one block (as HSTUBlock.forward)."""
    c = block.config
    x_n = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    u, v, q, k = torch.split(F.silu(x_n @ block.uvqk), block.split_sizes, dim=-1)
    lead = x.shape[:-1]
    return (
        u,
        v.reshape(*lead, c.num_heads, c.dv),
        q.reshape(*lead, c.num_heads, c.dqk),
        k.reshape(*lead, c.num_heads, c.dqk),
    )


def _finish(block: HSTUBlock, x: Tensor, u: Tensor, attn: Tensor) -> Tensor:
    """y = U * LN(attention output); x + Linear(dropout(y)) (as HSTUBlock.forward)."""
    attn = attn.reshape(*attn.shape[:-2], -1)  # [.., H*dv]
    y = u * F.layer_norm(attn, (attn.shape[-1],), eps=1e-6)
    return x + block.output(F.dropout(y, p=block.config.dropout, training=block.training))


def _max_history(model: HSTU) -> int:
    return model.config.max_len - 1


def _check_history_width(model: HSTU, items: Tensor) -> tuple[int, int]:
    """(B, N) of a history batch; N must leave the candidates' slot (at most max_len - 1)."""
    b, n = items.shape
    if n > _max_history(model):
        raise ValueError(
            f"history has {n} positions but M-FALCON needs at most max_len - 1 = {_max_history(model)} "
            "(the candidates' slot); use truncate_history"
        )
    return b, n


def encode_history(
    model: HSTU, items: Tensor, ts: Tensor, lengths: Tensor, request_ts: Tensor
) -> HistoryCache:
    """Run the history through every block once and keep what candidates need (see ``HistoryCache``).

    items/ts [B, L] right-padded (L <= max_len - 1), lengths [B], request_ts [B] (unix seconds).
    """
    c = model.config
    b, n = _check_history_width(model, items)
    keep = valid_mask(lengths, n)  # [B, N]
    query_ts = history_query_ts(ts, lengths, request_ts)
    positions = torch.arange(n, device=items.device).expand(b, n)
    x = _embed(model, items, positions, keep)  # [B, N, D]
    max_pos = c.max_len
    # Relative position of history item j seen from the candidate slot L: j - L (clamped like the op).
    rel = (torch.arange(n, device=items.device)[None, :] - lengths[:, None]).clamp(
        -(max_pos - 1), max_pos - 1
    )
    gap = request_ts.to(torch.int64)[:, None] - ts  # [B, N]
    # The mask and bias indices depend on lengths and times only: built once, shared by every block.
    index = model.attention_index(lengths, ts, query_ts)
    keys, values, hist_bias, self_bias = [], [], [], []
    for block in model.blocks:
        u, v, q, k = _uvqk(block, x)
        attn = hstu_attention(
            q,
            k,
            v,
            lengths,
            normalizer=float(c.max_len),
            pos_weight=block.pos_weight,
            ts_weight=block.ts_weight,
            query_ts=query_ts if block.ts_weight is not None else None,
            key_ts=ts if block.ts_weight is not None else None,
            index=index,
            backend=c.attention_backend,
        )  # [B, N, H, dv]
        keys.append(k)
        values.append(v)
        bias = block.pos_weight[rel + max_pos - 1]  # [B, N]
        own = block.pos_weight[max_pos - 1].expand(b)  # [B]
        if block.ts_weight is not None:
            bias = bias + block.ts_weight[time_bucket(gap, block.ts_weight.numel())]
            own = own + block.ts_weight[0]  # own key time = query time: gap 0, bucket 0
        hist_bias.append(bias)
        self_bias.append(own)
        x = _finish(block, x, u, attn)
    out = l2_normalize(x) * keep.unsqueeze(-1).to(x.dtype)  # [B, N, D]
    last = (lengths - 1).clamp(min=0)
    user = out[torch.arange(b, device=items.device), last]  # [B, D]
    return HistoryCache(keys, values, hist_bias, self_bias, keep, lengths, user)


def encode_user(model: HSTU, items: Tensor, ts: Tensor, lengths: Tensor, request_ts: Tensor) -> Tensor:
    """[B, D] the user vector of ``encode_history`` (its ``user``), without the candidates' cache.

    Every block but the last runs over the whole history; the last block's output is read at one position
    only (the last valid one), so that block computes the attention of that one query: O(L) instead of
    O(L^2), and no per-block keys, values or biases are kept. A history of length 0 gives the zero vector,
    as in ``encode_history``.
    """
    c = model.config
    b, n = _check_history_width(model, items)
    rows = torch.arange(b, device=items.device)
    keep = valid_mask(lengths, n)  # [B, N]
    last = (lengths - 1).clamp(min=0)  # [B]
    query_ts = history_query_ts(ts, lengths, request_ts)
    x = _embed(model, items, torch.arange(n, device=items.device).expand(b, n), keep)  # [B, N, D]
    *inner, final = model.blocks
    if inner:
        index = model.attention_index(lengths, ts, query_ts)  # shared by the inner blocks
        for block in inner:
            x = block(x, lengths, ts, query_ts, index=index)  # the model's own block: whole history
    # The last block at the last position: query `last` sees keys 0..last (causal, within the length).
    u, v, q, k = _uvqk(final, x)
    q_last = q[rows, last]  # [B, H, dqk]
    scores = torch.einsum("bhd,bjhd->bhj", q_last, k)  # [B, H, N]
    max_pos = c.max_len
    key_idx = torch.arange(n, device=items.device)
    rel = (key_idx[None, :] - last[:, None]).clamp(-(max_pos - 1), max_pos - 1) + max_pos - 1  # [B, N]
    bias = final.pos_weight[rel]
    if final.ts_weight is not None:
        gap = query_ts[rows, last][:, None] - ts  # [B, N]
        bias = bias + final.ts_weight[time_bucket(gap, final.ts_weight.numel())]
    seen = (key_idx[None, :] <= last[:, None]) & keep  # [B, N]
    attn = torch.where(seen[:, None, :], F.silu(scores + bias[:, None, :]) / float(c.max_len), 0.0)
    out = torch.einsum("bhj,bjhd->bhd", attn, v)  # [B, H, dv]
    y = _finish(final, x[rows, last], u[rows, last], out)  # [B, D]
    return l2_normalize(y) * (lengths > 0).unsqueeze(-1).to(y.dtype)


def _candidate_block(
    block: HSTUBlock, cache: HistoryCache, layer: int, x: Tensor, normalizer: float
) -> Tensor:
    """One block for candidates x [B, M, D] against the cached history of their user."""
    u, v, q, k = _uvqk(block, x)  # v [B, M, H, dv], q/k [B, M, H, dqk]
    scores = torch.einsum("bmhd,blhd->bhml", q, cache.keys[layer])  # [B, H, M, L]
    scores = scores + cache.hist_bias[layer][:, None, None, :]
    attn_hist = F.silu(scores) / normalizer * cache.valid[:, None, None, :].to(scores.dtype)
    own = (q * k).sum(-1) + cache.self_bias[layer][:, None, None]  # [B, M, H]
    out = torch.einsum("bhml,blhd->bmhd", attn_hist, cache.values[layer])  # [B, M, H, dv]
    out = out + (F.silu(own) / normalizer).unsqueeze(-1) * v
    return _finish(block, x, u, out)


def candidate_states(model: HSTU, cache: HistoryCache, candidates: Tensor, micro_batch: int = 256) -> Tensor:
    """[B, M] candidate item ids -> [B, M, D] L2-normalised output states, scored ``micro_batch`` at a time.

    A user with no history (length 0) still gets states: its candidates see only themselves.
    """
    if micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    b, m = candidates.shape
    if b != cache.batch_size:
        raise ValueError(f"candidates have {b} rows but the cache holds {cache.batch_size} histories")
    d = model.config.embedding_dim
    out = torch.empty(b, m, d, device=candidates.device, dtype=cache.user.dtype)
    slot = cache.lengths.clamp(max=_max_history(model))  # [B] the shared position
    for start in range(0, m, micro_batch):
        chunk = candidates[:, start : start + micro_batch]  # [B, b]
        x = _embed(model, chunk, slot[:, None].expand_as(chunk), chunk != 0)  # [B, b, D]
        for layer, block in enumerate(model.blocks):
            x = _candidate_block(block, cache, layer, x, float(model.config.max_len))
        out[:, start : start + micro_batch] = l2_normalize(x) * (chunk != 0).unsqueeze(-1).to(x.dtype)
    return out


def reference_candidate_states(
    model: HSTU,
    items: Tensor,
    ts: Tensor,
    lengths: Tensor,
    request_ts: Tensor,
    candidates: Tensor,
    backend: Backend | None = None,
) -> Tensor:
    """The definition: one forward pass over ``[history; candidates]`` with ``num_candidates`` (no cache).

    candidates [B, M] (no padding: every row has M candidates) -> [B, M, D]. ``backend`` of the attention
    op: the model's own by default.
    """
    c = model.config
    if items.shape[1] == 0:  # no history at all: one padding column keeps the indexing uniform
        items, ts = items.new_zeros(items.shape[0], 1), ts.new_zeros(ts.shape[0], 1)
    b, n = items.shape
    m = candidates.shape[1]
    width = n + m
    total = lengths + m  # [B]
    keep = valid_mask(total, width)
    arange = torch.arange(width, device=items.device)
    # Row r: history at 0..len_r-1, candidates at len_r..len_r+m-1, padding after.
    cand_pos = arange[None, :] - lengths[:, None]  # [B, W] index into the candidates where in [0, m)
    is_cand = (cand_pos >= 0) & (cand_pos < m)
    hist_index = arange.clamp(max=n - 1).expand(b, width)
    seq = torch.where(is_cand, candidates.gather(1, cand_pos.clamp(0, m - 1)), items.gather(1, hist_index))
    seq = seq * keep
    request = request_ts[:, None].to(ts.dtype)
    key_ts = torch.where(is_cand, request, ts.gather(1, hist_index)) * keep
    query_hist = history_query_ts(ts, lengths, request_ts).gather(1, hist_index)
    query_ts = torch.where(is_cand, request, query_hist) * keep
    positions = torch.minimum(arange[None, :], lengths[:, None])  # candidates share position L
    x = _embed(model, seq, positions, keep)
    num_candidates = torch.full_like(lengths, m)
    for block in model.blocks:
        u, v, q, k = _uvqk(block, x)
        attn = hstu_attention(
            q,
            k,
            v,
            total,
            normalizer=float(c.max_len),
            pos_weight=block.pos_weight,
            ts_weight=block.ts_weight,
            query_ts=query_ts if block.ts_weight is not None else None,
            key_ts=key_ts if block.ts_weight is not None else None,
            num_candidates=num_candidates,
            backend=backend or c.attention_backend,
        )
        x = _finish(block, x, u, attn)
    out = l2_normalize(x)  # [B, W, D]
    gather = (lengths[:, None] + torch.arange(m, device=items.device)[None, :]).unsqueeze(-1)
    return out.gather(1, gather.expand(b, m, out.shape[-1]))  # [B, M, D]


def naive_candidate_states(
    model: HSTU,
    items: Tensor,
    ts: Tensor,
    lengths: Tensor,
    request_ts: Tensor,
    candidates: Tensor,
    batch: int = 1,
) -> Tensor:
    """Per-candidate scoring: a full forward pass over ``[history; candidate]`` for every candidate.

    ``batch`` candidates of a user run as ``batch`` separate sequences of one forward call (each its own
    history copy): the baseline M-FALCON is measured against. items/ts [1, L] (one user) -> [1, M, D].
    """
    if items.shape[0] != 1:
        raise ValueError("naive_candidate_states scores one user at a time (items must be [1, L])")
    m = candidates.shape[1]
    out = []
    for start in range(0, m, batch):
        chunk = candidates[0, start : start + batch]  # [c]
        c = chunk.shape[0]
        states = reference_candidate_states(
            model,
            items.expand(c, -1),
            ts.expand(c, -1),
            lengths.expand(c),
            request_ts.expand(c),
            chunk[:, None],
        )  # [c, 1, D]
        out.append(states[:, 0])
    return torch.cat(out).unsqueeze(0)  # [1, M, D]


# -- heads: candidate states -> scores ---------------------------------------------------------------------
class CandidateHead(Protocol):
    """(model, cache, candidate ids [B, M], candidate states [B, M, D] or None) -> {task: scores [B, M]}.

    ``needs_states`` False: the head reads only the cache, and the candidate pass is skipped."""

    needs_states: ClassVar[bool]

    def __call__(
        self, model: HSTU, cache: HistoryCache, candidates: Tensor, states: Tensor | None
    ) -> dict[str, Tensor]: ...


def _item_vectors(model: HSTU, candidates: Tensor) -> Tensor:
    """The rows ``model.item_vectors()[candidates]`` without normalising the whole table: [B, M, D]."""
    return l2_normalize(model.input.item_embedding(candidates))


@dataclass(frozen=True)
class TargetDotHead:
    """score = cos(candidate's own output state, candidate's item vector) / temperature."""

    temperature: float = 0.05
    task: str = "score"
    needs_states: ClassVar[bool] = True

    def __call__(
        self, model: HSTU, cache: HistoryCache, candidates: Tensor, states: Tensor | None
    ) -> dict[str, Tensor]:
        assert states is not None, "TargetDotHead needs the candidate states"
        items = _item_vectors(model, candidates)  # [B, M, D]
        return {self.task: (states * items).sum(-1) / self.temperature}


@dataclass(frozen=True)
class UserDotHead:
    """score = cos(history user vector, candidate's item vector) / temperature (ignores candidate states)."""

    temperature: float = 0.05
    task: str = "score"
    needs_states: ClassVar[bool] = False

    def __call__(
        self, model: HSTU, cache: HistoryCache, candidates: Tensor, states: Tensor | None
    ) -> dict[str, Tensor]:
        return self.from_user(model, cache.user, candidates)

    def from_user(self, model: HSTU, user: Tensor, candidates: Tensor) -> dict[str, Tensor]:
        """The same scores from the user vector alone ([B, D], ``encode_user``)."""
        items = _item_vectors(model, candidates)  # [B, M, D]
        return {self.task: torch.einsum("bd,bmd->bm", user, items) / self.temperature}


class MFalconScorer:
    """Scores candidates for B users: one history encoding per user, candidates in micro-batches."""

    def __init__(self, model: HSTU, head: CandidateHead, micro_batch: int = 256) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.model = model
        self.head = head
        self.micro_batch = micro_batch

    @torch.inference_mode()
    def score(
        self, items: Tensor, ts: Tensor, lengths: Tensor, request_ts: Tensor, candidates: Tensor
    ) -> dict[str, Tensor]:
        """items/ts [B, L] right-padded, lengths [B], request_ts [B], candidates [B, M] (0 = padding)."""
        items, ts, lengths = truncate_history(items, ts, lengths, _max_history(self.model))
        if isinstance(self.head, UserDotHead):  # no candidate pass: the user vector is all it reads
            return self.head.from_user(
                self.model, encode_user(self.model, items, ts, lengths, request_ts), candidates
            )
        cache = encode_history(self.model, items, ts, lengths, request_ts)
        states = (
            candidate_states(self.model, cache, candidates, self.micro_batch)
            if self.head.needs_states
            else None
        )
        return self.head(self.model, cache, candidates, states)
