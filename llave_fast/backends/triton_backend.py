"""The Triton backend: launchers of the fused kernels and their autograd function.

Runs compiled on CUDA, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Nothing here touches CUDA
at import time; triton itself is imported on first use.

A loss call reaches a kernel in three hops: ``TritonHardnessLoss`` (autograd) ->
``strip_forward`` / ``strip_backward`` (the path: ``launch_config`` and ``plan_s``) ->
``_fused_forward``, ``_strip_forward_s`` or ``_strip_backward_ds`` (the launches).

The strip backward's dS buffer (rows, stride, precision, fp16 scale) is sized in
:mod:`.ds_strip` and its library GEMMs are in :mod:`.gemm`; their names stay importable from here.
"""

from __future__ import annotations

import contextlib
import os
import re

import numpy as np
import torch

from .common import (
    PATH_COUNTS,
    LossConfig,
    SPlan,
    StripIds,
    StripOps,
    StripStats,
    cdiv,
    checked_backward,
    combine_lse,
    hardness_forward,
    new_output,
    plan_s,
    round_up,
    s_cache_budget,
    s_mode_setting,
    sim_operand_dtype,
    similarity_into,
)
from . import launch
from .ds_strip import SIGMA_MAX_EXP, ds_dtype, ds_row_stride, ds_scale, strip_rows  # noqa: F401 - re-exported
from .gemm import GEMM_K_ALIGN, GEMM_LD_ALIGN, _probe_acc_mm, acc_mm_form, gemm_k, gemm_operand  # noqa: F401
from .gemm import mm_into as _mm_into  # looked up here by the strip backward (tests patch it here)
from .launch import (
    BWD_CANDIDATES_CPU,
    BWD_CANDIDATES_GPU,
    FWD_CANDIDATES_CPU,
    FWD_CANDIDATES_GPU,
    TUNE_LOG,
    KernelConfig,
    autotune_enabled,
    default_config,
    gpu_config,
    interpreter_config,
    with_overrides,
)
from ..errors import InvalidArgumentType

_KERNELS = None
#: the overrides of the innermost ``kernel_config`` in force (a dict of KernelConfig field names),
#: or None. Process-wide on purpose: the backward may run on autograd's device thread.
_CONFIG_OVERRIDE: dict | None = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from types import SimpleNamespace

        from llave_fast.kernels.hardness_ds import hardness_ds_kernel
        from llave_fast.kernels.hardness_fwd import hardness_fwd_kernel
        from llave_fast.kernels.hardness_stats import hardness_stats_kernel

        _KERNELS = SimpleNamespace(hardness_fwd_kernel=hardness_fwd_kernel, hardness_ds_kernel=hardness_ds_kernel,
                                   hardness_stats_kernel=hardness_stats_kernel)
    return _KERNELS


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = re.findall(r"\d+", version)[:2]
    return (int(parts[0]), int(parts[1]) if len(parts) > 1 else 0) if parts else None


def interpreter_clash(triton_version: str | None = None, numpy_version: str | None = None) -> str:
    """Why the Triton interpreter cannot run the kernels with these versions, or ``""``.

    Triton's interpreter before 3.7 turns one-element arrays into Python scalars, which numpy 2.4
    made an error: every launch then fails deep inside the interpreter with "only 0-dimensional
    arrays can be converted to Python scalars". Seen on 2026-12-07 with triton 3.5.1 and 3.6.0
    (the GPU machines' release) under numpy 2.4.0 and 2.4.6; triton 3.7.1 and 3.8.0 ran."""
    if triton_version is None:
        import triton

        triton_version = triton.__version__
    if numpy_version is None:
        numpy_version = np.__version__
    tv, nv = _major_minor(triton_version), _major_minor(numpy_version)
    if tv is not None and nv is not None and tv < (3, 7) and nv >= (2, 4):  # an unreadable version: no claim
        return (f"the Triton interpreter of triton {triton_version} fails under numpy {numpy_version} (numpy 2.4 "
                "refuses to turn a 1-D array into a Python scalar, which interpreters before triton 3.7 do): "
                "install numpy<2.4 or triton>=3.7")
    return ""


