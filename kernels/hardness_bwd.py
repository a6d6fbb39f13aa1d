"""Backward: recompute tiles of S, form dS from the saved log-sum-exps, emit dq and dT.

With P_row = exp(z_row - lse_row[i]) and P_col = exp(z_col - lse_col[j]) (masked entries 0),
the part of dL/dS that flows through the softmaxes is

    dS_ij = s * (P_row_ij * g_row_i + P_col_ij * g_col_j)

minus the positive's term ``pos_i = s * (g_row_i + g_col_i)`` at (i, p_i), subtracted here in
fp32 before dS is rounded to a 16-bit GEMM operand (near P_ii = 1 the difference is small
and would otherwise carry the rounding error of P_ii). Then dq = dS @ T and dT = dS^T @ q,
in chunks of BK embedding columns so that any d fits.

MODE 0: a program owns a row block and walks all column blocks; it owns dq
        (read-modify-write, no atomics) and adds its dT contributions with relaxed fp32
        atomics (``sem="relaxed"``: fire-and-forget reductions without acquire/release
        ordering; nothing reads dT before the kernel ends): 4 GEMM-equivalents in all,
        dT's summation order varies run to run.
MODE 1: as MODE 0 but dq only.
MODE 2: a program owns a column block and walks all row blocks: dT only.
MODE 1 + MODE 2 is the deterministic pair: bitwise reproducible, one extra recompute.

Staggered walk: program p visits its blocks in the order p, p + 1, ... (mod the count)
instead of all starting at block 0, so that at any moment the programs work on different
dT columns (MODE 0: fewer atomics on the same addresses at once) and read different T
tiles. The order is fixed per program, so MODE 1 + 2 stays bitwise reproducible.
"""

import triton
import triton.language as tl

from .tile import ds_of_tile, sim_tile


@triton.jit
def _dS_tile(
    q_ptr, t_ptr, row0, col0, B, NT, N_COL, D, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, sigma_ptr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, HAS_COL: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, SCALED: tl.constexpr,
):
    """dS of one tile, S recomputed from the embeddings (``tile.ds_of_tile``)."""
    S = sim_tile(q_ptr, t_ptr, row0, col0, B, NT, D, BM, BN, BK, UPCAST, PREC)
    return ds_of_tile(
        S, row0, col0, B, NT, N_COL, offset, scale, alpha,
        tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
        row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, sigma_ptr,
        BM, BN, HAS_TID, HAS_QID, HAS_COL, SCALED,
    )


@triton.jit
def hardness_bwd_kernel(
    q_ptr, t_ptr, B, NT, N_COL, D, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr,
    dq_ptr, dt_ptr,
    MODE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, HAS_COL: tl.constexpr,
    UPCAST: tl.constexpr, DS_LOWP: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    n_rb = tl.cdiv(B, BM)
    n_cb = tl.cdiv(NT, BN)
    if MODE == 2:
        loop_n = n_rb
    else:
        loop_n = n_cb
    for it in range(0, loop_n):
        # staggered: program p starts at block p (mod the count), a fixed order per program.
        # Tile coordinates are fresh each iteration (no loop-carried index changes type);
        # "+ pid" makes them int64 like pid
        if MODE == 2:
            rb = (it + pid) % n_rb
            cb = pid
        else:
            rb = pid
            cb = (it + pid) % n_cb
        rl = tl.arange(0, BM)
        cl = tl.arange(0, BN)
        rmask = (rb * BM + rl) < B
        cmask = (cb * BN + cl) < NT
        # 64-bit row bases, 32-bit offsets inside the tile
        q_rows = q_ptr + rb * BM * D
        t_rows = t_ptr + cb * BN * D
        dq_rows = dq_ptr + rb * BM * D
        dt_rows = dt_ptr + cb * BN * D
        dS = _dS_tile(
            q_ptr, t_ptr, rb * BM, cb * BN, B, NT, N_COL, D, offset, scale, alpha,
            tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
            row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, pos_ptr,
            BM, BN, BK, HAS_TID, HAS_QID, HAS_COL, UPCAST, PREC, False,
        )
        if DS_LOWP:
            # tensor-core operands in the input precision (bf16), accumulation in fp32
            dS_op = dS.to(q_ptr.dtype.element_ty)
        else:
            dS_op = dS
        for k0 in range(0, D, BK):
            ks = k0 + tl.arange(0, BK)
            kmask = ks[None, :] < D
            if MODE != 2:
                # dq[rows, ks] += dS @ T[cols, ks]
                t_blk = tl.load(t_rows + cl[:, None] * D + ks[None, :], mask=cmask[:, None] & kmask, other=0.0)
                if not DS_LOWP:
                    t_blk = t_blk.to(tl.float32)
                dq_blk = tl.dot(dS_op, t_blk, input_precision=PREC)
                dq_off = dq_rows + rl[:, None] * D + ks[None, :]
                acc = tl.load(dq_off, mask=rmask[:, None] & kmask, other=0.0)
                tl.store(dq_off, acc + dq_blk, mask=rmask[:, None] & kmask)
            if MODE != 1:
                # dT[cols, ks] += dS^T @ q[rows, ks]
                q_blk = tl.load(q_rows + rl[:, None] * D + ks[None, :], mask=rmask[:, None] & kmask, other=0.0)
                if not DS_LOWP:
                    q_blk = q_blk.to(tl.float32)
                dt_blk = tl.dot(tl.trans(dS_op), q_blk, input_precision=PREC)
                dt_off = dt_rows + cl[:, None] * D + ks[None, :]
                if MODE == 0:
                    # relaxed: only the sum matters, and nothing reads dT until the kernel ends
                    tl.atomic_add(dt_off, dt_blk, mask=cmask[:, None] & kmask, sem="relaxed")
                else:
                    acc = tl.load(dt_off, mask=cmask[:, None] & kmask, other=0.0)
                    tl.store(dt_off, acc + dt_blk, mask=cmask[:, None] & kmask)
        # this program reads its accumulator slots back on the next iteration
        tl.debug_barrier()
