"""HSTU pointwise attention: validates the inputs, then runs the PyTorch reference or the Triton kernel.

``A = SiLU(q k^T + rel_bias) / normalizer`` under a causal mask (diagonal included) limited to each row's
valid prefix; ``out = A v``. No softmax and no 1/sqrt(d) scale (spec: models.md, HSTU, steps 3-4).

Backends: ``"pytorch"`` (the reference, any device), ``"triton"`` (CUDA, or CPU under TRITON_INTERPRET=1)
and ``"auto"`` (Triton when the tensors are on CUDA and Triton imports, else the reference). Nothing here
touches the GPU at import time; the Triton module is imported on first use.

Semantics shared by both backends (OPEN points and what was picked: models.ops.pytorch.hstu_attention):
the time bucket is computed exactly against integer thresholds, M-FALCON candidates share the position
right after the history, and on CUDA out-of-range lengths are clamped, not checked (a check costs a sync).

A model with several blocks builds an ``AttentionIndex`` once per forward (``hstu_attention_index``: the
mask and the position/time-bucket indices, [B, N, N] each) and passes it to every block's call; the
reference then only gathers each block's own tables. The Triton kernels take no index: they compute the
same buckets per tile from the raw timestamps, which the call still passes, and never hold a [B, N, N]
tensor; ``resolve_backend`` tells a model whether building the index is worth it.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from recsys.models.ops.pytorch.hstu_attention import (
    AttentionIndex,
    hstu_attention_index,
    hstu_attention_reference,
)

__all__ = ["AttentionIndex", "Backend", "hstu_attention", "hstu_attention_index", "resolve_backend"]

Backend = Literal["auto", "pytorch", "triton"]
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: Backend, device: torch.device) -> Literal["pytorch", "triton"]:
    """The backend a call with tensors on ``device`` runs: "auto" is Triton on CUDA (if it imports)."""
    if backend not in ("auto", "pytorch", "triton"):
        raise ValueError(f"backend must be 'auto', 'pytorch' or 'triton', got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "pytorch"
    return backend


def _check_int_tensor(name: str, t: Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _check_table(name: str, t: Tensor, device: torch.device) -> None:
    if t.dim() != 1 or t.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D tensor, got shape {list(t.shape)}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}")


def _validate(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lengths: Tensor,
    normalizer: float,
    pos_weight: Tensor | None,
    ts_weight: Tensor | None,
    query_ts: Tensor | None,
    key_ts: Tensor | None,
    num_candidates: Tensor | None,
    index: AttentionIndex | None,
) -> None:
    if q.dim() != 4:
        raise ValueError(f"q must be [B, N, H, dqk], got shape {list(q.shape)}")
    batch, n, heads, dim_qk = q.shape
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {list(q.shape)}, got {list(k.shape)}")
    if v.dim() != 4 or tuple(v.shape[:3]) != (batch, n, heads):
        raise ValueError(f"v must be [B, N, H, dv] = [{batch}, {n}, {heads}, dv], got {list(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if dim_qk == 0 or v.shape[-1] == 0 or heads == 0:
        raise ValueError(f"heads, dqk and dv must be positive, got q {list(q.shape)}, v {list(v.shape)}")
    _check_int_tensor("lengths", lengths, (batch,), q.device)
    if not normalizer > 0:
        raise ValueError(f"normalizer must be > 0, got {normalizer}")
    if pos_weight is not None:
        _check_table("pos_weight", pos_weight, q.device)
        if pos_weight.numel() % 2 == 0:
            raise ValueError(f"pos_weight must have 2 * max_pos - 1 (odd) entries, got {pos_weight.numel()}")
    given = [
        name
        for name, t in (("ts_weight", ts_weight), ("query_ts", query_ts), ("key_ts", key_ts))
        if t is not None
    ]
    if given and len(given) != 3:
        raise ValueError(f"ts_weight, query_ts and key_ts go together; only {', '.join(given)} given")
    if ts_weight is not None and query_ts is not None and key_ts is not None:
        _check_table("ts_weight", ts_weight, q.device)
        _check_int_tensor("query_ts", query_ts, (batch, n), q.device)
        _check_int_tensor("key_ts", key_ts, (batch, n), q.device)
    if num_candidates is not None:
        _check_int_tensor("num_candidates", num_candidates, (batch,), q.device)
    if index is not None:
        index.check(batch, n, pos_weight, ts_weight)
        if index.allowed.device != q.device:
            raise ValueError(f"index is on {index.allowed.device} but q is on {q.device}")
    # Value checks only where they are free: on CUDA each costs a host sync per call (the kernels clamp).
    if q.device.type == "cpu" and batch > 0:
        if bool(((lengths < 0) | (lengths > n)).any()):
            raise ValueError(f"lengths must lie in [0, N={n}], got {lengths.tolist()}")
        if num_candidates is not None and bool(((num_candidates < 0) | (num_candidates > lengths)).any()):
            raise ValueError(
                f"num_candidates must lie in [0, lengths], got {num_candidates.tolist()} "
                f"for lengths {lengths.tolist()}"
            )


def hstu_attention(
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
    backend: Backend = "auto",
) -> Tensor:
    """HSTU pointwise attention over right-padded sequences.

    Args:
        q, k: [B, N, H, dqk]; v: [B, N, H, dv] (same float dtype and device).
        lengths: [B] integer, valid prefix length of each row; rows at padded positions come out zero.
        normalizer: the divisor of SiLU(scores); the spec uses the padded max length N.
        pos_weight: [2 * max_pos - 1] relative-position bias, index (j - i) + max_pos - 1, clamped to it.
        ts_weight: [num_buckets] time bias, bucket clamp(floor(ln(max(|query_ts_i - key_ts_j|, 1)) / 0.301)).
        query_ts: [B, N] integer seconds, the time of the next event for query i; key_ts: [B, N], t_j.
        num_candidates: [B] integer; the last num_candidates[b] valid positions are M-FALCON candidates: each
            attends to the history and to itself, and all of them take the position right after the history.
        index: ``hstu_attention_index`` of the same lengths, timestamps and candidates, shared by the blocks
            of one forward; the reference uses it instead of recomputing the mask and buckets, the Triton
            kernels do not need it (they read the timestamps). None: the reference builds it.
        backend: "auto", "pytorch" or "triton".

    Returns:
        [B, N, H, dv] in q's dtype.
    """
    _validate(q, k, v, lengths, normalizer, pos_weight, ts_weight, query_ts, key_ts, num_candidates, index)
    backend = resolve_backend(backend, q.device)
    kwargs = {
        "normalizer": normalizer,
        "pos_weight": pos_weight,
        "ts_weight": ts_weight,
        "query_ts": query_ts,
        "key_ts": key_ts,
        "num_candidates": num_candidates,
    }
    if backend == "pytorch":
        return hstu_attention_reference(q, k, v, lengths, index=index, **kwargs)
    from recsys.models.ops.triton.hstu_attention import triton_hstu_attention

    return triton_hstu_attention(q, k, v, lengths, **kwargs)
