"""GPU pooling of unique ids (HyFormer's trick for long sequences): dedup on the host, rebuild on the device.

A batch of B sequences of length L holds B * L ids but far fewer distinct ones (item popularity is Zipf-like:
the HyFormer paper reports 10,000 tokens -> 2,500 unique ids). So:

1. on the host, ``deduplicate(ids)`` -> ``unique`` [U] int64 and ``inverse`` [B, L] int32 (-1 at padding);
2. only ``unique`` and ``inverse`` travel to the device (4 bytes per step instead of 8, plus 8 per unique id);
3. each unique embedding is looked up once: ``table(unique)`` -> [U, D];
4. ``unique_gather(unique_emb, inverse, pool)`` rebuilds [B, L, D] on the device by index, or pools it
   straight to [B, D] (sum or mean over the valid steps) without ever materialising [B, L, D]. The backward
   pass scatter-adds the step gradients into the U rows, so the table's gradient touches U rows, not B * L.

Backends: "pytorch" (the reference, any device), "triton" (the kernel: CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1`` for the parity tests) and "auto" (the default): Triton when the tensors are on CUDA,
the reference otherwise, so everything runs on a CPU-only machine. Triton is imported only when it is used.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

from recsys.models.ops.pytorch.unique_pooling import PoolMode, unique_gather_reference

Backend = Literal["auto", "pytorch", "triton"]
POOL_MODES: tuple[str, ...] = ("none", "sum", "mean")
BACKENDS: tuple[str, ...] = ("auto", "pytorch", "triton")


def deduplicate(ids: torch.Tensor, padding_id: int | None = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Host-side deduplication: ids of any shape -> (unique [U] int64 sorted, inverse of ids' shape, int32).

    ``inverse[...] = i`` means ``ids[...] == unique[i]``; steps equal to ``padding_id`` get -1 and take no
    unique slot (pass ``padding_id=None`` to keep every id).
    """
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be an int32/int64 tensor, got {ids.dtype}")
    flat = ids.reshape(-1)
    keep = flat != padding_id if padding_id is not None else torch.ones_like(flat, dtype=torch.bool)
    unique, inv = torch.unique(flat[keep], sorted=True, return_inverse=True)
    if unique.numel() > torch.iinfo(torch.int32).max:
        raise ValueError(f"{unique.numel()} unique ids do not fit an int32 inverse index")
    inverse = torch.full(flat.shape, -1, dtype=torch.int32, device=ids.device)
    inverse[keep] = inv.to(torch.int32)
    return unique.to(torch.int64), inverse.view(ids.shape)


def _use_triton(device: torch.device, backend: Backend) -> bool:
    if backend == "pytorch":
        return False
    if backend == "auto":
        return device.type == "cuda"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors (got {device.type}) or TRITON_INTERPRET=1 set before import"
        )
    return True


def unique_gather(
    unique_emb: torch.Tensor, inverse: torch.Tensor, pool: PoolMode = "none", backend: Backend = "auto"
) -> torch.Tensor:
    """Rebuild [B, L, D] (pool="none") or pool to [B, D] ("sum" / "mean" over valid steps) from [U, D] rows.

    ``inverse`` [B, L] int32 indexes ``unique_emb``'s rows, -1 marks padding (zeros, left out of the pool; a
    row with no valid step pools to zeros). Differentiable with respect to ``unique_emb``.
    """
    if pool not in POOL_MODES:
        raise ValueError(f"pool must be one of {POOL_MODES}, got {pool!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if unique_emb.dim() != 2:
        raise ValueError(f"unique_emb must be [U, D], got shape {tuple(unique_emb.shape)}")
    if inverse.dim() != 2 or inverse.dtype != torch.int32:
        raise ValueError(f"inverse must be a [B, L] int32 tensor, got {inverse.dtype} {tuple(inverse.shape)}")
    if inverse.device != unique_emb.device:
        raise ValueError(f"inverse is on {inverse.device} but unique_emb on {unique_emb.device}")
    if _use_triton(unique_emb.device, backend):
        from recsys.models.ops.triton.unique_pooling import unique_gather_triton

        return unique_gather_triton(unique_emb, inverse, pool)
    return unique_gather_reference(unique_emb, inverse, pool)
