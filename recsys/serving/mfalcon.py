"""M-FALCON for the generative ranker (``models.hstu_ranker.HSTURanker``; spec: models.md, "HSTU as a
generative ranker"), plus the retrieval HSTU's user vector.

Ranker: the m candidates of a request are item tokens appended after the user's history; each attends to the
whole history and to itself only (never to another candidate), all take the position right after the history
and the request time (their time bucket is the gap from the last history event to the request). Because no
history token sees a candidate, the history's keys/values of every block are computed once per request
(``HSTURanker.encode``) and the candidates are scored against that cache in micro-batches of
``micro_batch`` (``HSTURanker.target_states``): O((n + m) n) work instead of O(m n^2) for a full forward pass
per candidate (``naive_scores``, the baseline the benchmark and the test compare with). Micro-batching
changes nothing in the result (candidates are independent), only the peak memory.

The history is the user's ``max_len`` most recent events (``truncate``); the candidates' non-sequence
features (user fields, item attributes, context, dense statistics) come from the ranker's featurizer
(``serving.featurize.RankingFeaturizer``), exactly as the feature rankers get theirs (``from_features``).

Retrieval HSTU (``models.hstu.HSTU``): ``encode_user`` gives the user vector at the request time (the last
block evaluated at the last position only); the retrieval score of an item is cos(user, item) / temperature.
The retrieval model has no candidate-scoring head: ranking is the generative ranker's job.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from recsys.models.batch import RankingBatch
from recsys.models.hstu import HSTU
from recsys.models.hstu_ranker import History, HSTURanker, Targets
from recsys.models.ops.pytorch.hstu_attention import time_bucket
from recsys.models.sequential import l2_normalize, valid_mask
from recsys.serving.featurize import UserFeatures

__all__ = [
    "MFalconScorer",
    "encode_user",
    "from_features",
    "history_query_ts",
    "naive_scores",
    "request_targets",
    "truncate",
    "truncate_history",
]


# -- the generative ranker ---------------------------------------------------------------------------------
def truncate(history: History, max_len: int) -> History:
    """Keep each row's ``max_len`` most recent events (right-padded in and out)."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    n = history.items.shape[1]
    if n <= max_len:
        return history
    start = (history.lengths - max_len).clamp(min=0)  # [B]
    index = start[:, None] + torch.arange(max_len, device=history.items.device)[None, :]
    lengths = history.lengths.clamp(max=max_len)
    keep = valid_mask(lengths, max_len)

    def cut(t: Tensor) -> Tensor:
        return t.gather(1, index) * keep

    return History(cut(history.items), {k: cut(v) for k, v in history.side.items()}, cut(history.ts), lengths)


def request_targets(
    history: History,
    items: Tensor,
    request_ts: Tensor,
    sparse: dict[str, Tensor] | None = None,
    dense: Tensor | None = None,
) -> Targets:
    """The candidates of B requests as targets: items [B, M] (0 = padding), all at the end of their row's
    history (limit = its length) and at the request time ``request_ts`` [B]. ``sparse`` {field: [B, M]} and
    ``dense`` [B, M, F] default to zeros (unknown)."""
    b, m = items.shape
    if history.lengths.shape[0] != b:
        raise ValueError(f"candidates have {b} rows but there are {history.lengths.shape[0]} histories")
    if request_ts.shape != (b,):
        raise ValueError(f"request_ts must have shape [{b}], got {list(request_ts.shape)}")
    return Targets(
        items=items,
        sparse=sparse or {},
        dense=dense if dense is not None else torch.zeros(b, m, 0, device=items.device),
        ts=request_ts[:, None].to(torch.int64).expand(b, m),
        limits=history.lengths[:, None].expand(b, m),
    )


