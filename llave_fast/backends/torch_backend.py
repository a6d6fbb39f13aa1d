"""The chunked pure-PyTorch backend: same algorithm and memory behaviour as the kernels.

The strip ``S = q @ Tc^T`` is processed ``chunk`` rows at a time (chunk x NT temporaries):
forward reduces each chunk once for its rows' log-sum-exp and folds its column statistics
into running per-column ones; backward forms dS per chunk and does dq[chunk] = dS @ Tc and
dTc += dS^T @ q[chunk]. Where S lives follows ``backends.common.plan_s``, as in the Triton
backend: "cache" computes the whole fp32 S once (one library GEMM) and keeps it for the
backward (3 GEMM-equivalents per step, B x NT x 4 bytes held, the eager formula's memory
once); otherwise each chunk is recomputed in the backward (4 GEMM-equivalents, no B x NT).
S is never rounded to 16 bits (``similarity_into``). Runs on any device, any float dtype.
"""

from __future__ import annotations

import torch

from .common import (
    PATH_COUNTS,
    LossConfig,
    SPlan,
    StripIds,
    StripOps,
    StripStats,
    acc_dtype,
    checked_backward,
    hardness_forward,
    new_output,
    plan_s,
    s_cache_budget,
    s_mode_setting,
    sim_operand_dtype,
    similarity_into,
)
from .launch import torch_chunk_elems


def _overrides() -> dict:
    """The ``kernel_config`` override in force (shared with the Triton backend), or {}."""
    from . import triton_backend

    return triton_backend._CONFIG_OVERRIDE or {}


