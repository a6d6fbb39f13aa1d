"""Forward: one sweep over the tiles of S giving row and column log-sum-exp partials.

Grid (GR, GC). Program (gr, gc) owns row blocks gr, gr+GR, ... and column blocks gc,
gc+GC, ...; every tile of S is computed exactly once, by exactly one program, and feeds

* the row (q->t) online statistics, kept in registers across the program's column
  blocks and written once per row block to ``row_*[gc, rows]``;
* the column (t->q) statistics, by ``COL_PER_TILE``:

  - False ("program" partials): online statistics read-modified-written in
    ``col_*[gr, cols]``, a slot no other program touches (no atomics, deterministic), each
    tile's update behind a barrier before the next row block reads it back;
  - True ("tile" partials): the tile's own column statistics written once to
    ``col_*[rb, cols]``, nothing read back and no barrier, at the price of B / BM instead of
    GR partial rows (O(N * B / BM) floats: 1/BM of a B x N fp32 S per statistic).

Statistics per slot: running max ``m``, sum ``l = sum exp(z - m)`` and, for the gradient
of a learnable scale, ``e = sum exp(z - m) * S``. The host combines the GC (resp. GR, or
B / BM) partials into log-sum-exps; never a B x N matrix.
"""

import triton
import triton.language as tl

from .tile import sim_tile, tile_logits


@triton.jit
def _online_update(m_old, l_old, e_old, z, S, AXIS: tl.constexpr, NEED_E: tl.constexpr):
    """Fold a tile's logits into running (max, sum-exp, sum-exp*S) along AXIS."""
    m_new = tl.maximum(m_old, tl.max(z, axis=AXIS))
    # an all -inf slot keeps a 0 shift so that exp(-inf - shift) = 0, never NaN
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    if AXIS == 1:
        p = tl.exp(z - shift[:, None])
    else:
        p = tl.exp(z - shift[None, :])
    rescale = tl.exp(m_old - shift)
    l_new = l_old * rescale + tl.sum(p, axis=AXIS)
    e_new = e_old
    if NEED_E:
        e_new = e_old * rescale + tl.sum(p * S, axis=AXIS)
    return m_new, l_new, e_new


@triton.jit
def hardness_fwd_kernel(
    q_ptr,
    t_ptr,
    B,
    NT,
    N_COL,
    D,
    offset,
    scale,
    alpha,
    tid_pos_ptr,
    tid_cand_ptr,
    N_TID,
    qid_row_ptr,
    qid_cand_ptr,
    row_m_ptr,
    row_l_ptr,
    row_e_ptr,
    col_m_ptr,
    col_l_ptr,
    col_e_ptr,
    GR,
    GC,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    HAS_TID: tl.constexpr,
    HAS_QID: tl.constexpr,
    NEED_COL: tl.constexpr,
    NEED_E: tl.constexpr,
    UPCAST: tl.constexpr,
    PREC: tl.constexpr,
    COL_PER_TILE: tl.constexpr,
):
    gr = tl.program_id(0).to(tl.int64)
    gc = tl.program_id(1).to(tl.int64)
    n_rb = tl.cdiv(B, BM)
    n_cb = tl.cdiv(NT, BN)
    for rb in range(gr, n_rb, GR):
        rows = rb * BM + tl.arange(0, BM).to(tl.int64)
        m_r = tl.full((BM,), float("-inf"), tl.float32)
        l_r = tl.zeros((BM,), tl.float32)
        e_r = tl.zeros((BM,), tl.float32)
        for cb in range(gc, n_cb, GC):
            cols = cb * BN + tl.arange(0, BN).to(tl.int64)
            S = sim_tile(q_ptr, t_ptr, rb * BM, cb * BN, B, NT, D, BM, BN, BK, UPCAST, PREC)
            z_row, z_col = tile_logits(
                S, rows, cols, B, NT, N_COL, offset, scale, alpha,
                tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
                HAS_TID, HAS_QID, NEED_COL,
            )
            m_r, l_r, e_r = _online_update(m_r, l_r, e_r, z_row, S, 1, NEED_E)
            if NEED_COL:
                cmask = cols < N_COL
                if COL_PER_TILE:  # this tile's partial, written once: nothing to read back
                    slot = rb * N_COL + cols
                    m_c = tl.full((BN,), float("-inf"), tl.float32)
                    l_c = tl.zeros((BN,), tl.float32)
                    e_c = tl.zeros((BN,), tl.float32)
                else:
                    slot = gr * N_COL + cols
                    m_c = tl.load(col_m_ptr + slot, mask=cmask, other=float("-inf"))
                    l_c = tl.load(col_l_ptr + slot, mask=cmask, other=0.0)
                    e_c = tl.zeros((BN,), tl.float32)
                    if NEED_E:
                        e_c = tl.load(col_e_ptr + slot, mask=cmask, other=0.0)
                m_c, l_c, e_c = _online_update(m_c, l_c, e_c, z_col, S, 0, NEED_E)
                tl.store(col_m_ptr + slot, m_c, mask=cmask)
                tl.store(col_l_ptr + slot, l_c, mask=cmask)
                if NEED_E:
                    tl.store(col_e_ptr + slot, e_c, mask=cmask)
                if not COL_PER_TILE:
                    # the next row block of this program reads these slots back: make the
                    # stores of every thread visible first
                    tl.debug_barrier()
        rmask = rows < B
        tl.store(row_m_ptr + gc * B + rows, m_r, mask=rmask)
        tl.store(row_l_ptr + gc * B + rows, l_r, mask=rmask)
        if NEED_E:
            tl.store(row_e_ptr + gc * B + rows, e_r, mask=rmask)
