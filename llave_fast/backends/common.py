"""What the fused backends share: the strip interface and the loss's autograd logic.

A backend implements two operations on the *strip* ``S = q @ Tc^T`` (B local query rows,
NT = N + M candidate columns: the N gathered targets, then M hard negatives), neither of
which may allocate a B x NT tensor:

``strip_forward``  -> per-row and per-column log-sum-exp of the masked hardness logits,
                      and (for a learnable scale) the softmax-weighted mean of S per
                      row and per column;
``strip_backward`` -> dq and dTc of  dS = s * (P_row g_row + P_col g_col) - [j = p_i] pos_coef_i,
                      the positive's term included, subtracted from dS in fp32 before any
                      rounding to 16 bits (near P_ii = 1 the difference is small).

The reduction and the scale's gradient are row-wise and done here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from ..errors import InvalidArgument, Unsupported


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
    # the fp32 strip S = q @ Tc^T kept for the backward (S-cache path), else None
    s_cache: torch.Tensor | None = None
    # the path the forward took (an SPlan); the backward follows it
    plan: object = None


@dataclass(frozen=True)
class LossConfig:
    scale: float
    alpha: float
    symmetric: bool
    reduction: str
    # accepted and passed to the backends, which ignore it: every backward is bitwise
    # reproducible already (no atomics; fixed strip, chunk and GEMM order)
    deterministic: bool
    # across ranks: False = LLaVE's per-rank local loss; True = open_clip's global loss (the
    # loss over the whole gathered batch, the same value on every rank)
    global_loss: bool = False
    # a backward can follow (grad mode on and an input wants a gradient): only then is S kept
    keep_s: bool = True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics and gradients accumulate in fp32 (fp64 for fp64 inputs)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- where S lives
# "cache":  S = q @ Tc^T computed once in fp32 by the library GEMM and kept for the backward
#           (3 GEMM-equivalents per step; B x stride x 4 bytes held from forward to backward);
# "stream": S in fp32 blocks of rows, each computed by the library GEMM and reduced at once,
#           recomputed block by block in the backward (4 GEMM-equivalents; one block of memory);
# "fused":  S never stored: the one-pass kernels recompute tiles of it (the chunked loop of the
#           torch backend); what is left when not even a block of S_MIN_ROWS rows fits.
# "auto" picks the first that fits S_CACHE_BYTES. The budget defaults to an eighth of the
# device's *total* memory (never its free memory): the path is a pure function of the shapes
# and the settings, so a resumed run computes exactly what the first one did.
S_MODES = ("auto", "cache", "stream", "fused")
#: the smallest block of rows the stream path takes under "auto"; below it, "fused"
S_MIN_ROWS = 512
#: the default budget, as a fraction of the device's total memory
S_CACHE_FRACTION = 8
_S_ROW_ALIGN = 64  # block rows and the S row stride are multiples of this


def parse_bytes(text: str, name: str) -> int:
    """``"4096"``, ``"512M"``, ``"2G"`` (powers of 1024) as a byte count; a clear error otherwise."""
    t = str(text).strip().upper().removesuffix("B").removesuffix("I")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = float(t) * mult
    except ValueError:
        value = -1.0
    if not value >= 0 or value != value or value == float("inf"):
        raise InvalidArgument(f"{name} must be a byte count such as 4096, 512M or 2G, got {text!r}")
    return int(value)


def total_memory(device: torch.device) -> int:
    """The device's total memory in bytes (CUDA: the card's; CPU: the machine's physical memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - not POSIX
        return 16 << 30


def s_cache_budget(device: torch.device, setting=None) -> int:
    """Bytes the fp32 S may take: ``setting`` (a kernel_config's S_CACHE_BYTES), else
    ``LLAVE_FAST_S_CACHE_BYTES``, else total memory / S_CACHE_FRACTION."""
    if setting is not None:
        if isinstance(setting, str):
            return parse_bytes(setting, "kernel config S_CACHE_BYTES")
        if isinstance(setting, bool) or not isinstance(setting, int) or setting < 0:
            raise InvalidArgument(f"kernel config S_CACHE_BYTES must be a byte count >= 0, got {setting!r}")
        return setting
    env = os.environ.get("LLAVE_FAST_S_CACHE_BYTES", "").strip()
    if env:
        return parse_bytes(env, "LLAVE_FAST_S_CACHE_BYTES")
    return total_memory(device) // S_CACHE_FRACTION


