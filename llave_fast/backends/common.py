"""What the fused backends share: the strip interface and the loss's autograd logic.

A backend implements two operations on the *strip* ``S = q @ Tc^T`` (B local query rows,
NT = N + M candidate columns: the N gathered targets, then M hard negatives), neither of
which may allocate a B x NT tensor:

``strip_forward``  -> per-row and per-column log-sum-exp of the masked hardness logits,
                      and (for a learnable scale) the softmax-weighted mean of S per
                      row and per column;
``strip_backward`` -> the softmax part of dq and dTc:  dS = s * (P_row g_row + P_col g_col).

The positive's term, the reduction and the scale's gradient are row-wise and done here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StripIds:
    """False-negative masks. A field is None when that direction is unmasked.

    tid_pos  (B)      target id of row i's positive
    tid_cand (N_TID)  target ids of the first N_TID candidate columns (later ones never masked)
    qid_row  (B)      query id of local row i
    qid_cand (N)      query id of column j's positive (the gathered query ids)
    """

    tid_pos: torch.Tensor | None = None
    tid_cand: torch.Tensor | None = None
    qid_row: torch.Tensor | None = None
    qid_cand: torch.Tensor | None = None

    @property
    def has_tid(self) -> bool:
        return self.tid_cand is not None

    @property
    def has_qid(self) -> bool:
        return self.qid_cand is not None


@dataclass
class StripStats:
    row_lse: torch.Tensor  # (B,) fp32
    row_es: torch.Tensor | None  # (B,) fp32, E_softmax[S] per row, when asked
    col_lse: torch.Tensor | None  # (N,) fp32, this strip's partial column log-sum-exp
    col_es: torch.Tensor | None  # (N,) fp32


@dataclass(frozen=True)
class LossConfig:
    scale: float
    alpha: float
    symmetric: bool
    reduction: str
    deterministic: bool


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradients accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def poison_outputs() -> bool:
    """Debug switch (tests): fill freshly allocated outputs with NaN so an unwritten element shows."""
    return os.environ.get("LLAVE_FAST_POISON", "0") == "1"


def new_output(shape, device, dtype=torch.float32) -> torch.Tensor:
    if poison_outputs():
        return torch.full(shape, float("nan"), device=device, dtype=dtype)
    return torch.empty(shape, device=device, dtype=dtype)


def combine_lse(lse: torch.Tensor, es: torch.Tensor | None, dim: int):
    """Merge partial (log-sum-exp, softmax-mean) pairs along ``dim``."""
    total = torch.logsumexp(lse, dim=dim)
    if es is None:
        return total, None
    # weight of each partial = its share of the total normaliser; -inf partials weigh 0
    w = torch.exp(lse - total.unsqueeze(dim))
    contrib = torch.where(torch.isneginf(lse), torch.zeros_like(w), w * es)
    return total, contrib.sum(dim=dim)


def hardness_forward(ctx, ops, q, t, negatives, scale_t, ids: StripIds, cfg: LossConfig):
    """Single-process forward of the loss (N = B, offset 0) over a backend's strip ops."""
    B = q.shape[0]
    Tc = t if negatives is None else torch.cat([t, negatives], dim=0)
    need_e = scale_t is not None and scale_t.requires_grad
    stats = ops.strip_forward(
        q, Tc, n_col=B, offset=0, scale=cfg.scale, alpha=cfg.alpha, ids=ids,
        need_col=cfg.symmetric, need_e=need_e,
    )
    acc = acc_dtype(q.dtype)
    # s * S_ii, the positive logit, row by row in the accumulation precision
    diag = (q.to(acc) * t.to(acc)).sum(dim=1)
    per_row = stats.row_lse - cfg.scale * diag
    if cfg.symmetric:
        per_row = (per_row + (stats.col_lse - cfg.scale * diag)) / 2
    if cfg.reduction == "mean":
        out = per_row.mean()
    elif cfg.reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row
    ctx.ops = ops
    ctx.cfg = cfg
    ctx.ids = ids
    ctx.need_e = need_e
    ctx.n_neg = 0 if negatives is None else negatives.shape[0]
    ctx.scale_meta = None if scale_t is None else (scale_t.shape, scale_t.dtype)
    ctx.save_for_backward(q, Tc, stats.row_lse, stats.col_lse, stats.row_es, stats.col_es, diag)
    return out


def hardness_backward(ctx, grad_out):
    q, Tc, row_lse, col_lse, row_es, col_es, diag = ctx.saved_tensors
    cfg, ids = ctx.cfg, ctx.ids
    B = q.shape[0]
    acc = acc_dtype(q.dtype)
    g = grad_out.to(acc)
    if cfg.reduction == "mean":
        g_rows = (g / B).expand(B)
    elif cfg.reduction == "sum":
        g_rows = g.expand(B)
    else:
        g_rows = g
    half = 0.5 if cfg.symmetric else 1.0
    g_row = (g_rows * half).contiguous()
    g_col = g_row if cfg.symmetric else None
    dq, dTc = ctx.ops.strip_backward(
        q, Tc, n_col=B, offset=0, scale=cfg.scale, alpha=cfg.alpha, ids=ids,
        row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col,
        deterministic=cfg.deterministic,
    )
    # the positive's term: dS_ii -= s * (g_row_i + g_col_i)
    c = (g_row + g_col if g_col is not None else g_row) * cfg.scale
    dq -= c[:, None] * Tc[:B].to(acc)
    dTc[:B] -= c[:, None] * q.to(acc)
    dq = dq.to(q.dtype)
    dTc = dTc.to(Tc.dtype)
    dt = dTc[:B]
    dneg = dTc[B:] if ctx.n_neg else None
    dscale = None
    if ctx.need_e:
        # dL/ds = sum_i g_row_i (E_row[S]_i - S_ii) + sum_j g_col_j (E_col[S]_j - S_jj)
        ds = (g_row * (row_es - diag)).sum()
        if g_col is not None:
            ds = ds + (g_col * (col_es - diag)).sum()
        shape, dtype = ctx.scale_meta
        dscale = ds.reshape(shape).to(dtype)
    return dq, dt, dneg, dscale