def chunk_rows(B: int, NT: int, device: torch.device | str = "cpu") -> int:
    """Rows per chunk: one chunk x NT temporary holds ``launch.torch_chunk_elems`` elements
    (kernel_config's TORCH_CHUNK_ELEMS, else LLAVE_FAST_TORCH_CHUNK_ELEMS[_CUDA], read now)."""
    elems = torch_chunk_elems(torch.device(device), _overrides().get("TORCH_CHUNK_ELEMS"))
    return max(1, min(B, elems // max(NT, 1)))


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """GEMM operand dtype: the input's on CUDA (tensor cores), fp32/fp64 on the CPU."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return acc_dtype(x.dtype)


def _logits_inplace(S, r0, offset, scale, alpha, out=None):
    """z = s*S + alpha*sg(S) off the positive, s*S on it (positives: a diagonal of the chunk)."""
    diag = S.diagonal(offset + r0).clone()
    z = torch.mul(S, scale + alpha, out=out) if out is not None else S.mul_(scale + alpha)
    z.diagonal(offset + r0).copy_(diag * scale)
    return z


def _row_mask(ids: StripIds, r0: int, r1: int, offset: int):
    """Rows r0..r1: True where a candidate shares the positive's target id (not the positive)."""
    same = ids.tid_cand[None, :] == ids.tid_pos[r0:r1, None]
    same.diagonal(offset + r0).fill_(False)
    return same


def _col_mask(ids: StripIds, r0: int, r1: int, offset: int):
    """Rows r0..r1 x the N columns: True where the row's query id is the column positive's."""
    same = ids.qid_row[r0:r1, None] == ids.qid_cand[None, :]
    same.diagonal(offset + r0).fill_(False)
    return same


def _merge(m_run, l_run, e_run, m_new, l_new, e_new):
    """Merge two (max, sum-exp, sum-exp*S) column statistics."""
    m = torch.maximum(m_run, m_new)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    a, b = torch.exp(m_run - shift), torch.exp(m_new - shift)
    e = None if e_run is None else e_run * a + e_new * b
    return m, l_run * a + l_new * b, e


def s_plan_for(B: int, NT: int, device, dtype: torch.dtype, keep: bool) -> SPlan:
    """The path of this strip: kernel_config's S_MODE / S_CACHE_BYTES (shared with the Triton
    backend), else the environment, else "auto" under an eighth of the device's memory."""
    over = _overrides()
    plan = plan_s(B, NT, keep=keep, mode=s_mode_setting(over.get("S_MODE")),
                  budget=s_cache_budget(device, over.get("S_CACHE_BYTES")), min_rows=1,
                  elem_bytes=torch.empty((), dtype=acc_dtype(dtype)).element_size())
    # the chunked loop is this backend's stream and fused path alike
    return plan if plan.mode == "cache" else SPlan("fused", 0, plan.stride, plan.budget)


def _similarity(q_rows, T_op, acc):
    """An fp32 (fp64) chunk of S, never rounded to 16 bits."""
    return similarity_into(torch.empty((q_rows.shape[0], T_op.shape[0]), device=q_rows.device, dtype=acc),
                           q_rows, T_op)


def strip_forward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e,
                  keep_s: bool = False) -> StripStats:
    B, NT = q.shape[0], Tc.shape[0]
    acc = acc_dtype(q.dtype)
    T_op = Tc.to(sim_operand_dtype(q))
    plan = s_plan_for(B, NT, q.device, q.dtype, keep_s)
    PATH_COUNTS[plan.mode] += 1
    S_all = _similarity(q, T_op, acc) if plan.mode == "cache" else None
    R = chunk_rows(B, NT, q.device)
    row_lse = new_output((B,), q.device, acc)
    row_es = new_output((B,), q.device, acc) if need_e else None
    m_c = torch.full((n_col,), float("-inf"), device=q.device, dtype=acc) if need_col else None
    l_c = torch.zeros(n_col, device=q.device, dtype=acc) if need_col else None
    e_c = torch.zeros(n_col, device=q.device, dtype=acc) if (need_col and need_e) else None
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        S = S_all[r0:r1] if S_all is not None else _similarity(q[r0:r1], T_op, acc)
        # S itself is needed again for the scale's statistics, and kept whole for the backward
        z = _logits_inplace(S, r0, offset, scale, alpha,
                            out=torch.empty_like(S) if (need_e or S_all is not None) else None)
        if need_col:
            # t->q: column statistics of this chunk, folded into the running ones
            zc = z[:, :n_col]
            if ids.has_qid:
                zc = zc.masked_fill(_col_mask(ids, r0, r1, offset), float("-inf"))
            m_new = zc.max(dim=0).values
            shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.sub(zc, shift[None, :], out=torch.empty_like(zc) if zc.data_ptr() == z.data_ptr() else zc)
            p.exp_()
            l_new = p.sum(dim=0)
            e_new = p.mul_(S[:, :n_col]).sum(dim=0) if need_e else None
            del p, zc
            m_c, l_c, e_c = _merge(m_c, l_c, e_c, m_new, l_new, e_new)
        # q->t: row statistics
        if ids.has_tid:
            n_tid = ids.tid_cand.shape[0]
            z[:, :n_tid].masked_fill_(_row_mask(ids, r0, r1, offset), float("-inf"))
        lse = torch.logsumexp(z, dim=1)
        row_lse[r0:r1] = lse
        if need_e:
            row_es[r0:r1] = z.sub_(lse[:, None]).exp_().mul_(S).sum(dim=1)
        del S, z
    col_lse = col_es = None
    if need_col:
        col_lse = m_c + torch.log(l_c)
        if need_e:
            col_es = e_c / l_c
    return StripStats(row_lse, row_es, col_lse, col_es, s_cache=S_all, plan=plan)


def strip_backward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col,
                   pos_coef, deterministic, s_cache=None, s_plan=None):
    # ``deterministic`` changes nothing: bitwise reproducible either way (fixed chunk order, no atomics)
    B, NT = q.shape[0], Tc.shape[0]
    acc = acc_dtype(q.dtype)
    mm = _mm_dtype(q)
    T_op = None if s_cache is not None else Tc.to(sim_operand_dtype(q))
    # fp16's range is too small for dS (s * P * g can be ~1e-9): accumulate its GEMMs in fp32
    ds_mm = mm if mm == torch.bfloat16 else acc
    Tg = Tc.to(ds_mm)
    qg = q.to(ds_mm)
    R = chunk_rows(B, NT, q.device)
    dq = new_output(q.shape, q.device, acc)
    dTc = torch.zeros(Tc.shape, device=q.device, dtype=acc)
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        if s_cache is not None:
            z = _logits_inplace(s_cache[r0:r1], r0, offset, scale, alpha, out=torch.empty_like(s_cache[r0:r1]))
        else:
            z = _logits_inplace(_similarity(q[r0:r1], T_op, acc), r0, offset, scale, alpha)
        p_col = None
        if g_col is not None:
            # s * softmax_col(z)_ij * g_col_j   (t->q part), before the row masks touch z
            p_col = torch.sub(z[:, :n_col], col_lse[None, :])
            if ids.has_qid:
                p_col.masked_fill_(_col_mask(ids, r0, r1, offset), float("-inf"))
            p_col.exp_().mul_(g_col[None, :])
        if ids.has_tid:
            n_tid = ids.tid_cand.shape[0]
            z[:, :n_tid].masked_fill_(_row_mask(ids, r0, r1, offset), float("-inf"))
        # + s * softmax_row(z)_ij * g_row_i   (q->t part), in place: z becomes dS / s
        dS = z.sub_(row_lse[r0:r1, None]).exp_().mul_(g_row[r0:r1, None])
        if p_col is not None:
            dS[:, :n_col].add_(p_col)
            del p_col
        dS.mul_(scale)
        # the positive's term, before any rounding to 16 bits: dS[i, offset + i] -= pos_coef_i
        dS.diagonal(offset + r0).sub_(pos_coef[r0:r1].to(dS.dtype))
        dS = dS.to(ds_mm)
        torch.mm(dS, Tg, out=dq[r0:r1]) if dq.dtype == ds_mm else dq[r0:r1].copy_(dS @ Tg)  # dq = dS @ Tc
        if dTc.dtype == ds_mm:
            dTc.addmm_(dS.t(), qg[r0:r1])  # dTc += dS^T @ q, no N x d temporary
        else:
            dTc.add_(dS.t() @ qg[r0:r1])
        del dS, z
    return dq, dTc


_OPS = StripOps(strip_forward, strip_backward)


class TorchHardnessLoss(torch.autograd.Function):
    """Autograd function of the chunked PyTorch backend. Inputs: q, t, negatives, logit-scale tensor
    (or None), target_ids, query_ids, LossConfig, RankComm (or None); returns the loss."""

    @staticmethod
    def forward(ctx, q, t, negatives, scale_t, target_ids, query_ids, cfg: LossConfig, comm):
        return hardness_forward(ctx, _OPS, q, t, negatives, scale_t, target_ids, query_ids, cfg, comm)

    @staticmethod
    def backward(ctx, grad_out):
        return checked_backward(ctx, grad_out, "TorchHardnessLoss")