def s_mode_setting(setting=None) -> str:
    """The requested path: ``setting`` (a kernel_config's S_MODE), else ``LLAVE_FAST_S_MODE``, else "auto"."""
    if setting is None:
        setting = os.environ.get("LLAVE_FAST_S_MODE", "").strip().lower() or "auto"
        name = "LLAVE_FAST_S_MODE"
    else:
        name = "kernel config S_MODE"
    if setting not in S_MODES:
        raise InvalidArgument(f"{name} must be one of {S_MODES}, got {setting!r}")
    return setting


#: rows of the kept / streamed fp32 S and of the backward's dS strip start a multiple of this
#: many elements apart
ROW_ALIGN = 64


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers (grid sizes, tile counts); the kernels use ``tl.cdiv``."""
    return -(-a // b)


def round_up(n: int, m: int) -> int:
    """``n`` (at least 1) rounded up to a multiple of ``m``."""
    return cdiv(max(1, n), m) * m


def s_row_stride(NT: int) -> int:
    """Elements between rows of a kept/streamed S: NT rounded up to a multiple of ROW_ALIGN
    (aligned rows, and the library GEMM gets an aligned N). The dS strip has the same stride
    (``triton_backend.ds_row_stride``): the cached dS kernel reads S and writes dS with one."""
    return round_up(NT, ROW_ALIGN)


@dataclass(frozen=True)
class SPlan:
    mode: str  # "cache", "stream" or "fused"
    rows: int  # rows per fp32 block ("cache": B, "fused": 0)
    stride: int  # row stride of the fp32 blocks
    budget: int  # the byte budget it was planned under


def plan_s(B: int, NT: int, *, keep: bool, mode: str, budget: int, min_rows: int = S_MIN_ROWS,
           elem_bytes: int = 4) -> SPlan:
    """Which path the strip takes (see S_MODES). ``keep``: a backward will follow (the forward
    runs with a gradient wanted); without it S is never kept, "cache" runs as one stream block.
    A forced "stream" takes blocks of what the budget holds (at least one row). ``elem_bytes``:
    4 for an fp32 S, 8 for fp64 inputs (the torch backend)."""
    stride = s_row_stride(NT)
    row_bytes = stride * elem_bytes
    fit = budget // row_bytes  # rows of fp32 S the budget holds
    if mode == "auto":
        if fit >= B:
            mode = "cache"
        elif fit >= min(B, min_rows):
            mode = "stream"
        else:
            mode = "fused"
    if mode == "fused":
        return SPlan("fused", 0, stride, budget)
    if mode == "cache" and keep:
        return SPlan("cache", B, stride, budget)
    if fit >= B:
        rows = B
    else:  # whole multiples of 64 rows where the budget holds that many; never less than one row
        rows = max(1, fit // _S_ROW_ALIGN * _S_ROW_ALIGN if fit >= _S_ROW_ALIGN else fit)
    return SPlan("stream", rows, stride, budget)


#: how many strips each path took in this process (tests and benchmarks read it)
PATH_COUNTS = {"cache": 0, "stream": 0, "fused": 0}


_SIM_MM: dict = {}


def _probe_fp32_out_mm(device: torch.device, dtype: torch.dtype) -> str:
    """Whether this torch multiplies 16-bit operands into an fp32 result in one library call
    (``torch.mm(..., out_dtype=torch.float32)``, torch >= 2.8 on CUDA): "mm_out" (also into a
    given output), "mm", or "upcast" (fp32 operands). Checked numerically against float64."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(16, 32, generator=g, device=device).to(dtype)
    b = torch.randn(24, 32, generator=g, device=device).to(dtype)
    want = a.double() @ b.double().t()

    def close(x):
        return x.dtype == torch.float32 and bool(torch.allclose(x.double(), want, rtol=1e-4, atol=1e-4))

    try:
        out = torch.full((16, 24), float("nan"), device=device)
        torch.mm(a, b.t(), out_dtype=torch.float32, out=out)
        if close(out):
            return "mm_out"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        if close(torch.mm(a, b.t(), out_dtype=torch.float32)):
            return "mm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return "upcast"


