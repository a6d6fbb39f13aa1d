"""Shared tile arithmetic of the hardness-weighted loss kernels.

Every kernel works on tiles of the similarity strip ``S = q @ T^T`` (BM rows of the
local queries ``q``, BN candidate columns of ``T``): recomputed from the embeddings
(``sim_tile``, the "fused" path) or read from an fp32 S the library GEMM wrote (the cache and
stream paths). ``tile_logits`` masks a tile's logits and ``ds_of_tile`` forms its dS: the one
copy of the formula every kernel uses.

Logits (see README, "The loss"):
    z_ij = (s + alpha) * S_ij   off the positive     # s*S + alpha*sg(S): the hardness weight
    z_ip = s * S_ip             on the positive p_i = offset + i
Row direction (q->t): candidates are all NT columns; a column whose target id equals the
positive's target id is masked out (HAS_TID), the positive itself never.
Column direction (t->q): only the first N_COL columns (the gathered targets, not the hard
negatives); a row whose query id equals the column's positive query id is masked (HAS_QID).
"""

import triton
import triton.language as tl


@triton.jit
def sim_tile(
    q_ptr,
    t_ptr,
    row0,
    col0,
    B,
    NT,
    D,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """S[row0:row0+BM, col0:col0+BN] = q[rows] . T[cols]^T with fp32 accumulation; inputs are
    row-major (stride D). The tile's base pointers carry the 64-bit part of the address; the
    per-element offsets inside the tile are 32-bit (BM * D and BN * D stay far below 2^31),
    which keeps the address arithmetic out of the register budget."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rl = tl.arange(0, BM)
    cl = tl.arange(0, BN)
    rmask = (row0 + rl)[:, None] < B
    cmask = (col0 + cl)[:, None] < NT
    q_base = q_ptr + row0 * D
    t_base = t_ptr + col0 * D
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks[None, :] < D
        a = tl.load(q_base + rl[:, None] * D + ks[None, :], mask=rmask & kmask, other=0.0)
        b = tl.load(t_base + cl[:, None] * D + ks[None, :], mask=cmask & kmask, other=0.0)
        if UPCAST:
            # bf16 arithmetic is wrong under the Triton interpreter: work in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


@triton.jit
def positive_mask(row0, col0, offset, BM: tl.constexpr, BN: tl.constexpr):
    """[i, j] is the positive of its row: col0 + j == row0 + i + offset, compared in 32 bits
    (j - i lies in [-BM, BN], so the 64-bit scalar difference is clamped to that range).
    Cheaper in registers than the 64-bit compare in the backward's epilogue (sm_90 compile:
    the dS kernel's spill goes from 528 to 0 bytes without ids); the forward keeps the
    64-bit form, which compiles better there."""
    delta = row0 + offset - col0
    delta = tl.minimum(tl.maximum(delta, -BM - 1), BN + 1).to(tl.int32)
    return (tl.arange(0, BN)[None, :] - tl.arange(0, BM)[:, None]) == delta


@triton.jit
def tile_logits(
    S,
    rows,
    cols,
    B,
    NT,
    N_COL,
    offset,
    scale,
    alpha,
    tid_pos_ptr,
    tid_cand_ptr,
    N_TID,
    qid_row_ptr,
    qid_cand_ptr,
    HAS_TID: tl.constexpr,
    HAS_QID: tl.constexpr,
    NEED_COL: tl.constexpr,
):
    """Row-direction and column-direction logits of one tile; masked entries are -inf.

    rows = row0 + arange(BM), cols = col0 + arange(BN) (64-bit; used for the 1-D loads and masks).
    Returns (z_row, z_col); z_col is only meaningful when NEED_COL.
    """
    is_pos = cols[None, :] == (rows[:, None] + offset)
    # z = s*S + alpha*sg(S) off the positive, s*S on it
    z = tl.where(is_pos, scale * S, (scale + alpha) * S)
    valid = (rows[:, None] < B) & (cols[None, :] < NT)
    z_row = tl.where(valid, z, float("-inf"))
    if HAS_TID:
        tpos = tl.load(tid_pos_ptr + rows, mask=rows < B, other=0)
        tcand = tl.load(tid_cand_ptr + cols, mask=cols < N_TID, other=0)
        false_neg = (tcand[None, :] == tpos[:, None]) & (cols[None, :] < N_TID) & (~is_pos)
        z_row = tl.where(false_neg, float("-inf"), z_row)
    z_col = z_row
    if NEED_COL:
        z_col = tl.where(valid & (cols[None, :] < N_COL), z, float("-inf"))
        if HAS_QID:
            qrow = tl.load(qid_row_ptr + rows, mask=rows < B, other=0)
            qcand = tl.load(qid_cand_ptr + cols, mask=cols < N_COL, other=0)
            false_neg_c = (qrow[:, None] == qcand[None, :]) & (~is_pos)
            z_col = tl.where(false_neg_c, float("-inf"), z_col)
    return z_row, z_col


@triton.jit
def ds_of_tile(
    S, row0, col0, B, NT, N_COL, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_lse_ptr, col_lse_ptr, g_row_ptr, g_col_ptr, pos_ptr, sigma_ptr,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, HAS_COL: tl.constexpr, SCALED: tl.constexpr,
):
    """dS of one tile of S (fp32, however it was obtained) from the saved log-sum-exps, in fp32,
    the positive's term included; times sigma (loaded from ``sigma_ptr``, a power of two) when
    SCALED, folded into the two scalars/vectors that multiply the tile (exact: a power-of-two
    factor changes no mantissa).

        dS_ij = s * (P_row_ij g_row_i + P_col_ij g_col_j) - [j = p_i] s (g_row_i + g_col_i)
    """
    rows = row0 + tl.arange(0, BM)
    cols = col0 + tl.arange(0, BN)
    z_row, z_col = tile_logits(
        S, rows, cols, B, NT, N_COL, offset, scale, alpha,
        tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
        HAS_TID, HAS_QID, HAS_COL,
    )
    rmask = rows < B
    lse_r = tl.load(row_lse_ptr + rows, mask=rmask, other=0.0)
    g_r = tl.load(g_row_ptr + rows, mask=rmask, other=0.0)
    # dS_ij = s * softmax_row(z)_ij * g_row_i   (q->t part)
    dS = tl.exp(z_row - lse_r[:, None]) * g_r[:, None]
    if HAS_COL:
        cmask = cols < N_COL
        lse_c = tl.load(col_lse_ptr + cols, mask=cmask, other=0.0)
        g_c = tl.load(g_col_ptr + cols, mask=cmask, other=0.0)
        # + s * softmax_col(z)_ij * g_col_j   (t->q part)
        dS += tl.exp(z_col - lse_c[None, :]) * g_c[None, :]
    # the positive's term, in fp32: - s * (g_row_i + g_col_i) at column p_i = offset + i
    pos = tl.load(pos_ptr + rows, mask=rmask, other=0.0)
    is_pos = positive_mask(row0, col0, offset, BM, BN)
    coef = scale
    if SCALED:
        # sigma * dS = (sigma * s) * (...) - sigma * pos_i: sigma folded into a scalar and a BM vector
        sigma = tl.load(sigma_ptr)
        coef = scale * sigma
        pos = pos * sigma
    return dS * coef - tl.where(is_pos, pos[:, None], 0.0)
