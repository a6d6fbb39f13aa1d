"""Backward: write dS for a block of rows, leave dq and dT to two library GEMMs.

The one backward of the Triton backend. (A single-kernel "tile" backward, with dq read,
modified and written per tile and dT by atomics, was removed: with a wide embedding, d = 1536,
a 64-row dq block is 384 KiB of fp32, nothing fits in registers and it moved ~20 FLOP per
byte; measured on an H200 it was 10x slower at d = 1536 and 3x slower at d = 256,
benchmarks/NOTES.md.)

With CACHED, S is not recomputed: the tile is read from an fp32 S the library GEMM wrote in
the forward (S-cache path) or just before this launch (stream path); everything else is the same.

This kernel recomputes one tile of S per program (a plain GEMM tile with the
K loop over d), forms

    dS_ij = s * (P_row_ij * g_row_i + P_col_ij * g_col_j) - [j = p_i] * s * (g_row_i + g_col_i)

in the epilogue (in fp32, positive's term included) and stores it for rows [row0, row_end)
of a strip buffer (R x NT, rows DS_STRIDE elements apart: NT rounded up to a multiple of 64,
so that every row starts 128-byte aligned, the stores are 16-byte vectors for any NT and the
library GEMMs get an aligned leading dimension; the padding columns are written with exact
zeros, so the GEMMs can take DS_STRIDE as their K, a multiple of 64, whatever NT is).
The host then runs ``dq[strip] = dS @ T`` and ``dT += dS^T @ q[strip]`` as library GEMMs
on the ``[:rows, :DS_STRIDE]`` view, T and q padded with zero rows. Memory: the R x DS_STRIDE strip, never more than B x NT
(plus the padding); no atomics, so the result is the same bitwise from run to run.

Strip precision: bf16 for bf16 inputs, fp16 (scaled, below) for fp16 inputs, fp32 for fp32.

fp16 strip, scaled (SCALED). fp16 has the mantissa for dS (unit roundoff 2^-11, bf16's is
2^-8) but not the range: dS ~ s * P * g spans from s * max|g| down to nothing. With P in
[0, 1] every entry obeys

    |dS_ij| <= |s| * (|g_row_i| + |g_col_j|) <= M = |s| * (max|g_row| + max|g_col|)

(the positive's entry too: s * g_row_i * (P_row_ii - 1) + s * g_col_i * (P_col_ii - 1)).
The host picks sigma = 2^(15 - e) for M = m * 2^e, m in [0.5, 1) (``torch.frexp``), so
sigma * M lies in [2^14, 2^15): the largest entry is at most half of fp16's 65504 and the
scaling is exact (a power of two). sigma is a one-element fp32 tensor computed on the
device (no host sync); this kernel stores fp16(sigma * dS), and the host multiplies dq and
dT by 1/sigma once, after all strips (they accumulate in fp32). What is lost:

* entries with |dS_ij| >= 2^-28 * M are normal fp16 numbers after scaling (sigma * M >=
  2^14, fp16's smallest normal is 2^-14): relative error <= 2^-11, as any fp16 operand;
* smaller entries are subnormal or flushed: absolute error <= 2^-25 / sigma <= 2^-39 * M
  each. Summed over a whole row of the GEMM (NT = 2^18 entries) that is <= 2^-21 * M *
  max|T|: far below the fp16 rounding of the large entries of the same row.
* With one upstream gradient for all rows (reduction "mean"/"sum"), M = 2 |s| g and an
  entry is dropped only for P_ij < 2^-38 (a weight of 4e-12).
* With per-row gradients (reduction "none") spanning many decades, sigma is set by the
  largest. A row whose |g_row_i| is 2^-k * max|g| has its own-direction entries
  (s * P_ij * g_row_i) at most ~2^(13-k) after scaling, so the 2^-25 absolute error is
  ~2^(k-38) of that row's largest entry: below fp16's own rounding (2^-11) while k <= 27,
  ~2^-8 (bf16's level) at k = 30 (1e-6 against 1e3). The row's t->q part (s * P_col_ij *
  g_col_j, set by its columns' g) is unaffected, and the gradients as a whole (norm-wise)
  keep fp16 accuracy; ``test_strip_fp16_scaled_wide_upstream`` measures both.

Grid: one program per (row tile, column tile) of the strip, numbered in groups of
GROUP_M row tiles so that neighbouring programs share the T tiles they read (L2 reuse).
"""

import triton
import triton.language as tl

from .tile import ds_of_tile, sim_tile


@triton.jit
def hardness_ds_kernel(
    q_ptr, t_ptr, ds_ptr, DS_STRIDE, row0, row_end, NT, N_COL, D, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, sigma_ptr, s_ptr, S_STRIDE, s_row0,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, HAS_COL: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, SCALED: tl.constexpr, CACHED: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_rt = tl.cdiv(row_end - row0, BM)
    n_ct = tl.cdiv(DS_STRIDE, BN)  # every column of the row stride: the GEMMs read the padding as K
    # grouped order: GROUP_M row tiles walk the column tiles together
    per_group = GROUP_M * n_ct
    group = pid // per_group
    first_rt = group * GROUP_M
    group_rows = tl.minimum(n_rt - first_rt, GROUP_M)
    rt = first_rt + (pid % per_group) % group_rows
    ct = (pid % per_group) // group_rows
    r_start = row0 + rt * BM  # 64-bit scalars; the offsets inside the tile are 32-bit
    c_start = ct * BN
    # rows >= row_end belong to the next strip: row_end plays the part of B in the tile.
    # dS_ij = s * (P_row_ij g_row_i + P_col_ij g_col_j) - [j = p_i] s (g_row_i + g_col_i),
    # times sigma when SCALED (fp16 strip: |sigma * dS_ij| < 2^15, see the module docstring)
    rl = tl.arange(0, BM)
    cl = tl.arange(0, BN)
    if CACHED:
        # S kept (or streamed) in fp32 by the library GEMM: row r at s_ptr + (r - s_row0) * S_STRIDE
        S = tl.load(s_ptr + (r_start - s_row0) * S_STRIDE + rl[:, None] * S_STRIDE + (c_start + cl)[None, :],
                    mask=((r_start + rl)[:, None] < row_end) & ((c_start + cl)[None, :] < S_STRIDE), other=0.0)
    else:
        S = sim_tile(q_ptr, t_ptr, r_start, c_start, row_end, NT, D, BM, BN, BK, UPCAST, PREC)
    dS = ds_of_tile(
        S, r_start, c_start, row_end, NT, N_COL, offset, scale, alpha,
        tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
        row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, sigma_ptr,
        BM, BN, HAS_TID, HAS_QID, HAS_COL, SCALED,
    )
    # rows DS_STRIDE apart (a multiple of 64 elements): aligned, vectorised stores for any NT.
    # The column mask is against DS_STRIDE, not NT: a mask that can change at any column
    # (NT odd) forces scalar stores. Columns NT..DS_STRIDE-1 get dS = 0 (invalid columns:
    # z = -inf, P = 0, g = 0): the library GEMMs take them as K padding (zero rows of T).
    base = ds_ptr + (r_start - row0) * DS_STRIDE + c_start
    mask = ((r_start + rl)[:, None] < row_end) & ((c_start + cl)[None, :] < DS_STRIDE)
    tl.store(base + rl[:, None] * DS_STRIDE + cl[None, :], dS.to(ds_ptr.dtype.element_ty), mask=mask)
