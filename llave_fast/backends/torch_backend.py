"""The chunked pure-PyTorch backend: same algorithm and memory behaviour as the kernels.

The strip ``S = q @ Tc^T`` is processed ``chunk`` rows at a time (chunk x NT, never B x NT):
forward computes each chunk once for its rows' log-sum-exp and folds its column
statistics into running per-column ones (4 GEMM-equivalents per step with the backward,
against the eager formula's 6); backward recomputes each chunk, forms dS and does
dq[chunk] = dS @ Tc and dTc += dS^T @ q[chunk]. Runs on any device, any float dtype.
"""

from __future__ import annotations

import os

import torch

from .common import LossConfig, StripIds, StripStats, acc_dtype, hardness_backward, hardness_forward, new_output

# elements of one chunk x NT fp32 temporary; a few of them live at once
_CHUNK_ELEMS = int(os.environ.get("LLAVE_FAST_TORCH_CHUNK_ELEMS", 1 << 22))


def chunk_rows(B: int, NT: int) -> int:
    return max(1, min(B, _CHUNK_ELEMS // max(NT, 1)))


def _mm_dtype(x: torch.Tensor) -> torch.dtype:
    """GEMM operand dtype: the input's on CUDA (tensor cores), fp32/fp64 on the CPU."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
        return x.dtype
    return acc_dtype(x.dtype)


def _chunk_logits(S, r0, offset, scale, alpha, ids: StripIds, n_col, need_col):
    """Row- and column-direction logits of rows r0.. of the strip (masked entries -inf)."""
    R, NT = S.shape
    dev = S.device
    rows = torch.arange(r0, r0 + R, device=dev)
    cols = torch.arange(NT, device=dev)
    is_pos = cols[None, :] == (rows[:, None] + offset)
    # z = s*S + alpha*sg(S) off the positive, s*S on it
    z = torch.where(is_pos, S * scale, S * (scale + alpha))
    z_row = z
    if ids.has_tid:
        n_tid = ids.tid_cand.shape[0]
        false_neg = ids.tid_cand[None, :] == ids.tid_pos[r0 : r0 + R, None]
        false_neg &= ~is_pos[:, :n_tid]
        z_row = z.clone()
        z_row[:, :n_tid].masked_fill_(false_neg, float("-inf"))
    z_col = None
    if need_col:
        z_col = z[:, :n_col]
        if ids.has_qid:
            false_neg = ids.qid_row[r0 : r0 + R, None] == ids.qid_cand[None, :]
            z_col = z_col.masked_fill(false_neg & ~is_pos[:, :n_col], float("-inf"))
    return z_row, z_col


def _merge(m_run, l_run, e_run, m_new, l_new, e_new):
    """Merge two (max, sum-exp, sum-exp*S) column statistics."""
    m = torch.maximum(m_run, m_new)
    shift = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    a, b = torch.exp(m_run - shift), torch.exp(m_new - shift)
    e = None if e_run is None else e_run * a + e_new * b
    return m, l_run * a + l_new * b, e


def strip_forward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e) -> StripStats:
    B, NT = q.shape[0], Tc.shape[0]
    acc = acc_dtype(q.dtype)
    mm = _mm_dtype(q)
    qm, Tm = q.to(mm), Tc.to(mm)
    R = chunk_rows(B, NT)
    row_lse = new_output((B,), q.device, acc)
    row_es = new_output((B,), q.device, acc) if need_e else None
    m_c = torch.full((n_col,), float("-inf"), device=q.device, dtype=acc) if need_col else None
    l_c = torch.zeros(n_col, device=q.device, dtype=acc) if need_col else None
    e_c = torch.zeros(n_col, device=q.device, dtype=acc) if (need_col and need_e) else None
    for r0 in range(0, B, R):
        S = (qm[r0 : r0 + R] @ Tm.t()).to(acc)
        z_row, z_col = _chunk_logits(S, r0, offset, scale, alpha, ids, n_col, need_col)
        lse = torch.logsumexp(z_row, dim=1)
        row_lse[r0 : r0 + R] = lse
        if need_e:
            row_es[r0 : r0 + R] = (torch.exp(z_row - lse[:, None]) * S).sum(dim=1)
        if need_col:
            m_new = z_col.max(dim=0).values
            shift = torch.where(torch.isneginf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(z_col - shift[None, :])
            e_new = (p * S[:, :n_col]).sum(dim=0) if need_e else None
            m_c, l_c, e_c = _merge(m_c, l_c, e_c, m_new, p.sum(dim=0), e_new)
    col_lse = col_es = None
    if need_col:
        col_lse = m_c + torch.log(l_c)
        if need_e:
            col_es = e_c / l_c
    return StripStats(row_lse, row_es, col_lse, col_es)


def strip_backward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col, deterministic):
    # deterministic either way: fixed chunk order, no atomics
    B, NT = q.shape[0], Tc.shape[0]
    acc = acc_dtype(q.dtype)
    mm = _mm_dtype(q)
    qm, Tm = q.to(mm), Tc.to(mm)
    # fp16's range is too small for dS (s * P * g can be ~1e-9): accumulate its GEMMs in fp32
    ds_mm = mm if mm == torch.bfloat16 else acc
    Tg = Tc.to(ds_mm)
    qg = q.to(ds_mm)
    R = chunk_rows(B, NT)
    dq = new_output(q.shape, q.device, acc)
    dTc = torch.zeros(Tc.shape, device=q.device, dtype=acc)
    for r0 in range(0, B, R):
        r1 = min(B, r0 + R)
        S = (qm[r0:r1] @ Tm.t()).to(acc)
        z_row, z_col = _chunk_logits(S, r0, offset, scale, alpha, ids, n_col, g_col is not None)
        # dS_ij = s * softmax_row(z)_ij * g_row_i
        dS = torch.exp(z_row - row_lse[r0:r1, None]) * g_row[r0:r1, None]
        if g_col is not None:
            # + s * softmax_col(z)_ij * g_col_j
            dS[:, :n_col] += torch.exp(z_col - col_lse[None, :]) * g_col[None, :]
        dS = (dS * scale).to(ds_mm)
        dq[r0:r1] = (dS @ Tg).to(acc)  # dq = dS @ Tc
        dTc += (dS.t() @ qg[r0:r1]).to(acc)  # dTc = dS^T @ q
    return dq, dTc


class TorchHardnessLoss(torch.autograd.Function):
    """Autograd function of the chunked PyTorch backend."""

    @staticmethod
    def forward(ctx, q, t, negatives, scale_t, target_ids, query_ids, cfg: LossConfig, comm):
        return hardness_forward(ctx, _OPS, q, t, negatives, scale_t, target_ids, query_ids, cfg, comm)

    @staticmethod
    def backward(ctx, grad_out):
        dq, dt, dneg, dscale = hardness_backward(ctx, grad_out)
        return dq, dt, dneg, dscale, None, None, None, None


class _Ops:
    strip_forward = staticmethod(strip_forward)
    strip_backward = staticmethod(strip_backward)


_OPS = _Ops()