class MFalconScorer:
    """Scores candidates for B users: one history encoding per user, candidates in micro-batches."""

    def __init__(self, model: HSTURanker, micro_batch: int = 256) -> None:
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.model = model
        self.micro_batch = micro_batch
        self.tasks = model.config.features.tasks

    @torch.inference_mode()
    def score(self, history: History, candidates: Targets) -> dict[str, Tensor]:
        """{task: [B, M] logits} of the candidates (``request_targets``); padding candidates get 0."""
        model = self.model
        if model.training:
            raise RuntimeError("M-FALCON scores a model in eval mode (dropout off); call model.eval()")
        history = truncate(history, model.max_len)
        candidates = Targets(
            candidates.items,
            candidates.sparse,
            candidates.dense,
            candidates.ts,
            candidates.limits.clamp(max=history.lengths[:, None]),
        )
        cache = model.encode(history)  # once per request: every block's history keys/values
        b, m = candidates.items.shape
        out = {t: torch.zeros(b, m, device=candidates.items.device) for t in self.tasks}
        for start in range(0, m, self.micro_batch):
            chunk = candidates.narrow(start, self.micro_batch)
            logits = model.heads_of(model.target_states(cache, chunk))
            keep = chunk.items > 0
            for t in self.tasks:
                out[t][:, start : start + chunk.items.shape[1]] = torch.where(keep, logits[t].float(), 0.0)
        return out


def naive_scores(
    model: HSTURanker, history: History, candidates: Targets, batch: int = 64
) -> dict[str, Tensor]:
    """The baseline: a full forward pass (``HSTURanker.forward_full``) over [history; candidate] for every
    candidate of every row, ``batch`` candidate sequences per call (each with its own copy of the history)."""
    history = truncate(history, model.max_len)
    b, m = candidates.items.shape
    out = {t: torch.zeros(b, m, device=candidates.items.device) for t in model.config.features.tasks}
    with torch.no_grad():
        for row in range(b):
            for start in range(0, m, batch):
                chunk = candidates.narrow(start, batch)
                c = chunk.items.shape[1]
                single = History(
                    history.items[row : row + 1].expand(c, -1),
                    {k: v[row : row + 1].expand(c, -1) for k, v in history.side.items()},
                    history.ts[row : row + 1].expand(c, -1),
                    history.lengths[row : row + 1].expand(c),
                )
                per = Targets(
                    chunk.items[row][:, None],
                    {k: v[row][:, None] for k, v in chunk.sparse.items()},
                    chunk.dense[row][:, None, :],
                    chunk.ts[row][:, None],
                    chunk.limits[row].clamp(max=history.lengths[row])[:, None],
                )
                logits = model.forward_full(single, per)
                for t in out:
                    scores = torch.where(per.items[:, 0] > 0, logits[t][:, 0].float(), 0.0)
                    out[t][row, start : start + c] = scores
    return out


def from_features(
    users: Sequence[UserFeatures], candidates: Sequence[np.ndarray], batch: RankingBatch
) -> tuple[History, Targets]:
    """M-FALCON inputs from the featurizer: each user's history window (``UserFeatures``: the ranker's
    ``max_len`` most recent known events, gaps before the request) and its candidates' features, read off
    ``batch`` = ``featurizer.batch(users, candidates)`` (rows: every candidate of every user, in order).
    Times are relative to the request (the request is at 0, event j at -gap_j)."""
    b = len(users)
    counts = np.array([len(c) for c in candidates], dtype=np.int64)
    n = max(1, max((u.items.size for u in users), default=0))
    m = max(1, int(counts.max()) if b else 1)
    items = np.zeros((b, n), dtype=np.int64)
    ts = np.zeros((b, n), dtype=np.int64)
    names = list(users[0].side) if b else []
    side = {s: np.zeros((b, n), dtype=np.int64) for s in names}
    lengths = np.zeros(b, dtype=np.int64)
    for r, u in enumerate(users):
        k = u.items.size
        items[r, :k], ts[r, :k], lengths[r] = u.items, -u.gaps, k
        for s in names:
            side[s][r, :k] = u.side[s]
    history = History(
        torch.from_numpy(items),
        {s: torch.from_numpy(v) for s, v in side.items()},
        torch.from_numpy(ts),
        torch.from_numpy(lengths),
    )
    rows = np.repeat(np.arange(b), counts)
    cols = np.concatenate([np.arange(c) for c in counts]) if b else np.zeros(0, dtype=np.int64)
    r_t, c_t = torch.from_numpy(rows), torch.from_numpy(cols)

    def grid(values: Tensor) -> Tensor:
        out = values.new_zeros((b, m, *values.shape[1:]))
        out[r_t, c_t] = values
        return out

    cand = grid(batch.item_id)
    targets = request_targets(
        history,
        cand,
        torch.zeros(b, dtype=torch.int64),
        sparse={k: grid(v) for k, v in batch.sparse.items()},
        dense=grid(batch.dense),
    )
    return history, targets