def sim_operand_dtype(x: torch.Tensor) -> torch.dtype:
    """The operand dtype of the fp32-output similarity GEMM: the input's 16-bit type on CUDA where
    torch has an fp32-output GEMM for it (tensor cores, products exact, sums in fp32), fp32
    otherwise (the CPU: exact upcast), fp64 for fp64."""
    if x.dtype in (torch.float32, torch.float64):
        return x.dtype
    if x.is_cuda:
        key = (str(x.device), x.dtype)
        if key not in _SIM_MM:
            _SIM_MM[key] = _probe_fp32_out_mm(x.device, x.dtype)
        if _SIM_MM[key] != "upcast":
            return x.dtype
    return torch.float32


def similarity_into(out: torch.Tensor, q_rows: torch.Tensor, T_op: torch.Tensor) -> torch.Tensor:
    """``out = q_rows @ T_op^T`` in ``out``'s precision (fp32, or fp64), never rounded to 16 bits.
    ``T_op`` is already of ``sim_operand_dtype``; ``q_rows`` is cast to it."""
    a = q_rows if q_rows.dtype == T_op.dtype else q_rows.to(T_op.dtype)
    if a.dtype == out.dtype:
        return torch.mm(a, T_op.t(), out=out)
    how = _SIM_MM.get((str(a.device), a.dtype), "upcast")
    if how == "mm_out":
        return torch.mm(a, T_op.t(), out_dtype=out.dtype, out=out)
    if how == "mm":
        out.copy_(torch.mm(a, T_op.t(), out_dtype=out.dtype))
        return out
    return torch.mm(a.to(out.dtype), T_op.t().to(out.dtype), out=out)


_ROW_CHUNK = 4096


