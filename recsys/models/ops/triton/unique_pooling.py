"""Triton kernels of the unique-id gather/pool (same semantics as ``models.ops.pytorch.unique_pooling``).

Forward: each step row reads the unique row its int32 ``inverse`` index names (-1 = padding, read as zeros),
either written out as [B, L, D] or summed/averaged over the valid steps into [B, D] without materialising
[B, L, D]. Backward: the step gradients are scatter-added (fp32 atomics) into the [U, D] unique rows, so each
distinct id receives the sum of the gradients of all its occurrences in the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from recsys.models.ops.pytorch.unique_pooling import PoolMode

_BLOCK_ROWS = 32  # step rows per program in the gather kernels
_BLOCK_STEPS = 32  # steps per loop iteration in the pool kernels
_MAX_BLOCK_DIM = 128  # embedding columns per program


@triton.jit
def _gather_fwd_kernel(emb_ptr, inv_ptr, out_ptr, n_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    idx = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    valid = row_ok & (idx >= 0)
    src = emb_ptr + idx.to(tl.int64)[:, None] * dim + cols[None, :]
    vals = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0.0)
    dst = out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.store(dst, vals, mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _gather_bwd_kernel(
    grad_out_ptr, inv_ptr, grad_emb_ptr, n_rows, dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    col_ok = cols < dim
    idx = tl.load(inv_ptr + rows, mask=row_ok, other=-1)
    valid = (row_ok & (idx >= 0))[:, None] & col_ok[None, :]
    grads = tl.load(grad_out_ptr + rows.to(tl.int64)[:, None] * dim + cols[None, :], mask=valid, other=0.0)
    dst = grad_emb_ptr + idx.to(tl.int64)[:, None] * dim + cols[None, :]
    tl.atomic_add(dst, grads.to(tl.float32), mask=valid)


@triton.jit
def _pool_fwd_kernel(
    emb_ptr,
    inv_ptr,
    out_ptr,
    count_ptr,
    seq_len,
    dim,
    MEAN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    steps = tl.zeros([BLOCK_L], dtype=tl.int32)
    for start in range(0, seq_len, BLOCK_L):
        pos = start + tl.arange(0, BLOCK_L)
        pos_ok = pos < seq_len
        idx = tl.load(inv_ptr + b * seq_len + pos, mask=pos_ok, other=-1)
        valid = pos_ok & (idx >= 0)
        src = emb_ptr + idx.to(tl.int64)[:, None] * dim + cols[None, :]
        vals = tl.load(src, mask=valid[:, None] & col_ok[None, :], other=0.0)
        acc += tl.sum(vals.to(tl.float32), axis=0)
        steps += valid.to(tl.int32)
    count = tl.sum(steps, axis=0)
    if MEAN:
        acc = acc / tl.maximum(count, 1).to(tl.float32)
    tl.store(out_ptr + b * dim + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)
    if pid_d == 0:
        tl.store(count_ptr + b, count)


@triton.jit
def _pool_bwd_kernel(
    grad_out_ptr,
    inv_ptr,
    count_ptr,
    grad_emb_ptr,
    seq_len,
    dim,
    MEAN: tl.constexpr,
    BLOCK_L: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    pos = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    pos_ok = pos < seq_len
    grad = tl.load(grad_out_ptr + b * dim + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BLOCK_D]
    if MEAN:
        grad = grad / tl.maximum(tl.load(count_ptr + b), 1).to(tl.float32)
    idx = tl.load(inv_ptr + b * seq_len + pos, mask=pos_ok, other=-1)
    valid = (pos_ok & (idx >= 0))[:, None] & col_ok[None, :]
    grads = tl.zeros([BLOCK_L, BLOCK_D], dtype=tl.float32) + grad[None, :]
    tl.atomic_add(grad_emb_ptr + idx.to(tl.int64)[:, None] * dim + cols[None, :], grads, mask=valid)


def _block_dim(dim: int) -> int:
    return min(_MAX_BLOCK_DIM, triton.next_power_of_2(max(dim, 1)))


class _UniqueGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, unique_emb: torch.Tensor, inverse: torch.Tensor, pool: PoolMode) -> torch.Tensor:
        unique_emb = unique_emb.contiguous()
        inverse = inverse.contiguous()
        batch, seq_len = inverse.shape
        n_unique, dim = unique_emb.shape
        block_d = _block_dim(dim)
        count = torch.zeros(batch, dtype=torch.int32, device=inverse.device)
        if pool == "none":
            out = unique_emb.new_empty(batch, seq_len, dim)
            n_rows = batch * seq_len
            if n_rows > 0 and dim > 0:
                grid = (triton.cdiv(n_rows, _BLOCK_ROWS), triton.cdiv(dim, block_d))
                _gather_fwd_kernel[grid](
                    unique_emb, inverse, out, n_rows, dim, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d
                )
        else:
            out = unique_emb.new_zeros(batch, dim)
            if batch > 0 and dim > 0:
                grid = (batch, triton.cdiv(dim, block_d))
                _pool_fwd_kernel[grid](
                    unique_emb,
                    inverse,
                    out,
                    count,
                    seq_len,
                    dim,
                    MEAN=pool == "mean",
                    BLOCK_L=_BLOCK_STEPS,
                    BLOCK_D=block_d,
                )
        ctx.save_for_backward(inverse, count)
        ctx.pool = pool
        ctx.n_unique = n_unique
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        inverse, count = ctx.saved_tensors
        batch, seq_len = inverse.shape
        dim = grad_out.shape[-1]
        grad_out = grad_out.contiguous()
        grad_emb = torch.zeros(ctx.n_unique, dim, dtype=torch.float32, device=grad_out.device)
        block_d = _block_dim(dim)
        if ctx.n_unique > 0 and batch * seq_len > 0 and dim > 0:
            if ctx.pool == "none":
                n_rows = batch * seq_len
                grid = (triton.cdiv(n_rows, _BLOCK_ROWS), triton.cdiv(dim, block_d))
                _gather_bwd_kernel[grid](
                    grad_out, inverse, grad_emb, n_rows, dim, BLOCK_R=_BLOCK_ROWS, BLOCK_D=block_d
                )
            else:
                grid = (batch, triton.cdiv(seq_len, _BLOCK_STEPS), triton.cdiv(dim, block_d))
                _pool_bwd_kernel[grid](
                    grad_out,
                    inverse,
                    count,
                    grad_emb,
                    seq_len,
                    dim,
                    MEAN=ctx.pool == "mean",
                    BLOCK_L=_BLOCK_STEPS,
                    BLOCK_D=block_d,
                )
        return grad_emb.to(grad_out.dtype), None, None


def unique_gather_triton(
    unique_emb: torch.Tensor, inverse: torch.Tensor, pool: PoolMode = "none"
) -> torch.Tensor:
    """[U, D] + [B, L] int32 (-1 = padding) -> [B, L, D] (pool="none") or [B, D] (sum/mean of valid steps)."""
    return _UniqueGather.apply(unique_emb, inverse, pool)
