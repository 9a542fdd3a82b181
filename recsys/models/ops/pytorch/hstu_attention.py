"""Pure-PyTorch reference of HSTU pointwise attention (spec: models.md, HSTU, steps 3-4).

It materialises the [B, H, N, N] scores: the readable definition and the CPU path, not the fast one. Inputs
are assumed validated by the dispatcher (``recsys.models.ops.hstu_attention``).

Choices the spec leaves open, and what this op does (the Triton kernel does exactly the same):
- Time bucket: ``floor(ln(max(|gap|, 1)) / 0.301)`` clamped to ``[0, num_buckets - 1]`` is evaluated
  exactly, as "largest k with gap >= ceil(e^(0.301 k))" against an integer threshold table. The float32
  formula has no single answer: numpy's and torch's float32 ``log`` put 33 of the first 2^27 integer gaps
  in different buckets, so two implementations of it cannot agree at every bucket boundary.
- M-FALCON candidates share one position: positions are ``min(i, history_length)``, so every candidate
  sits at the position right after the history and scores do not depend on how candidates are batched.
- Out-of-range ``lengths`` / ``num_candidates`` are clamped to ``[0, N]`` / ``[0, length]`` (the
  dispatcher rejects them on CPU; on CUDA a check would cost a host sync per call).

The mask and the bias-table indices depend only on lengths, candidates and timestamps, never on a block's
weights: ``hstu_attention_index`` computes them once (``AttentionIndex``) and a model with several blocks
passes the same index to every block. Both tables are then read with one gather from their outer sum
``pos_weight[:, None] + ts_weight[None, :]`` ((2P - 1) x 129 entries, tiny), indexed by
``rel * num_buckets + bucket``: the same fp32 additions as two gathers, a third of the [B, N, N] passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal, localcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "AttentionIndex",
    "hstu_attention_index",
    "hstu_attention_reference",
    "time_bucket",
    "time_bucket_thresholds",
]

_BUCKET_STEP = Decimal("0.301")
_INT64_MAX = torch.iinfo(torch.int64).max


@lru_cache(maxsize=16)
def _thresholds_cpu(num_buckets: int) -> Tensor:
    with localcontext() as ctx:
        ctx.prec = 60  # e^(0.301 * 128) ~ 5e16: 60 digits make the ceiling exact
        values = [
            int((_BUCKET_STEP * k).exp().to_integral_value(rounding="ROUND_CEILING"))
            for k in range(num_buckets)
        ]
    return torch.tensor([*values, _INT64_MAX], dtype=torch.int64)


@lru_cache(maxsize=64)
def _thresholds_on(num_buckets: int, device: torch.device) -> Tensor:
    # One host-to-device copy per (size, device) for the process, not one per block of every forward.
    return _thresholds_cpu(num_buckets).to(device)


def time_bucket_thresholds(num_buckets: int, device: torch.device | str = "cpu") -> Tensor:
    """[num_buckets + 1] int64: entry k = ceil(e^(0.301 k)), the first gap of bucket >= k; last int64 max.

    Cached per device: callers must not modify it in place."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _thresholds_on(num_buckets, device)


def time_bucket(gap_seconds: Tensor, num_buckets: int) -> Tensor:
    """Bucket of a gap in seconds: clamp(floor(ln(max(|gap|, 1)) / 0.301), 0, num_buckets - 1), exactly."""
    thresholds = time_bucket_thresholds(num_buckets, gap_seconds.device)
    # The number of thresholds 1..num_buckets-1 that are <= |gap|. No clamp to 1 (a pass over [B, N, N]):
    # thresholds[1] == 2, so gaps 0 and 1 land in bucket 0 either way.
    return torch.bucketize(gap_seconds.to(torch.int64).abs(), thresholds[1:num_buckets], right=True)


def _positions(history: Tensor, n: int) -> Tensor:
    """[B, N] position of each token for the relative bias: candidates all take the first candidate slot."""
    arange = torch.arange(n, device=history.device)
    return torch.minimum(arange[None, :], history[:, None])


@dataclass(frozen=True)
class AttentionIndex:
    """The weight-independent part of HSTU attention over one batch, shared by every block of a forward.

    ``allowed`` [B, N, N] bool: key j is visible to query i (causal, within the row's length, candidates
    see the history and themselves). ``bias_index`` [B, N, N] int64 (None without tables): the flat index
    into the bias table of the (i, j) pair: ``rel * num_buckets + bucket`` with both tables, ``rel`` with the
    position table only, ``bucket`` with the time table only; ``rel = clamp(pos_j - pos_i) + max_pos - 1``.
    ``max_pos`` / ``num_buckets`` (None when that table is absent) say which tables it was built for.
    """

    allowed: Tensor
    bias_index: Tensor | None
    max_pos: int | None
    num_buckets: int | None

    def check(self, batch: int, n: int, pos_weight: Tensor | None, ts_weight: Tensor | None) -> None:
        """Raise a ValueError naming the mismatch when this index does not fit the call's shape or tables."""
        if tuple(self.allowed.shape) != (batch, n, n):
            raise ValueError(
                f"index was built for shape {list(self.allowed.shape)}, the call needs [{batch}, {n}, {n}]"
            )
        max_pos = None if pos_weight is None else (pos_weight.numel() + 1) // 2
        num_buckets = None if ts_weight is None else ts_weight.numel()
        if (self.max_pos, self.num_buckets) != (max_pos, num_buckets):
            raise ValueError(
                f"index was built for max_pos={self.max_pos}, num_buckets={self.num_buckets}; the tables "
                f"given have max_pos={max_pos}, num_buckets={num_buckets}"
            )

    def bias(self, pos_weight: Tensor | None, ts_weight: Tensor | None, dtype: torch.dtype) -> Tensor | None:
        """[B, N, N] pos_weight[rel] + ts_weight[bucket] in ``dtype`` (differentiable in both tables)."""
        if self.bias_index is None:
            return None
        if pos_weight is not None and ts_weight is not None:
            table = pos_weight.to(dtype)[:, None] + ts_weight.to(dtype)[None, :]  # [2P - 1, buckets]
        else:
            table = (pos_weight if pos_weight is not None else ts_weight).to(dtype)  # type: ignore[union-attr]
        # index_select on the flat table: its backward is one index_add_, far cheaper than advanced
        # indexing's accumulate-put on CPU.
        flat = table.reshape(-1).index_select(0, self.bias_index.reshape(-1))
        return flat.view(self.bias_index.shape)