# -- the retrieval HSTU: the user vector at the request time ------------------------------------------------
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


def encode_user(model: HSTU, items: Tensor, ts: Tensor, lengths: Tensor, request_ts: Tensor) -> Tensor:
    """[B, D] the user vector of a retrieval HSTU at the request time (L2-normalised where the model is):
    its output at the last history position (query time = the request time). Every block but the last runs
    over the whole history; the last block is evaluated at that one position only: O(L) instead of O(L^2). A
    history of length 0 gives the zero vector. items/ts [B, L] right-padded (L <= max_len), lengths [B],
    request_ts [B]."""
    c = model.config
    b, n = items.shape
    if n > c.max_len:
        raise ValueError(f"history has {n} positions but the model's max_len is {c.max_len}")
    rows = torch.arange(b, device=items.device)
    keep = valid_mask(lengths, n)  # [B, N]
    last = (lengths - 1).clamp(min=0)  # [B]
    query_ts = history_query_ts(ts, lengths, request_ts)
    x = model.input(items, lengths)  # [B, N, D]
    *inner, final = model.blocks
    if inner:
        index = model.attention_index(lengths, ts, query_ts)  # shared by the inner blocks
        for block in inner:
            x = block(x, lengths, ts, query_ts, index=index)
    # The last block at the last position: query `last` sees keys 0..last (causal, within the length).
    x_n = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    u, v, q, k = torch.split(F.silu(x_n @ final.uvqk), final.split_sizes, dim=-1)
    v = v.reshape(b, n, c.num_heads, c.dv)
    q = q.reshape(b, n, c.num_heads, c.dqk)
    k = k.reshape(b, n, c.num_heads, c.dqk)
    scores = torch.einsum("bhd,bjhd->bhj", q[rows, last], k)  # [B, H, N]
    max_pos = c.max_len
    key_idx = torch.arange(n, device=items.device)
    rel = (key_idx[None, :] - last[:, None]).clamp(-(max_pos - 1), max_pos - 1) + max_pos - 1  # [B, N]
    bias = final.pos_weight[rel]
    if final.ts_weight is not None:
        gap = query_ts[rows, last][:, None] - ts  # [B, N]
        bias = bias + final.ts_weight[time_bucket(gap, final.ts_weight.numel())]
    seen = (key_idx[None, :] <= last[:, None]) & keep  # [B, N]
    attn = torch.where(seen[:, None, :], F.silu(scores + bias[:, None, :]) / float(c.max_len), 0.0)
    out = torch.einsum("bhj,bjhd->bhd", attn, v).reshape(b, -1)  # [B, H*dv]
    y = u[rows, last] * F.layer_norm(out, (out.shape[-1],), eps=1e-6)
    y = x[rows, last] + final.output(F.dropout(y, p=c.dropout, training=final.training))  # [B, D]
    return l2_normalize(y) * (lengths > 0).unsqueeze(-1).to(y.dtype)
