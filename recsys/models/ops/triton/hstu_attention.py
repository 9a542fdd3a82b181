"""Triton kernels for HSTU pointwise attention: forward, and backward for q, k, v and both bias tables.

Same semantics as ``recsys.models.ops.pytorch.hstu_attention`` (its docstring gives the exact bucket, the
candidate positions and the clamping of out-of-range lengths). How the kernels differ from the reference:
- The relative bias is built inside the kernel from the small tables (``pos_weight``, ``ts_weight``, the
  integer bucket thresholds); no [B, N, N] tensor is ever allocated: memory is O(B N H d) plus the tables.
- Right-padded, jagged batches: a program skips every key block that is fully masked (causal, beyond the
  row's length, or another candidate's block), so padding costs only the launch of empty programs.
- The backward recomputes the scores (no softmax, hence no statistics to keep) in two kernels: one walks
  the query blocks of a key block (dK, dV), one the key blocks of a query block (dQ, bias gradients).
- Bias gradients are scatter-adds with atomics into ``_NUM_SLOTS`` copies of each table (summed after),
  so hot entries are not all hit at one address. A tile with neither clamping nor candidates first
  reduces its position gradient along its diagonals (one atomic per diagonal, not per element). Atomics
  make the bias gradients non-deterministic in their last bits.
- fp16/bf16 inputs accumulate in fp32; fp32 inputs use TF32 dots only when
  ``torch.backends.cuda.matmul.allow_tf32`` is on (as torch's own matmuls do).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from recsys.models.ops.pytorch.hstu_attention import time_bucket_thresholds

__all__ = ["triton_hstu_attention"]

_NUM_SLOTS = 16
_GPU_BLOCK = 64
# The interpreter pays per op, not per element: big blocks keep the CPU tests fast.
_INTERPRETER_BLOCK = 64


@triton.jit
def _sequence_bounds(Lengths, NumCandidates, b, n, HAS_CANDIDATES: tl.constexpr):
    """(valid length, history length) of row b, clamped like the reference so no load can go out of bounds."""
    seq_len = tl.minimum(tl.maximum(tl.load(Lengths + b), 0), n).to(tl.int32)
    history = seq_len
    if HAS_CANDIDATES:
        candidates = tl.minimum(tl.maximum(tl.load(NumCandidates + b), 0), seq_len).to(tl.int32)
        history = seq_len - candidates
    return seq_len, history


@triton.jit
def _pos_index(offs_m, offs_n, history, max_pos):
    """Index into pos_weight of each (query, key): candidates all sit at position `history`."""
    pos_m = tl.minimum(offs_m, history)
    pos_n = tl.minimum(offs_n, history)
    rel = pos_n[None, :] - pos_m[:, None]
    rel = tl.minimum(tl.maximum(rel, 1 - max_pos), max_pos - 1)
    return rel + max_pos - 1


@triton.jit
def _time_bucket(query_ts, key_ts, Thresholds, num_buckets):
    """Exact bucket of |query_ts - key_ts|: an fp32 log guess, corrected by one step with the thresholds."""
    gap = tl.maximum(tl.abs(query_ts[:, None] - key_ts[None, :]), 1)
    guess = tl.floor(tl.log(gap.to(tl.float32)) / 0.301).to(tl.int32)
    guess = tl.minimum(tl.maximum(guess, 0), num_buckets - 1)
    lower = tl.load(Thresholds + guess)
    upper = tl.load(Thresholds + guess + 1)
    bucket = guess - (gap < lower).to(tl.int32) + (gap >= upper).to(tl.int32)
    return tl.minimum(tl.maximum(bucket, 0), num_buckets - 1)


@triton.jit
def _tile_scores(
    q,
    k,
    query_ts,
    key_ts,
    offs_m,
    offs_n,
    seq_len,
    history,
    PosWeight,
    TsWeight,
    Thresholds,
    max_pos,
    num_buckets,
    HAS_POS: tl.constexpr,
    HAS_TS: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Scores q k^T + bias of one [BLOCK_M, BLOCK_N] tile, its mask, and the bias indices (for gradients)."""
    scores = tl.dot(q, tl.trans(k), input_precision=PRECISION)
    mask = (
        (offs_n[None, :] <= offs_m[:, None])
        & (offs_m[:, None] < seq_len)
        & (offs_n[None, :] < seq_len)
        & ((offs_n[None, :] < history) | (offs_n[None, :] == offs_m[:, None]))
    )
    pos_idx = 0
    bucket = 0
    if HAS_POS:
        pos_idx = _pos_index(offs_m, offs_n, history, max_pos)
        scores += tl.load(PosWeight + pos_idx, mask=mask, other=0.0).to(tl.float32)
    if HAS_TS:
        bucket = _time_bucket(query_ts, key_ts, Thresholds, num_buckets)
        scores += tl.load(TsWeight + bucket, mask=mask, other=0.0).to(tl.float32)
    return scores, mask, pos_idx, bucket


