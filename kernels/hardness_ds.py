"""Backward, strip variant: write dS for a block of rows, leave dq and dT to two GEMMs.

The tile backward (``hardness_bwd``) keeps the whole backward in one kernel, but with a
wide embedding (d = 1536: a 64-row dq block is 384 KiB of fp32) nothing fits in
registers: every tile re-reads and re-writes its dq rows and adds BN x d atomics, about
24 FLOP per byte moved, far below the ~200 FLOP/byte at which a Hopper GPU stops being
memory-bound.

This kernel instead recomputes one tile of S per program (a plain GEMM tile with the
K loop over d), forms

    dS_ij = s * (P_row_ij * g_row_i + P_col_ij * g_col_j) - [j = p_i] * s * (g_row_i + g_col_i)

in the epilogue (in fp32, positive's term included) and stores it for rows [row0, row_end) of a strip buffer (R x NT, in
bf16 for bf16 inputs, else fp32). The host then runs ``dq[strip] = dS @ T`` and
``dT += dS^T @ q[strip]`` as library GEMMs. Memory: the R x NT strip, never B x NT;
no atomics, so the result is the same bitwise from run to run.

Grid: one program per (row tile, column tile) of the strip, numbered in groups of
GROUP_M row tiles so that neighbouring programs share the T tiles they read (L2 reuse).
"""

import triton
import triton.language as tl

from .hardness_bwd import _dS_tile


@triton.jit
def hardness_ds_kernel(
    q_ptr, t_ptr, ds_ptr, row0, row_end, NT, N_COL, D, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, HAS_COL: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_rt = tl.cdiv(row_end - row0, BM)
    n_ct = tl.cdiv(NT, BN)
    # grouped order: GROUP_M row tiles walk the column tiles together
    per_group = GROUP_M * n_ct
    group = pid // per_group
    first_rt = group * GROUP_M
    group_rows = tl.minimum(n_rt - first_rt, GROUP_M)
    rt = first_rt + (pid % per_group) % group_rows
    ct = (pid % per_group) // group_rows
    r_start = row0 + rt * BM  # 64-bit scalars; the offsets inside the tile are 32-bit
    c_start = ct * BN
    # rows >= row_end belong to the next strip: row_end plays the part of B in the tile
    dS = _dS_tile(
        q_ptr, t_ptr, r_start, c_start, row_end, NT, N_COL, D, offset, scale, alpha,
        tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
        row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr,
        BM, BN, BK, HAS_TID, HAS_QID, HAS_COL, UPCAST, PREC,
    )
    rl = tl.arange(0, BM)
    cl = tl.arange(0, BN)
    base = ds_ptr + (r_start - row0) * NT + c_start
    mask = ((r_start + rl)[:, None] < row_end) & ((c_start + cl)[None, :] < NT)
    tl.store(base + rl[:, None] * NT + cl[None, :], dS.to(ds_ptr.dtype.element_ty), mask=mask)