def available_on(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on ``device``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({exc})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreter_active():
        clash = interpreter_clash()
        return (not clash), clash
    return False, (
        f"the triton backend runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported; got tensors on {device}"
    )


def kernel_config(**overrides):
    """Override fields of the launch configuration inside a ``with`` block::

        with kernel_config(S_MODE="stream", DS_STRIP_ROWS=1024):
            loss = hardness_weighted_loss(q, t, backend="triton")

    The keywords are ``KernelConfig`` field names (tiles, grid caps, strip sizing, where S
    lives, the torch backend's chunk, ``autotune``), checked here: an unknown name raises
    InvalidArgument listing the valid ones, a bad value one naming the field and the value.
    The fields not given keep the device's default. A nested ``kernel_config`` replaces the
    enclosing one while it is open. An override turns autotuning off unless it says
    ``autotune=True`` (then the candidates are timed on top of it)."""
    with_overrides(interpreter_config(), overrides)  # checked now, not at the first launch
    return _override(dict(overrides))


@contextlib.contextmanager
def _override(overrides: dict):
    global _CONFIG_OVERRIDE
    old = _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = overrides
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


def launch_config(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> KernelConfig:
    """The configuration a launch on ``device`` with inputs of ``dtype`` uses now: the device's
    default (``launch.default_config``) with the ``kernel_config`` override in force applied."""
    return with_overrides(default_config(device, dtype), _CONFIG_OVERRIDE)


def _autotune_requested() -> bool:
    """An override's ``autotune`` if it sets one; no tuning under any other override (its tiles
    are what was asked for); else ``LLAVE_FAST_AUTOTUNE``."""
    over = _CONFIG_OVERRIDE
    if over is not None and over.get("autotune") is not None:
        return bool(over["autotune"])
    return over is None and autotune_enabled()


def _tuned(kind: str, cfg: KernelConfig, q: torch.Tensor, NT: int, flags: tuple, run) -> KernelConfig:
    """``cfg``, or the fastest candidate on top of it when autotuning was asked for. The key:
    the device, dtype, width, power-of-two size classes of B and NT and the kernels' flags."""
    if not _autotune_requested():
        return cfg
    key = (q.shape[1], launch.size_class(q.shape[0]), launch.size_class(NT), flags)
    return launch.tuned(kind, cfg, key, q.device, q.dtype, run)


def _precision(x: torch.Tensor) -> str:
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _id_args(ids: StripIds, dummy: torch.Tensor):
    def ptr(x):
        return dummy if x is None else x

    n_tid = 0 if ids.tid_cand is None else ids.tid_cand.shape[0]
    return ptr(ids.tid_pos), ptr(ids.tid_cand), n_tid, ptr(ids.qid_row), ptr(ids.qid_cand)


def _enter(device):
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _check_dtype(q):
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise InvalidArgumentType(
            f"the triton backend takes bfloat16, float16 or float32 embeddings, got {q.dtype}; "
            "use backend='torch' for float64"
        )


def s_plan_for(cfg: KernelConfig, B: int, NT: int, device: torch.device, keep: bool) -> SPlan:
    """The path of this strip under launch config ``cfg`` (see ``backends.common.plan_s``)."""
    return plan_s(B, NT, keep=keep, mode=s_mode_setting(cfg.S_MODE),
                  budget=s_cache_budget(device, cfg.S_CACHE_BYTES), min_rows=cfg.S_MIN_ROWS)


def strip_forward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e,
                  keep_s: bool = False) -> StripStats:
    """Row and column statistics of the strip. ``keep_s``: a backward follows, so an fp32 S
    that fits the budget is kept for it (the S-cache path)."""
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    B = q.shape[0]
    NT = Tc.shape[0]
    dev = q.device
    cfg = launch_config(dev, q.dtype)
    autotune_enabled()  # a bad LLAVE_FAST_AUTOTUNE is an error on every path, not only where it is read
    plan = s_plan_for(cfg, B, NT, dev, keep_s)
    kw = dict(n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids, need_col=need_col, need_e=need_e)
    PATH_COUNTS[plan.mode] += 1
    if plan.mode != "fused":
        return _strip_forward_s(q, Tc, cfg, plan, **kw)
    cfg = _tuned("fwd", cfg, q, NT, (ids.has_tid, ids.has_qid, need_col, need_e),
                 lambda c: _fused_forward(q, Tc, c, **kw))
    stats = _fused_forward(q, Tc, cfg, **kw)
    stats.plan = plan
    return stats


def _fused_forward(q, Tc, cfg: KernelConfig, *, n_col, offset, scale, alpha, ids: StripIds, need_col,
                   need_e) -> StripStats:
    """The "fused" forward: ``hardness_fwd_kernel`` over a (GR, GC) grid of program groups,
    then the partial statistics merged on the host (column partials per program group or,
    with ``FWD_COL="tile"``, per row tile); ``FWD_COL="transpose"``: two row-only sweeps."""
    if need_col and cfg.FWD_COL == "transpose":
        # two row-only sweeps: q against Tc, then the first n_col rows of Tc (the targets) against
        # q, whose row statistics are the column statistics (the same positive at offset' = -offset,
        # the query-id mask as the row mask of the transposed tile)
        rows = _fused_forward(q, Tc, cfg, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                              need_col=False, need_e=need_e)
        t_ids = StripIds(tid_pos=ids.qid_cand[:n_col], tid_cand=ids.qid_row) if ids.has_qid else StripIds()
        cols = _fused_forward(Tc[:n_col], q, cfg, n_col=q.shape[0], offset=-offset, scale=scale, alpha=alpha,
                              ids=t_ids, need_col=False, need_e=need_e)
        return StripStats(rows.row_lse, rows.row_es, cols.row_lse, cols.row_es)
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    BM, BN = cfg.BM, cfg.BN
    GR = max(1, min(cdiv(B, BM), cfg.GR_MAX))
    GC = max(1, min(cdiv(NT, BN), cfg.GC_MAX))
    row_m = new_output((GC, B), dev)
    row_l = new_output((GC, B), dev)
    row_e = new_output((GC, B), dev) if need_e else row_l
    per_tile = cfg.FWD_COL == "tile"
    if need_col and per_tile:  # every (row tile, column) slot is written once by the kernel
        n_rb = cdiv(B, BM)
        col_m, col_l = new_output((n_rb, n_col), dev), new_output((n_rb, n_col), dev)
        col_e = new_output((n_rb, n_col), dev) if need_e else col_l
    elif need_col:  # read-modified-written from these starting values
        col_m = torch.full((GR, n_col), float("-inf"), device=dev)
        col_l = torch.zeros((GR, n_col), device=dev)
        col_e = torch.zeros((GR, n_col), device=dev) if need_e else col_l
    else:
        col_m = col_l = col_e = row_l
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    tid_pos, tid_cand, n_tid, qid_row, qid_cand = _id_args(ids, dummy)
    with _enter(dev):
        _kernels().hardness_fwd_kernel[(GR, GC)](
            q, Tc, B, NT, n_col, D, offset, float(scale), float(alpha),
            tid_pos, tid_cand, n_tid, qid_row, qid_cand,
            row_m, row_l, row_e, col_m, col_l, col_e, GR, GC,
            BM=BM, BN=BN, BK=cfg.BK,
            HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and need_col, NEED_COL=need_col, NEED_E=need_e,
            UPCAST=_upcast(q), PREC=_precision(q), COL_PER_TILE=per_tile,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
    row_lse, row_es = combine_lse(row_m + torch.log(row_l), (row_e / row_l) if need_e else None, dim=0)
    col_lse = col_es = None
    if need_col:
        col_lse, col_es = combine_lse(col_m + torch.log(col_l), (col_e / col_l) if need_e else None, dim=0)
    return StripStats(row_lse, row_es, col_lse, col_es)


def _strip_forward_s(q, Tc, cfg, plan: SPlan, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e):
    """The S-cache and stream forward: per block of rows, the library GEMM writes S in fp32
    (``similarity_into``: 16-bit operands on the tensor cores, never a 16-bit S), then
    ``hardness_stats`` reduces it. "cache": one block of all B rows, kept for the backward."""
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    stride = plan.stride
    T_op = gemm_operand(Tc, stride, D, sim_operand_dtype(q))  # zero rows past NT: S = 0 there (masked)
    R = plan.rows
    S_all = new_output((R, stride), dev)  # poisoned under LLAVE_FAST_POISON=1: the GEMM writes it all
    BM, BN = cfg.STATS_BM, cfg.STATS_BN
    n_cb = cdiv(NT, BN)
    row_lse = new_output((B,), dev)
    row_es = new_output((B,), dev) if need_e else None
    col_lse = col_es = None
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    tid_pos, tid_cand, n_tid, qid_row, qid_cand = _id_args(ids, dummy)
    with _enter(dev):
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            S = S_all[: r1 - r0]
            similarity_into(S, q[r0:r1], T_op)
            n_rt = cdiv(r1 - r0, BM)
            GC = max(1, min(n_cb, cfg.STATS_GC_MAX, cdiv(cfg.STATS_PROGRAMS, n_rt)))
            rows = r1 - r0
            row_m, row_l = new_output((GC, rows), dev), new_output((GC, rows), dev)
            row_e = new_output((GC, rows), dev) if need_e else row_l
            if need_col:
                col_m, col_l = new_output((n_rt, n_col), dev), new_output((n_rt, n_col), dev)
                col_e = new_output((n_rt, n_col), dev) if need_e else col_l
            else:
                col_m = col_l = col_e = row_l
            _kernels().hardness_stats_kernel[(n_rt, GC)](
                S, stride, r0, r1, NT, n_col, offset, float(scale), float(alpha),
                tid_pos, tid_cand, n_tid, qid_row, qid_cand,
                row_m, row_l, row_e, rows, col_m, col_l, col_e, GC,
                BM=BM, BN=BN, HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and need_col, NEED_COL=need_col,
                NEED_E=need_e, num_warps=cfg.STATS_WARPS,
            )
            lse, es = combine_lse(row_m + torch.log(row_l), (row_e / row_l) if need_e else None, dim=0)
            row_lse[r0:r1] = lse
            if need_e:
                row_es[r0:r1] = es
            if need_col:
                lse, es = combine_lse(col_m + torch.log(col_l), (col_e / col_l) if need_e else None, dim=0)
                if col_lse is not None:  # merge with the blocks before
                    lse, es = combine_lse(torch.stack([col_lse, lse]),
                                          torch.stack([col_es, es]) if need_e else None, dim=0)
                col_lse, col_es = lse, es
    return StripStats(row_lse, row_es, col_lse, col_es, s_cache=S_all if plan.mode == "cache" else None, plan=plan)


def _upcast(q) -> bool:
    # the interpreter computes garbage on bf16 values; on GPU keep tensor-core operands
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


def strip_backward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col,
                   pos_coef, deterministic, s_cache=None, s_plan: SPlan | None = None):
    """dq and dTc of the strip: the strip backward (``_strip_backward_ds``) on the forward's path
    (``s_plan``): the kept S (``s_cache``), fp32 blocks recomputed by the library GEMM ("stream"),
    or S recomputed tile by tile in the dS kernel ("fused", or no plan).

    ``deterministic`` changes nothing here: every path is bitwise reproducible from run to run
    (no atomics; fixed strip, tile and GEMM order). It is accepted for the loss's option."""
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    NT = Tc.shape[0]
    cfg = launch_config(q.device, q.dtype)
    kw = dict(n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids, row_lse=row_lse, col_lse=col_lse,
              g_row=g_row, g_col=g_col, pos_coef=pos_coef)
    if s_plan is not None and s_plan.mode != "fused":
        if s_plan.mode == "cache" and s_cache is None:
            raise RuntimeError("the S-cache forward kept no S for this backward (internal error)")
        return _strip_backward_ds(q, Tc, cfg, **kw, s_cache=s_cache, s_plan=s_plan)
    cfg = _tuned("bwd", cfg, q, NT, (ids.has_tid, ids.has_qid, g_col is not None),
                 lambda c: _strip_backward_ds(q, Tc, c, **kw))
    return _strip_backward_ds(q, Tc, cfg, **kw)


def _strip_backward_ds(q, Tc, cfg, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col,
                       pos_coef, s_cache=None, s_plan: SPlan | None = None):
    """The strip backward: per block of R rows, dS by ``hardness_ds_kernel``, then two GEMMs.

    S: recomputed tile by tile in the kernel (no plan, or "fused"), read from the kept fp32 S
    ("cache"), or written in fp32 by the library GEMM for each block just before ("stream",
    blocks of at most the forward's rows).

    dS precision: ``ds_dtype`` (bf16 / fp16 scaled by sigma / fp32). dq comes back in fp32,
    except: with one bf16 strip ``dq = dS @ T`` is written in bf16 directly (the GEMM
    accumulates in fp32 and rounds once); with an fp16 strip dq is accumulated in fp32 and
    unscaled by 1/sigma into fp16 in one pass. The caller's cast is then a no-op. dTc is
    fp32 (unscaled in place for an fp16 strip)."""
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    dsd = ds_dtype(cfg, q.dtype, dev)
    scaled = dsd == torch.float16
    R = strip_rows(cfg, B, NT, torch.empty((), dtype=dsd).element_size())
    stride = ds_row_stride(NT)
    mode = "fused" if s_plan is None else s_plan.mode
    s_buf = None
    if mode == "stream":
        R = min(R, s_plan.rows)
        s_buf = new_output((R, stride), dev)
    # Padded GEMM shapes (GEMM_K_ALIGN, GEMM_LD_ALIGN): dq = dS[:rows, :stride] @ T_op with T_op
    # (stride x Dp, zero rows past NT: the kernel writes dS = 0 in columns NT..stride-1), and
    # dT += dS[:Kr, :stride]^T @ q_op with Kr the strip's rows rounded up (dS rows past the strip
    # zeroed, q_op with zero rows). dq and dT are computed Dp wide and cut to D.
    Dp = round_up(D, GEMM_LD_ALIGN)
    # rows ``stride`` apart (poisoned with NaN under LLAVE_FAST_POISON=1: an element the kernel
    # should write and does not shows in dq/dT, padding columns included)
    dS = new_output((gemm_k(R), stride), dev, dsd)
    dq_dtype = q.dtype if (R >= B and dsd == torch.bfloat16 and q.dtype == torch.bfloat16) else torch.float32
    dq = new_output((B, Dp), dev, dq_dtype)
    dTc = torch.zeros((stride, Dp), device=dev, dtype=torch.float32)
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    tid_pos, tid_cand, n_tid, qid_row, qid_cand = _id_args(ids, dummy)
    has_col = g_col is not None
    row_lse_arg, g_row_arg = row_lse.float().contiguous(), g_row.float().contiguous()
    col_lse_arg = col_lse.float().contiguous() if has_col else row_lse_arg
    g_col_arg = g_col.float().contiguous() if has_col else g_row_arg
    pos_arg = pos_coef.float().contiguous()
    sigma = inv_sigma = None
    if scaled:
        # fp16 strip: dS * sigma, |dS * sigma| < 2^15 (hardness_ds); undone once at the end
        sigma, inv_sigma = ds_scale(g_row_arg, g_col_arg if has_col else None, scale)
    prec = _precision(q)
    # GEMM operands: the strip's dtype (an fp32 strip with 16-bit inputs: upcast T and q), padded
    T_op = gemm_operand(Tc, stride, Dp, dsd)
    T_sim = None
    if mode == "stream":
        # the operand of the S GEMM: T_op itself where it has the same dtype and no padding columns
        sim_dtype = sim_operand_dtype(q)
        T_sim = T_op if (Dp == D and dsd == sim_dtype) else gemm_operand(Tc, stride, D, sim_dtype)
    BM, BN = cfg.DS_BM, cfg.DS_BN
    n_ct = cdiv(stride, BN)  # every column of the row stride is written (0 past NT)
    with _enter(dev):
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            grid = (cdiv(r1 - r0, BM) * n_ct,)
            if mode == "stream":
                s_arg, s_row0 = s_buf, r0
                similarity_into(s_buf[: r1 - r0], q[r0:r1], T_sim)
            elif mode == "cache":
                s_arg, s_row0 = s_cache, 0
            else:
                s_arg, s_row0 = pos_arg, 0  # not read
            _kernels().hardness_ds_kernel[grid](
                q, Tc, dS, stride, r0, r1, NT, n_col, D, offset, float(scale), float(alpha),
                tid_pos, tid_cand, n_tid, qid_row, qid_cand,
                row_lse_arg, col_lse_arg, g_row_arg, g_col_arg, pos_arg, sigma if scaled else pos_arg,
                s_arg, stride, s_row0,
                BM=BM, BN=BN, BK=cfg.BK, GROUP_M=cfg.DS_GROUP_M,
                HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and has_col, HAS_COL=has_col,
                UPCAST=_upcast(q), PREC=prec, SCALED=scaled, CACHED=mode != "fused",
                # reading S (no K loop): more warps keep the fp32 tile and its epilogue in registers
                num_warps=cfg.DS_WARPS if mode == "fused" else cfg.DSC_WARPS,
                num_stages=cfg.DS_STAGES if mode == "fused" else 1,
            )
            rows = r1 - r0
            Kr = gemm_k(rows)
            if Kr > rows:
                dS[rows:Kr].zero_()  # the dT GEMM's padding rows (a previous strip's rows, or never written)
            # leading dimension ``stride`` (a multiple of 64), K = stride
            _mm_into(dq[r0:r1], dS[:rows], T_op, accumulate=False)  # dq = dS @ T
            q_op = gemm_operand(q[r0:r1], Kr, Dp, dsd)
            _mm_into(dTc, dS[:Kr].t(), q_op, accumulate=True)  # dT += dS^T @ q, K = Kr
        if scaled:
            # the GEMMs summed sigma * dS: one multiply by 1/sigma each (exact, a power of two);
            # dq goes straight to the input dtype in the same pass
            dq = torch.mul(dq[:, :D], inv_sigma, out=torch.empty((B, D), device=dev, dtype=q.dtype))
            dTc.mul_(inv_sigma)
    if dq.shape[1] != D:
        dq = dq[:, :D].contiguous()
    dTc = dTc[:NT, :D]
    return dq, dTc if Dp == D else dTc.contiguous()


_OPS = StripOps(strip_forward, strip_backward)


class TritonHardnessLoss(torch.autograd.Function):
    """Autograd function of the fused Triton backend. Inputs: q, t, negatives, logit-scale tensor
    (or None), target_ids, query_ids, LossConfig, RankComm (or None); returns the loss."""

    @staticmethod
    def forward(ctx, q, t, negatives, scale_t, target_ids, query_ids, cfg: LossConfig, comm):
        return hardness_forward(ctx, _OPS, q, t, negatives, scale_t, target_ids, query_ids, cfg, comm)

    @staticmethod
    def backward(ctx, grad_out):
        return checked_backward(ctx, grad_out, "TritonHardnessLoss")

__all__ = ["TritonHardnessLoss", "strip_forward", "strip_backward", "kernel_config", "launch_config", "available_on",
           "interpreter_clash", "interpreter_active", "KernelConfig", "gpu_config", "autotune_enabled", "TUNE_LOG",
           "strip_rows", "ds_row_stride", "ds_dtype", "FWD_CANDIDATES_GPU", "BWD_CANDIDATES_GPU", "FWD_CANDIDATES_CPU",
           "BWD_CANDIDATES_CPU"]