def hstu_attention_index(
    lengths: Tensor,
    n: int,
    *,
    max_pos: int | None = None,
    num_buckets: int | None = None,
    query_ts: Tensor | None = None,
    key_ts: Tensor | None = None,
    num_candidates: Tensor | None = None,
) -> AttentionIndex:
    """Mask and bias indices of a [B, N] batch (see ``AttentionIndex``); pass the result to every block.

    max_pos: the position table has 2 * max_pos - 1 entries (None: no position bias). num_buckets: the
    time table's size (None: no time bias; then query_ts / key_ts [B, N] are not needed).
    """
    if max_pos is not None and max_pos < 1:
        raise ValueError(f"max_pos must be >= 1, got {max_pos}")
    if num_buckets is not None:
        if num_buckets < 1:
            raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
        if query_ts is None or key_ts is None:
            raise ValueError("num_buckets needs query_ts and key_ts (the time bias reads both)")
    lengths = lengths.to(torch.int64).clamp(0, n)  # [B]
    if num_candidates is None:
        history = lengths
    else:
        history = lengths - torch.minimum(num_candidates.to(torch.int64).clamp(min=0), lengths)  # [B]

    arange = torch.arange(n, device=lengths.device)
    query_idx, key_idx = arange[:, None], arange[None, :]  # [N, 1], [1, N]
    allowed = (
        (key_idx <= query_idx)
        & (query_idx < lengths[:, None, None])
        & (key_idx < lengths[:, None, None])
        # A candidate (position >= history) sees the history and itself, never another candidate.
        & ((key_idx < history[:, None, None]) | (key_idx == query_idx))
    )  # [B, N, N]

    index = None
    if max_pos is not None:
        pos = _positions(history, n)  # [B, N]
        index = (pos[:, None, :] - pos[:, :, None]).clamp(-(max_pos - 1), max_pos - 1) + (
            max_pos - 1
        )  # [B, N, N]
    if num_buckets is not None:
        assert query_ts is not None and key_ts is not None
        gap = query_ts[:, :, None] - key_ts[:, None, :]  # [B, N, N]
        bucket = time_bucket(gap, num_buckets)  # [B, N, N]
        index = bucket if index is None else index * num_buckets + bucket
    return AttentionIndex(allowed, index, max_pos, num_buckets)


def hstu_attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    *,
    normalizer: float,
    pos_weight: Tensor | None = None,
    ts_weight: Tensor | None = None,
    query_ts: Tensor | None = None,
    key_ts: Tensor | None = None,
    num_candidates: Tensor | None = None,
    index: AttentionIndex | None = None,
) -> Tensor:
    """out[b, i] = sum over allowed j of SiLU(q_i . k_j + bias(i, j)) / normalizer * v_j.

    ``index`` (from ``hstu_attention_index`` on the same lengths, timestamps and candidates) skips the
    mask and bucket computation; without it the index is built here. With an index, ``query_ts``,
    ``key_ts`` and ``num_candidates`` are not read again.
    """
    batch, n, _, _ = q.shape
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    if index is None:
        index = hstu_attention_index(
            lengths,
            n,
            max_pos=None if pos_weight is None else (pos_weight.numel() + 1) // 2,
            num_buckets=None if ts_weight is None else ts_weight.numel(),
            query_ts=query_ts,
            key_ts=key_ts,
            num_candidates=num_candidates,
        )
    else:
        index.check(batch, n, pos_weight, ts_weight)

    scores = torch.einsum("bihd,bjhd->bhij", q.to(compute_dtype), k.to(compute_dtype))  # [B, H, N, N]
    bias = index.bias(pos_weight, ts_weight, compute_dtype)  # [B, N, N] or None
    if bias is not None:
        scores = scores + bias[:, None]  # broadcast over heads

    attn = torch.where(index.allowed[:, None], F.silu(scores) / normalizer, 0.0)  # [B, H, N, N]
    out = torch.einsum("bhij,bjhd->bihd", attn, v.to(compute_dtype))  # [B, N, H, dv]
    return out.to(q.dtype)
