"""Pure-PyTorch reference of HSTU pointwise attention (spec: models.md, HSTU, steps 3-4).

It materialises the [B, H, N, N] scores: the readable definition and the CPU path, not the fast one. Inputs
are assumed validated by the dispatcher (``models.ops.hstu_attention``).

Choices the spec leaves open, and what this op does (the Triton kernel does exactly the same):
- Time bucket: ``floor(ln(max(|gap|, 1)) / 0.301)`` clamped to ``[0, num_buckets - 1]`` is evaluated
  exactly, as "largest k with gap >= ceil(e^(0.301 k))" against an integer threshold table. The float32
  formula has no single answer: numpy's and torch's float32 ``log`` put 33 of the first 2^27 integer gaps
  in different buckets, so two implementations of it cannot agree at every bucket boundary.
- M-FALCON candidates share one position: positions are ``min(i, history_length)``, so every candidate
  sits at the position right after the history and scores do not depend on how candidates are batched.
- Out-of-range ``lengths`` / ``num_candidates`` are clamped to ``[0, N]`` / ``[0, length]`` (the
  dispatcher rejects them on CPU; on CUDA a check would cost a host sync per call).
"""

from __future__ import annotations

from decimal import Decimal, localcontext
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["hstu_attention_reference", "time_bucket", "time_bucket_thresholds"]

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


def time_bucket_thresholds(num_buckets: int, device: torch.device | str = "cpu") -> Tensor:
    """[num_buckets + 1] int64: entry k = ceil(e^(0.301 k)), the first gap of bucket >= k; last int64 max."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return _thresholds_cpu(num_buckets).to(device)


def time_bucket(gap_seconds: Tensor, num_buckets: int) -> Tensor:
    """Bucket of a gap in seconds: clamp(floor(ln(max(|gap|, 1)) / 0.301), 0, num_buckets - 1), exactly."""
    thresholds = time_bucket_thresholds(num_buckets, gap_seconds.device)
    gap = gap_seconds.to(torch.int64).abs().clamp(min=1)
    # The number of thresholds 1..num_buckets-1 that are <= gap; thresholds[0] == 1 <= every gap.
    return torch.bucketize(gap, thresholds[1:num_buckets], right=True)


def _positions(history: Tensor, n: int) -> Tensor:
    """[B, N] position of each token for the relative bias: candidates all take the first candidate slot."""
    arange = torch.arange(n, device=history.device)
    return torch.minimum(arange[None, :], history[:, None])


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
) -> Tensor:
    """out[b, i] = sum over allowed j of SiLU(q_i . k_j + bias(i, j)) / normalizer * v_j."""
    batch, n, _, _ = q.shape
    compute_dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
    lengths = lengths.to(torch.int64).clamp(0, n)  # [B]
    if num_candidates is None:
        history = lengths
    else:
        history = lengths - torch.minimum(num_candidates.to(torch.int64).clamp(min=0), lengths)  # [B]

    arange = torch.arange(n, device=q.device)
    query_idx, key_idx = arange[:, None], arange[None, :]  # [N, 1], [1, N]
    allowed = (
        (key_idx <= query_idx)
        & (query_idx < lengths[:, None, None])
        & (key_idx < lengths[:, None, None])
        # A candidate (position >= history) sees the history and itself, never another candidate.
        & ((key_idx < history[:, None, None]) | (key_idx == query_idx))
    )  # [B, N, N]

    scores = torch.einsum("bihd,bjhd->bhij", q.to(compute_dtype), k.to(compute_dtype))  # [B, H, N, N]
    bias = None
    if pos_weight is not None:
        max_pos = (pos_weight.numel() + 1) // 2
        pos = _positions(history, n)  # [B, N]
        rel = (pos[:, None, :] - pos[:, :, None]).clamp(-(max_pos - 1), max_pos - 1) + (
            max_pos - 1
        )  # [B, N, N]
        bias = pos_weight.to(compute_dtype)[rel]
    if ts_weight is not None:
        assert query_ts is not None and key_ts is not None
        gap = query_ts[:, :, None] - key_ts[:, None, :]  # [B, N, N]
        ts_bias = ts_weight.to(compute_dtype)[time_bucket(gap, ts_weight.numel())]
        bias = ts_bias if bias is None else bias + ts_bias
    if bias is not None:
        scores = scores + bias[:, None]  # broadcast over heads

    attn = torch.where(allowed[:, None], F.silu(scores) / normalizer, 0.0)  # [B, H, N, N]
    out = torch.einsum("bhij,bjhd->bihd", attn, v.to(compute_dtype))  # [B, N, H, dv]
    return out.to(q.dtype)
