"""Forward of the S-cache and stream paths: statistics of an fp32 S the library GEMM wrote.

S (rows ``row0 .. row_end`` of the strip, ``S_STRIDE`` elements apart, column j of row i at
``s_ptr + (i - row0) * S_STRIDE + j``) was computed by cuBLAS with fp32 output; this pass only
reads it once. It is memory-bound: 4 bytes per element in, the statistics out.

Grid (n_rt, GC): program (rt, gc) owns the BM rows of row tile rt and the column tiles gc,
gc + GC, ... . For each tile it

* folds the tile into the row (q->t) online statistics of its rows, kept in registers and
  written once, to ``row_*[gc, rows]`` (GC partials per row);
* reduces the tile's column (t->q) statistics over its BM rows and writes them to
  ``col_*[rt, cols]``: a slot no other program writes, written once (no read-modify-write,
  no barrier, no atomics: deterministic).

Statistics per slot: max ``m``, ``l = sum exp(z - m)`` and, for a learnable scale,
``e = sum exp(z - m) * S``. The host merges the partials (O((B + N) * (GC + n_rt)) floats).
Logits and masks are those of ``tile.tile_logits``: the same formula as every other kernel.
"""

import triton
import triton.language as tl

from .tile import tile_logits


@triton.jit
def _tile_stats(z, S, AXIS: tl.constexpr, NEED_E: tl.constexpr):
    """(max, sum exp(z - max), sum exp(z - max) * S) of a tile along AXIS; an all -inf line
    gives (-inf, 0, 0), never NaN."""
    m = tl.max(z, axis=AXIS)
    shift = tl.where(m == float("-inf"), 0.0, m)
    if AXIS == 1:
        p = tl.exp(z - shift[:, None])
    else:
        p = tl.exp(z - shift[None, :])
    l = tl.sum(p, axis=AXIS)
    e = l
    if NEED_E:
        e = tl.sum(p * S, axis=AXIS)
    return m, l, e


@triton.jit
def hardness_stats_kernel(
    s_ptr, S_STRIDE, row0, row_end, NT, N_COL, offset, scale, alpha,
    tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
    row_m_ptr, row_l_ptr, row_e_ptr, ROW_LD, col_m_ptr, col_l_ptr, col_e_ptr, GC,
    BM: tl.constexpr, BN: tl.constexpr,
    HAS_TID: tl.constexpr, HAS_QID: tl.constexpr, NEED_COL: tl.constexpr, NEED_E: tl.constexpr,
):
    rt = tl.program_id(0).to(tl.int64)
    gc = tl.program_id(1).to(tl.int64)
    n_cb = tl.cdiv(NT, BN)
    r_start = row0 + rt * BM
    rows = r_start + tl.arange(0, BM).to(tl.int64)
    rl = tl.arange(0, BM)
    cl = tl.arange(0, BN)
    rmask = rows < row_end
    s_base = s_ptr + rt * BM * S_STRIDE  # 64-bit base; 32-bit offsets inside the tile
    m_r = tl.full((BM,), float("-inf"), tl.float32)
    l_r = tl.zeros((BM,), tl.float32)
    e_r = tl.zeros((BM,), tl.float32)
    for cb in range(gc, n_cb, GC):
        c_start = cb * BN
        cols = c_start + tl.arange(0, BN).to(tl.int64)
        # rows S_STRIDE apart (a multiple of 64): the column mask against S_STRIDE keeps the loads
        # vectorised for any NT; columns past NT are -inf in tile_logits
        S = tl.load(s_base + rl[:, None] * S_STRIDE + (c_start + cl)[None, :],
                    mask=rmask[:, None] & ((c_start + cl)[None, :] < S_STRIDE), other=0.0)
        z_row, z_col = tile_logits(
            S, rows, cols, row_end, NT, N_COL, offset, scale, alpha,
            tid_pos_ptr, tid_cand_ptr, N_TID, qid_row_ptr, qid_cand_ptr,
            HAS_TID, HAS_QID, NEED_COL,
        )
        # rows: online merge into the running statistics (registers)
        m_t, l_t, e_t = _tile_stats(z_row, S, 1, NEED_E)
        m_new = tl.maximum(m_r, m_t)
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m_r - shift)
        b = tl.exp(m_t - shift)
        l_r = l_r * a + l_t * b
        if NEED_E:
            e_r = e_r * a + e_t * b
        m_r = m_new
        if NEED_COL:
            # columns: this tile's partial over its BM rows, written once to its own slot
            m_c, l_c, e_c = _tile_stats(z_col, S, 0, NEED_E)
            cmask = cols < N_COL
            slot = rt * N_COL + cols
            tl.store(col_m_ptr + slot, m_c, mask=cmask)
            tl.store(col_l_ptr + slot, l_c, mask=cmask)
            if NEED_E:
                tl.store(col_e_ptr + slot, e_c, mask=cmask)
    out = gc * ROW_LD + (rows - row0)
    tl.store(row_m_ptr + out, m_r, mask=rmask)
    tl.store(row_l_ptr + out, l_r, mask=rmask)
    if NEED_E:
        tl.store(row_e_ptr + out, e_r, mask=rmask)