@triton.jit
def _query_tile_range(start_m, seq_len, history, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key blocks a query block needs: the history blocks up to its last row, then the blocks on its diagonal
    (a candidate row sees only itself past the history). Returns (number of history blocks, first diagonal
    block start, total number of blocks); zero blocks when the query block is all padding."""
    end = tl.minimum(start_m + BLOCK_M, seq_len) * (start_m < seq_len).to(tl.int32)
    history_end = tl.cdiv(tl.minimum(end, history), BLOCK_N) * BLOCK_N
    diag_start = tl.maximum(history_end, (start_m // BLOCK_N) * BLOCK_N)
    num_history = history_end // BLOCK_N
    num_diag = tl.cdiv(tl.maximum(end - diag_start, 0), BLOCK_N)
    return num_history, diag_start, num_history + num_diag


@triton.jit
def _accumulate_pos_grad(
    DPos,
    ds,
    pos_idx,
    mask,
    start_m,
    start_n,
    seq_len,
    history,
    max_pos,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Scatter-add the tile's dS into the position-table gradient."""
    no_clamp = start_m + BLOCK_M - 1 - start_n <= max_pos - 1
    no_candidate_rows = (start_m + BLOCK_M <= history) | (history == seq_len)
    if no_clamp & no_candidate_rows:
        # Index = j - i + const is constant along each diagonal: skew the tile so diagonals become columns.
        rows = tl.arange(0, BLOCK_M)
        diags = tl.arange(0, BLOCK_W)
        cols = diags[None, :] - (BLOCK_M - 1) + rows[:, None]  # [BLOCK_M, BLOCK_W]
        skew = tl.gather(ds, tl.minimum(tl.maximum(cols, 0), BLOCK_N - 1), axis=1)
        per_diag = tl.sum(tl.where((cols >= 0) & (cols < BLOCK_N), skew, 0.0), axis=0)  # [BLOCK_W]
        idx = start_n - start_m - (BLOCK_M - 1) + diags + max_pos - 1
        ok = (diags < BLOCK_M + BLOCK_N - 1) & (idx >= 0) & (idx < 2 * max_pos - 1)
        tl.atomic_add(DPos + idx, per_diag, mask=ok, sem="relaxed")
    else:
        tl.atomic_add(DPos + pos_idx, ds, mask=mask, sem="relaxed")


@triton.jit
def _hstu_fwd_kernel(
    Q,
    K,
    V,
    Out,
    Lengths,
    NumCandidates,
    PosWeight,
    TsWeight,
    QueryTs,
    KeyTs,
    Thresholds,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_on,
    stride_oh,
    stride_od,
    stride_qtb,
    stride_qtn,
    stride_ktb,
    stride_ktn,
    n,
    heads,
    dim_qk,
    dim_v,
    max_pos,
    num_buckets,
    inv_normalizer,
    HAS_POS: tl.constexpr,
    HAS_TS: tl.constexpr,
    HAS_CANDIDATES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    seq_len, history = _sequence_bounds(Lengths, NumCandidates, b, n, HAS_CANDIDATES)

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_dqk[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_dqk[None, :] < dim_qk),
        other=0.0,
    )  # [BLOCK_M, BLOCK_DQK]
    query_ts = 0
    if HAS_TS:
        query_ts = tl.load(QueryTs + b * stride_qtb + offs_m * stride_qtn, mask=row_ok, other=0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    num_history, diag_start, num_tiles = _query_tile_range(start_m, seq_len, history, BLOCK_M, BLOCK_N)
    for t in range(0, num_tiles):
        start_n = tl.where(t < num_history, t * BLOCK_N, diag_start + (t - num_history) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
            mask=col_ok[:, None] & (offs_dqk[None, :] < dim_qk),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DQK]
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & (offs_dv[None, :] < dim_v),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        key_ts = 0
        if HAS_TS:
            key_ts = tl.load(KeyTs + b * stride_ktb + offs_n * stride_ktn, mask=col_ok, other=0)
        scores, mask, _, _ = _tile_scores(
            q,
            k,
            query_ts,
            key_ts,
            offs_m,
            offs_n,
            seq_len,
            history,
            PosWeight,
            TsWeight,
            Thresholds,
            max_pos,
            num_buckets,
            HAS_POS,
            HAS_TS,
            PRECISION,
        )
        attn = tl.where(mask, scores * tl.sigmoid(scores) * inv_normalizer, 0.0)  # [BLOCK_M, BLOCK_N]
        acc += tl.dot(attn.to(v.dtype), v, input_precision=PRECISION)

    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
        acc.to(Out.dtype.element_ty),
        mask=(offs_m[:, None] < n) & (offs_dv[None, :] < dim_v),
    )


@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DOut,
    DK,
    DV,
    Lengths,
    NumCandidates,
    PosWeight,
    TsWeight,
    QueryTs,
    KeyTs,
    Thresholds,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dkn,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvn,
    stride_dvh,
    stride_dvd,
    stride_qtb,
    stride_qtn,
    stride_ktb,
    stride_ktn,
    n,
    heads,
    dim_qk,
    dim_v,
    max_pos,
    num_buckets,
    inv_normalizer,
    HAS_POS: tl.constexpr,
    HAS_TS: tl.constexpr,
    HAS_CANDIDATES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    seq_len, history = _sequence_bounds(Lengths, NumCandidates, b, n, HAS_CANDIDATES)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < seq_len
    k = tl.load(
        K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
        mask=col_ok[:, None] & (offs_dqk[None, :] < dim_qk),
        other=0.0,
    )  # [BLOCK_N, BLOCK_DQK]
    v = tl.load(
        V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
        mask=col_ok[:, None] & (offs_dv[None, :] < dim_v),
        other=0.0,
    )  # [BLOCK_N, BLOCK_DV]
    key_ts = 0
    if HAS_TS:
        key_ts = tl.load(KeyTs + b * stride_ktb + offs_n * stride_ktn, mask=col_ok, other=0)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DOut + b * stride_dob + h * stride_doh

    dk = tl.zeros((BLOCK_N, BLOCK_DQK), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    # History keys are seen by every later query; a block of candidate keys only by its diagonal's queries.
    begin = (start_n // BLOCK_M) * BLOCK_M
    end = tl.where(start_n < history, seq_len, tl.minimum(start_n + BLOCK_N, seq_len))
    end = end * (start_n < seq_len).to(tl.int32)
    for start_m in range(begin, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < seq_len
        q = tl.load(
            q_base + offs_m[:, None] * stride_qn + offs_dqk[None, :] * stride_qd,
            mask=row_ok[:, None] & (offs_dqk[None, :] < dim_qk),
            other=0.0,
        )  # [BLOCK_M, BLOCK_DQK]
        do = tl.load(
            do_base + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
            mask=row_ok[:, None] & (offs_dv[None, :] < dim_v),
            other=0.0,
        )  # [BLOCK_M, BLOCK_DV]
        query_ts = 0
        if HAS_TS:
            query_ts = tl.load(QueryTs + b * stride_qtb + offs_m * stride_qtn, mask=row_ok, other=0)
        scores, mask, _, _ = _tile_scores(
            q,
            k,
            query_ts,
            key_ts,
            offs_m,
            offs_n,
            seq_len,
            history,
            PosWeight,
            TsWeight,
            Thresholds,
            max_pos,
            num_buckets,
            HAS_POS,
            HAS_TS,
            PRECISION,
        )
        sig = tl.sigmoid(scores)
        attn = tl.where(mask, scores * sig * inv_normalizer, 0.0)  # [BLOCK_M, BLOCK_N]
        dv += tl.dot(tl.trans(attn).to(do.dtype), do, input_precision=PRECISION)
        d_attn = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = tl.where(mask, d_attn * sig * (1.0 + scores * (1.0 - sig)) * inv_normalizer, 0.0)
        dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PRECISION)

    out_rows = offs_n[:, None] < n
    tl.store(
        DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_dqk[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=out_rows & (offs_dqk[None, :] < dim_qk),
    )
    tl.store(
        DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=out_rows & (offs_dv[None, :] < dim_v),
    )


@triton.jit
def _hstu_bwd_dq_kernel(
    Q,
    K,
    V,
    DOut,
    DQ,
    DPos,
    DTs,
    Lengths,
    NumCandidates,
    PosWeight,
    TsWeight,
    QueryTs,
    KeyTs,
    Thresholds,
    stride_qb,
    stride_qn,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kn,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vn,
    stride_vh,
    stride_vd,
    stride_dob,
    stride_don,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqn,
    stride_dqh,
    stride_dqd,
    stride_qtb,
    stride_qtn,
    stride_ktb,
    stride_ktn,
    n,
    heads,
    dim_qk,
    dim_v,
    max_pos,
    num_buckets,
    num_slots,
    inv_normalizer,
    HAS_POS: tl.constexpr,
    HAS_TS: tl.constexpr,
    HAS_CANDIDATES: tl.constexpr,
    COMPUTE_DQ: tl.constexpr,
    COMPUTE_DPOS: tl.constexpr,
    COMPUTE_DTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_W: tl.constexpr,
    BLOCK_DQK: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // heads).to(tl.int64)
    h = (pid_bh % heads).to(tl.int64)
    seq_len, history = _sequence_bounds(Lengths, NumCandidates, b, n, HAS_CANDIDATES)
    slot = pid_bh % num_slots
    dpos_base = DPos + slot * (2 * max_pos - 1)
    dts_base = DTs + slot * num_buckets

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seq_len
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_dqk[None, :] * stride_qd,
        mask=row_ok[:, None] & (offs_dqk[None, :] < dim_qk),
        other=0.0,
    )  # [BLOCK_M, BLOCK_DQK]
    do = tl.load(
        DOut + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_dv[None, :] * stride_dod,
        mask=row_ok[:, None] & (offs_dv[None, :] < dim_v),
        other=0.0,
    )  # [BLOCK_M, BLOCK_DV]
    query_ts = 0
    if HAS_TS:
        query_ts = tl.load(QueryTs + b * stride_qtb + offs_m * stride_qtn, mask=row_ok, other=0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    dq = tl.zeros((BLOCK_M, BLOCK_DQK), dtype=tl.float32)
    num_history, diag_start, num_tiles = _query_tile_range(start_m, seq_len, history, BLOCK_M, BLOCK_N)
    for t in range(0, num_tiles):
        start_n = tl.where(t < num_history, t * BLOCK_N, diag_start + (t - num_history) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < seq_len
        k = tl.load(
            k_base + offs_n[:, None] * stride_kn + offs_dqk[None, :] * stride_kd,
            mask=col_ok[:, None] & (offs_dqk[None, :] < dim_qk),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DQK]
        v = tl.load(
            v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            mask=col_ok[:, None] & (offs_dv[None, :] < dim_v),
            other=0.0,
        )  # [BLOCK_N, BLOCK_DV]
        key_ts = 0
        if HAS_TS:
            key_ts = tl.load(KeyTs + b * stride_ktb + offs_n * stride_ktn, mask=col_ok, other=0)
        scores, mask, pos_idx, bucket = _tile_scores(
            q,
            k,
            query_ts,
            key_ts,
            offs_m,
            offs_n,
            seq_len,
            history,
            PosWeight,
            TsWeight,
            Thresholds,
            max_pos,
            num_buckets,
            HAS_POS,
            HAS_TS,
            PRECISION,
        )
        sig = tl.sigmoid(scores)
        d_attn = tl.dot(do, tl.trans(v), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
        ds = tl.where(mask, d_attn * sig * (1.0 + scores * (1.0 - sig)) * inv_normalizer, 0.0)
        if COMPUTE_DQ:
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if COMPUTE_DPOS:
            _accumulate_pos_grad(
                dpos_base,
                ds,
                pos_idx,
                mask,
                start_m,
                start_n,
                seq_len,
                history,
                max_pos,
                BLOCK_M,
                BLOCK_N,
                BLOCK_W,
            )
        if COMPUTE_DTS:
            tl.atomic_add(dts_base + bucket, ds, mask=mask, sem="relaxed")

    if COMPUTE_DQ:
        tl.store(
            DQ
            + b * stride_dqb
            + h * stride_dqh
            + offs_m[:, None] * stride_dqn
            + offs_dqk[None, :] * stride_dqd,
            dq.to(DQ.dtype.element_ty),
            mask=(offs_m[:, None] < n) & (offs_dqk[None, :] < dim_qk),
        )


def _is_interpreted() -> bool:
    """True when the kernels were decorated under TRITON_INTERPRET=1 (they then run on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_hstu_fwd_kernel, InterpretedFunction)


def _aligned(t: Tensor) -> Tensor:
    """``t`` itself when contiguous with a 16-byte aligned base, else a contiguous copy.

    q/k/v usually arrive as slices of one fused projection (HSTU's split of x @ W_uvqk): their rows are
    strided and their base is offset into the buffer, which keeps Triton from vectorising the tile loads.
    The copy costs O(B N H d), a small fraction of the attention's O(B N^2 H d)."""
    return t if t.is_contiguous() and t.data_ptr() % 16 == 0 else t.contiguous()


def _dot_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs every dimension >= 16


def _precision(q: Tensor) -> str:
    use_tf32 = q.dtype == torch.float32 and q.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return "tf32" if use_tf32 else "ieee"


def _ts_strides(ts: Tensor | None) -> tuple[int, int]:
    return (ts.stride(0), ts.stride(1)) if ts is not None else (0, 0)


def _grads(
    dq: Tensor | None,
    dk: Tensor | None,
    dv: Tensor | None,
    dpos: Tensor | None,
    dts: Tensor | None,
    pos_weight: Tensor | None,
    ts_weight: Tensor | None,
    need_k: bool,
    need_v: bool,
) -> tuple[Tensor | None, ...]:
    """Gradients in the order of _HstuAttentionFunction.forward's inputs (slot copies summed, table dtype)."""
    dpos_out = dpos.sum(0).to(pos_weight.dtype) if dpos is not None and pos_weight is not None else None
    dts_out = dts.sum(0).to(ts_weight.dtype) if dts is not None and ts_weight is not None else None
    return (
        dq,
        dk if need_k else None,
        dv if need_v else None,
        None,
        None,
        dpos_out,
        dts_out,
        None,
        None,
        None,
        None,
        None,
    )


class _HstuAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        lengths: Tensor,
        num_candidates: Tensor | None,
        pos_weight: Tensor | None,
        ts_weight: Tensor | None,
        query_ts: Tensor | None,
        key_ts: Tensor | None,
        normalizer: float,
        block_m: int,
        block_n: int,
    ) -> Tensor:
        batch, n, heads, dim_qk = q.shape
        dim_v = v.shape[-1]
        num_buckets = ts_weight.numel() if ts_weight is not None else 1
        thresholds = time_bucket_thresholds(num_buckets, q.device) if ts_weight is not None else None
        out = torch.empty((batch, n, heads, dim_v), dtype=q.dtype, device=q.device)
        ctx.save_for_backward(
            q, k, v, lengths, num_candidates, pos_weight, ts_weight, query_ts, key_ts, thresholds
        )
        ctx.normalizer, ctx.block_m, ctx.block_n = normalizer, block_m, block_n
        if out.numel() == 0:
            return out.zero_()
        unused_ptr = lengths  # any valid pointer for the tensors a constexpr flag switches off
        grid = (triton.cdiv(n, block_m), batch * heads)
        _hstu_fwd_kernel[grid](
            q,
            k,
            v,
            out,
            lengths,
            num_candidates if num_candidates is not None else unused_ptr,
            pos_weight if pos_weight is not None else unused_ptr,
            ts_weight if ts_weight is not None else unused_ptr,
            query_ts if query_ts is not None else unused_ptr,
            key_ts if key_ts is not None else unused_ptr,
            thresholds if thresholds is not None else unused_ptr,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *out.stride(),
            *_ts_strides(query_ts),
            *_ts_strides(key_ts),
            n,
            heads,
            dim_qk,
            dim_v,
            (pos_weight.numel() + 1) // 2 if pos_weight is not None else 1,
            num_buckets,
            1.0 / normalizer,
            HAS_POS=pos_weight is not None,
            HAS_TS=ts_weight is not None,
            HAS_CANDIDATES=num_candidates is not None,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            BLOCK_DQK=_dot_dim(dim_qk),
            BLOCK_DV=_dot_dim(dim_v),
            PRECISION=_precision(q),
        )
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, lengths, num_candidates, pos_weight, ts_weight, query_ts, key_ts, thresholds = (
            ctx.saved_tensors
        )
        need_q, need_k, need_v = ctx.needs_input_grad[0:3]
        need_pos = pos_weight is not None and ctx.needs_input_grad[5]
        need_ts = ts_weight is not None and ctx.needs_input_grad[6]
        batch, n, heads, dim_qk = q.shape
        dim_v = v.shape[-1]
        block_m, block_n = ctx.block_m, ctx.block_n
        max_pos = (pos_weight.numel() + 1) // 2 if pos_weight is not None else 1
        num_buckets = ts_weight.numel() if ts_weight is not None else 1
        # Every row (padding included) is written by the kernels, so no memset is needed.
        dq = torch.empty_like(q) if need_q else None
        dk = torch.empty_like(k) if (need_k or need_v) else None
        dv = torch.empty_like(v) if (need_k or need_v) else None
        dpos = (
            torch.zeros((_NUM_SLOTS, 2 * max_pos - 1), dtype=torch.float32, device=q.device)
            if need_pos
            else None
        )
        dts = (
            torch.zeros((_NUM_SLOTS, num_buckets), dtype=torch.float32, device=q.device) if need_ts else None
        )
        if q.numel() == 0 or grad_out.numel() == 0:
            for grad in (dq, dk, dv):
                if grad is not None:
                    grad.zero_()
            return _grads(dq, dk, dv, dpos, dts, pos_weight, ts_weight, need_k, need_v)

        unused_ptr = lengths
        common = (
            lengths,
            num_candidates if num_candidates is not None else unused_ptr,
            pos_weight if pos_weight is not None else unused_ptr,
            ts_weight if ts_weight is not None else unused_ptr,
            query_ts if query_ts is not None else unused_ptr,
            key_ts if key_ts is not None else unused_ptr,
            thresholds if thresholds is not None else unused_ptr,
        )
        flags = {
            "HAS_POS": pos_weight is not None,
            "HAS_TS": ts_weight is not None,
            "HAS_CANDIDATES": num_candidates is not None,
            "BLOCK_M": block_m,
            "BLOCK_N": block_n,
            "BLOCK_DQK": _dot_dim(dim_qk),
            "BLOCK_DV": _dot_dim(dim_v),
            "PRECISION": _precision(q),
        }
        sizes = (n, heads, dim_qk, dim_v, max_pos, num_buckets)
        if dk is not None and dv is not None:
            _hstu_bwd_dkdv_kernel[(triton.cdiv(n, block_n), batch * heads)](
                q,
                k,
                v,
                grad_out,
                dk,
                dv,
                *common,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *grad_out.stride(),
                *dk.stride(),
                *dv.stride(),
                *_ts_strides(query_ts),
                *_ts_strides(key_ts),
                *sizes,
                1.0 / ctx.normalizer,
                **flags,
            )
        if need_q or need_pos or need_ts:
            _hstu_bwd_dq_kernel[(triton.cdiv(n, block_m), batch * heads)](
                q,
                k,
                v,
                grad_out,
                dq if dq is not None else q,
                dpos if dpos is not None else unused_ptr,
                dts if dts is not None else unused_ptr,
                *common,
                *q.stride(),
                *k.stride(),
                *v.stride(),
                *grad_out.stride(),
                *(dq.stride() if dq is not None else q.stride()),
                *_ts_strides(query_ts),
                *_ts_strides(key_ts),
                *sizes,
                _NUM_SLOTS,
                1.0 / ctx.normalizer,
                COMPUTE_DQ=need_q,
                COMPUTE_DPOS=need_pos,
                COMPUTE_DTS=need_ts,
                BLOCK_W=triton.next_power_of_2(block_m + block_n - 1),
                **flags,
            )
        return _grads(dq, dk, dv, dpos, dts, pos_weight, ts_weight, need_k, need_v)


def triton_hstu_attention(
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
    block_m: int | None = None,
    block_n: int | None = None,
) -> Tensor:
    """HSTU attention with the Triton kernels; inputs as validated by ``recsys.models.ops.hstu_attention``.

    CUDA tensors run compiled; CPU tensors only under TRITON_INTERPRET=1 (set before this module is imported).
    ``block_m`` / ``block_n`` (powers of two >= 16) override the tile sizes (tests of multi-block cases).
    """
    interpreted = _is_interpreted()
    if not q.is_cuda and not interpreted:
        raise RuntimeError(
            "hstu_attention backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before "
            f"models.ops.triton is imported to run on CPU; got tensors on {q.device}"
        )
    default_block = _INTERPRETER_BLOCK if interpreted else _GPU_BLOCK
    block_m = block_m or default_block
    block_n = block_n or default_block
    for name, block in (("block_m", block_m), ("block_n", block_n)):
        if block < 16 or block & (block - 1):
            raise ValueError(f"{name} must be a power of two >= 16, got {block}")
    if interpreted and q.dtype == torch.bfloat16:
        # numpy has no bfloat16 and the interpreter's bf16 dots return garbage: interpret them in fp32.
        out = triton_hstu_attention(
            q.float(),
            k.float(),
            v.float(),
            lengths,
            normalizer=normalizer,
            pos_weight=pos_weight,
            ts_weight=ts_weight,
            query_ts=query_ts,
            key_ts=key_ts,
            num_candidates=num_candidates,
            block_m=block_m,
            block_n=block_n,
        )
        return out.to(torch.bfloat16)
    return _HstuAttentionFunction.apply(
        _aligned(q),
        _aligned(k),
        _aligned(v),
        lengths.contiguous(),
        num_candidates.contiguous() if num_candidates is not None else None,
        pos_weight.contiguous() if pos_weight is not None else None,
        ts_weight.contiguous() if ts_weight is not None else None,
        query_ts,
        key_ts,
        float(normalizer),
        block_m,
        block_n,
    )
