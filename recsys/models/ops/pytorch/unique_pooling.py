"""PyTorch reference of the unique-id gather/pool: rebuild [B, L, D] (or pool it to [B, D]) from unique rows.

``unique_emb`` [U, D] holds one embedding per distinct id of the batch; ``inverse`` [B, L] int32 says which
row each step uses, -1 at padding. Padding is mapped to an appended zero row U, declared as ``padding_idx``,
so that ``F.embedding`` / ``F.embedding_bag`` (fused CPU and CUDA kernels) do the gather and the pooling, and
their backward is the scatter-add of the step gradients into the unique rows that the Triton kernel
reproduces. The pooled path never materialises [B, L, D].
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

PoolMode = Literal["none", "sum", "mean"]


def unique_gather_reference(
    unique_emb: torch.Tensor, inverse: torch.Tensor, pool: PoolMode = "none"
) -> torch.Tensor:
    """[U, D] + [B, L] int32 -> [B, L, D] (pool="none") or [B, D] (sum / mean over the valid steps).

    Padding steps (inverse < 0) are zero in the gathered output and left out of the pool; the mean divides by
    the number of valid steps (a row without any valid step pools to zeros).
    """
    n_unique, dim = unique_emb.shape
    rows = torch.cat([unique_emb, unique_emb.new_zeros(1, dim)])  # [U + 1, D], row U = padding
    index = torch.where(inverse >= 0, inverse, n_unique).long()  # [B, L]
    if pool == "none":
        return F.embedding(index, rows, padding_idx=n_unique)  # [B, L, D]
    if inverse.shape[1] == 0:  # embedding_bag needs at least one column
        return unique_emb.new_zeros(inverse.shape[0], dim) + 0.0 * unique_emb.sum()
    return F.embedding_bag(index, rows, mode=pool, padding_idx=n_unique)  # [B, D]
