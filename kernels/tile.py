"""Shared tile arithmetic of the hardness-weighted loss kernels.

Every kernel works on tiles of the similarity strip ``S = q @ T^T`` (BM rows of the
local queries ``q``, BN candidate columns of ``T``). A tile is recomputed from the
embeddings whenever it is needed; S itself is never written to memory.

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
    rows,
    cols,
    B,
    NT,
    D,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
):
    """S[rows, cols] = q[rows] . T[cols]^T with fp32 accumulation; inputs are row-major (stride D)."""
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    rmask = rows[:, None] < B
    cmask = cols[:, None] < NT
    for k0 in range(0, D, BK):
        ks = k0 + tl.arange(0, BK)
        kmask = ks[None, :] < D
        a = tl.load(q_ptr + rows[:, None] * D + ks[None, :], mask=rmask & kmask, other=0.0)
        b = tl.load(t_ptr + cols[:, None] * D + ks[None, :], mask=cmask & kmask, other=0.0)
        if UPCAST:
            # bf16 arithmetic is wrong under the Triton interpreter: work in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PREC)
    return acc


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