def rowwise_dot(a: torch.Tensor, b: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """(a_i . b_i) for every row, accumulated in ``acc``, in row chunks (no B x d temporary)."""
    out = torch.empty(a.shape[0], device=a.device, dtype=acc)
    for r0 in range(0, a.shape[0], _ROW_CHUNK):
        x, y = a[r0 : r0 + _ROW_CHUNK].to(acc), b[r0 : r0 + _ROW_CHUNK].to(acc)
        torch.bmm(x.unsqueeze(1), y.unsqueeze(2), out=out[r0 : r0 + _ROW_CHUNK].view(-1, 1, 1))
    return out


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


def _layout(q, t, negatives, target_ids, query_ids, comm):
    """Candidates and masks of this rank's strip.

    Returns (Tc, n_col, offset, ids, sizes) with Tc = [all targets (N); all negatives],
    sizes = (per-rank B, per-rank M) or None on one process.
    """
    B = q.shape[0]
    M = 0 if negatives is None else negatives.shape[0]
    if comm is None:
        Tc = t if negatives is None else torch.cat([t, negatives], dim=0)
        tid_all, qid_all, offset, sizes = target_ids, query_ids, 0, None
        N = B
    else:
        b_sizes, m_sizes, neg_with_ids = comm.exchange_layout(B, M, target_ids, query_ids, q.device, q.shape[1],
                                                              q.dtype)
        offset = sum(b_sizes[: comm.rank])
        N = sum(b_sizes)
        T_all = comm.gather_rows(t.detach(), b_sizes)
        parts = [T_all]
        if sum(m_sizes):
            local_neg = negatives.detach() if negatives is not None else t.new_empty((0, t.shape[1]))
            parts.append(comm.gather_rows(local_neg, m_sizes))
        Tc = torch.cat(parts, dim=0) if len(parts) > 1 else T_all
        tid_all, qid_all = comm.gather_ids(target_ids, query_ids, b_sizes, m_sizes, neg_with_ids)
        sizes = (b_sizes, m_sizes)
    ids = StripIds(
        tid_pos=None if target_ids is None else target_ids[:B].contiguous(),
        tid_cand=None if tid_all is None else tid_all.contiguous(),
        qid_row=None if query_ids is None else query_ids.contiguous(),
        qid_cand=None if qid_all is None else qid_all.contiguous(),
    )
    return Tc, N, offset, ids, sizes


def _empty_strip_stats(N: int, device, dtype: torch.dtype, need_col: bool, need_e: bool) -> StripStats:
    """The statistics of a strip with no rows (a rank with an empty batch): no row terms,
    and column partials that contribute nothing to the cross-rank combination, in the
    accumulation dtype the other ranks' partials have (``acc_dtype``: float64 for float64
    inputs; a float32 buffer there would meet float64 ones in the all-reduce)."""
    acc = acc_dtype(dtype)
    row = torch.empty(0, device=device, dtype=acc)
    col_lse = torch.full((N,), float("-inf"), device=device, dtype=acc) if need_col else None
    col_es = torch.zeros(N, device=device, dtype=acc) if (need_col and need_e) else None
    return StripStats(row, row if need_e else None, col_lse, col_es)


def hardness_forward(ctx, ops, q, t, negatives, scale_t, target_ids, query_ids, cfg: LossConfig, comm=None):
    """Forward of the loss over a backend's strip ops, on one process or across ranks.

    Across ranks it is LLaVE's per-rank local loss: this rank's queries against all
    gathered targets (and negatives), this rank's targets against all gathered queries;
    or, with ``cfg.global_loss``, the loss over the whole gathered batch (open_clip's
    ``local_loss=False``), from the same strips: every rank's per-row terms summed by one
    all-reduce of a scalar. A rank with an empty batch (B = 0) takes part in every
    collective and contributes nothing (its local loss is 0).
    """
    B = q.shape[0]
    if not cfg.symmetric:
        query_ids = None
    Tc, N, offset, ids, sizes = _layout(q, t, negatives, target_ids, query_ids, comm)
    need_e = scale_t is not None and scale_t.requires_grad
    # S is kept for a backward only when one can follow (never under no_grad)
    keep_s = cfg.keep_s and any(ctx.needs_input_grad[:4])
    if B == 0:
        stats = _empty_strip_stats(N, q.device, q.dtype, cfg.symmetric, need_e)
    else:
        stats = ops.strip_forward(
            q, Tc, n_col=N, offset=offset, scale=cfg.scale, alpha=cfg.alpha, ids=ids,
            need_col=cfg.symmetric, need_e=need_e, keep_s=keep_s,
        )
    col_lse, col_es = stats.col_lse, stats.col_es
    if comm is not None and cfg.symmetric:
        # every rank's strip holds a part of each column: merge them (O(N) floats)
        col_lse, col_es = comm.combine_lse(col_lse, col_es)
    acc = acc_dtype(q.dtype)
    # S_ii, the positive's similarity, row by row in the accumulation precision
    diag = rowwise_dot(q, t, acc)
    per_row = stats.row_lse - cfg.scale * diag
    if cfg.symmetric:
        per_row = (per_row + (col_lse[offset : offset + B] - cfg.scale * diag)) / 2
    if cfg.global_loss and comm is not None:
        # every rank's rows: one all-reduce of the per-row sum; the same value everywhere
        total = per_row.sum().reshape(1).clone()
        comm.all_reduce_sum(total)
        out = (total[0] / N) if cfg.reduction == "mean" else total[0]
    elif cfg.reduction == "mean":
        out = per_row.mean() if B else per_row.sum()  # an empty rank contributes 0
    elif cfg.reduction == "sum":
        out = per_row.sum()
    else:
        out = per_row
    ctx.ops, ctx.cfg, ctx.ids, ctx.comm = ops, cfg, ids, comm
    ctx.layout = (N, offset, sizes)
    ctx.need_e = need_e
    ctx.n_neg = 0 if negatives is None else negatives.shape[0]
    ctx.scale_meta = None if scale_t is None else (scale_t.shape, scale_t.dtype)
    # the kept S (if any) is saved like the inputs: autograd frees it once the backward ran
    ctx.s_plan = stats.plan
    ctx.save_for_backward(q, Tc, stats.row_lse, col_lse, stats.row_es, col_es, diag, stats.s_cache)
    return out


def hardness_backward(ctx, grad_out):
    q, Tc, row_lse, col_lse, row_es, col_es, diag, s_cache = ctx.saved_tensors
    cfg, ids, comm = ctx.cfg, ctx.ids, ctx.comm
    N, offset, sizes = ctx.layout
    B = q.shape[0]
    acc = acc_dtype(q.dtype)
    g = grad_out.to(acc)
    global_loss = cfg.global_loss and comm is not None
    if global_loss:
        # every rank's copy of the global loss has its own upstream gradient; through the
        # gather-with-grad each row's term gets their sum (open_clip with gather_with_grad)
        g_all = g.reshape(1).clone()
        comm.all_reduce_sum(g_all)
        g_all = g_all[0]
        g_rows = ((g_all / N) if cfg.reduction == "mean" else g_all).expand(B)
    elif cfg.reduction == "mean":
        g_rows = (g / B).expand(B) if B else g.new_zeros(0)
    elif cfg.reduction == "sum":
        g_rows = g.expand(B)
    else:
        g_rows = g
    half = 0.5 if cfg.symmetric else 1.0
    g_row = (g_rows * half).contiguous()
    g_col = None
    if cfg.symmetric:
        # every column's t->q loss lives on its owner rank; all strips need its gradient
        g_col = g_row if comm is None else comm.gather_rows(g_row, sizes[0])
    # the positive's term: dS_ii -= s * (g_row_i + g_col_i), applied by the backend
    g_col_local = None if g_col is None else g_col[offset : offset + B]
    c = ((g_row if g_col is None else g_row + g_col_local) * cfg.scale).contiguous()
    if B == 0:
        # nothing of this rank's strip; it still takes part in the reduce-scatter below
        dq = torch.zeros((0, q.shape[1]), device=q.device, dtype=acc)
        dTc = torch.zeros((Tc.shape[0], q.shape[1]), device=q.device, dtype=acc)
    else:
        dq, dTc = ctx.ops.strip_backward(
            q, Tc, n_col=N, offset=offset, scale=cfg.scale, alpha=cfg.alpha, ids=ids,
            row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col, pos_coef=c,
            deterministic=cfg.deterministic, s_cache=s_cache, s_plan=ctx.s_plan,
        )
    if comm is None:
        dt, dneg = dTc[:B], (dTc[B:] if ctx.n_neg else None)
    else:
        # partial dT of every rank's rows goes back to its owner, summed
        b_sizes, m_sizes = sizes
        dt = comm.reduce_scatter_rows(dTc[:N], b_sizes)
        dneg = comm.reduce_scatter_rows(dTc[N:], m_sizes) if sum(m_sizes) else None
        if not ctx.n_neg:
            dneg = None
    dq = dq.to(q.dtype)
    dt = dt.to(q.dtype)
    dneg = None if dneg is None else dneg.to(q.dtype)
    dscale = None
    if ctx.need_e:
        # dL/ds = sum_i g_row_i (E_row[S]_i - S_ii) + sum_(local j) g_col_j (E_col[S]_j - S_jj)
        if global_loss:
            # this rank's scale replica: its own upstream gradient times dL_global/ds, whose
            # terms are spread over every rank's rows (one more scalar all-reduce)
            w = half * ((1.0 / N) if cfg.reduction == "mean" else 1.0)
            unit = ((row_es - diag).sum() * w).reshape(1).clone()
            if g_col is not None:
                unit = unit + (col_es[offset : offset + B] - diag).sum() * w
            comm.all_reduce_sum(unit)
            ds = g * unit[0]
        else:
            ds = (g_row * (row_es - diag)).sum()
            if g_col is not None:
                ds = ds + (g_col_local * (col_es[offset : offset + B] - diag)).sum()
        shape, dtype = ctx.scale_meta
        dscale = ds.reshape(shape).to(dtype)
    return dq, dt, dneg, dscale


@dataclass(frozen=True)
class StripOps:
    """A fused backend's two strip operations (see the module docstring)."""

    strip_forward: object
    strip_backward: object


def checked_backward(ctx, grad_out, name: str):
    """The body of a fused backend's ``backward``: the gradients of the 8 ``forward`` inputs.
    Double backward is refused: the gradient is computed by the backend's own kernels and has
    no graph."""
    if torch.is_grad_enabled():  # backward(create_graph=True): autograd asks for a graph of the gradient
        raise Unsupported(
            f"{name}: the fused loss's gradient is computed by its own kernels and has no graph, so it "
            "cannot be differentiated again (backward with create_graph=True, torch.autograd.grad(..., "
            "create_graph=True), e.g. a gradient penalty); use backend='reference', whose eager formula "
            "autograd differentiates twice")
    dq, dt, dneg, dscale = hardness_backward(ctx, grad_out)
    return dq, dt, dneg, dscale, None, None, None, None
