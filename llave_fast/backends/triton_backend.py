"""The Triton backend: launchers of the fused kernels and their autograd function.

Runs compiled on CUDA, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Nothing here touches CUDA
at import time; triton itself is imported on first use.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .common import StripIds, StripStats, combine_lse, make_loss_function, new_output

_KERNELS = None
_CONFIG_OVERRIDE: dict | None = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from llave_fast import kernels

        _KERNELS = kernels
    return _KERNELS


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_on(device: torch.device) -> tuple[bool, str]:
    """Whether the kernels can run on ``device``, and why not."""
    try:
        import triton  # noqa: F401
    except ImportError as exc:  # pragma: no cover - triton is a dependency
        return False, f"triton is not importable ({exc})"
    if device.type == "cuda":
        return True, ""
    if device.type == "cpu" and interpreter_active():
        return True, ""
    return False, (
        f"the triton backend runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 set "
        f"before triton is imported; got tensors on {device}"
    )


@contextlib.contextmanager
def kernel_config(**cfg):
    """Force block sizes / grid caps (tests use it to cover multi-block and multi-group paths)."""
    global _CONFIG_OVERRIDE
    old = _CONFIG_OVERRIDE
    _CONFIG_OVERRIDE = dict(cfg)
    try:
        yield
    finally:
        _CONFIG_OVERRIDE = old


def gpu_config(dtype: torch.dtype, sm_count: int = 132) -> dict:
    """The fixed default tiles on CUDA (tuning them per architecture is the GPU issue's work).

    fp32 tiles take twice the shared memory of 16-bit ones: half the K step keeps the
    3-stage forward pipeline at 96 KiB instead of 192 KiB.
    """
    return dict(BM=128, BN=128, BK=32 if dtype == torch.float32 else 64, GR_MAX=16,
                GC_MAX=max(1, (4 * sm_count) // 16), num_warps=8, num_stages=3, BWD_BM=64, BWD_BN=64)


def launch_config(device: torch.device, B: int, NT: int, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and the forward's program grid caps for this problem."""
    if device.type == "cpu":
        # interpreter: every op is a numpy call, so tiles are moderate and grids small
        cfg = dict(BM=32, BN=32, BK=32, GR_MAX=2, GC_MAX=2, num_warps=4, num_stages=1)
    else:
        cfg = gpu_config(dtype, torch.cuda.get_device_properties(device).multi_processor_count)
    if _CONFIG_OVERRIDE:
        cfg.update(_CONFIG_OVERRIDE)
    return cfg


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
        raise TypeError(
            f"the triton backend takes bfloat16, float16 or float32 embeddings, got {q.dtype}; "
            "use backend='torch' for float64"
        )


def strip_forward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e) -> StripStats:
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    cfg = launch_config(dev, B, NT, D, q.dtype)
    BM, BN = cfg["BM"], cfg["BN"]
    GR = max(1, min(triton_cdiv(B, BM), cfg["GR_MAX"]))
    GC = max(1, min(triton_cdiv(NT, BN), cfg["GC_MAX"]))
    row_m = new_output((GC, B), dev)
    row_l = new_output((GC, B), dev)
    row_e = new_output((GC, B), dev) if need_e else row_l
    if need_col:
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
            BM=BM, BN=BN, BK=cfg["BK"],
            HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and need_col, NEED_COL=need_col, NEED_E=need_e,
            UPCAST=_upcast(q), PREC=_precision(q),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )
    row_lse, row_es = combine_lse(row_m + torch.log(row_l), (row_e / row_l) if need_e else None, dim=0)
    col_lse = col_es = None
    if need_col:
        col_lse, col_es = combine_lse(col_m + torch.log(col_l), (col_e / col_l) if need_e else None, dim=0)
    return StripStats(row_lse, row_es, col_lse, col_es)


def _upcast(q) -> bool:
    # the interpreter computes garbage on bf16 values; on GPU keep tensor-core operands
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def strip_backward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col, deterministic):
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    cfg = launch_config(dev, B, NT, D, q.dtype)
    BM, BN = cfg.get("BWD_BM", cfg["BM"]), cfg.get("BWD_BN", cfg["BN"])
    dq = torch.zeros((B, D), device=dev, dtype=torch.float32)
    dTc = torch.zeros((NT, D), device=dev, dtype=torch.float32)
    dummy = torch.zeros(1, dtype=torch.int64, device=dev)
    tid_pos, tid_cand, n_tid, qid_row, qid_cand = _id_args(ids, dummy)
    has_col = g_col is not None
    col_lse_arg = col_lse.float().contiguous() if has_col else row_lse
    g_col_arg = g_col.float().contiguous() if has_col else g_row
    n_rb, n_cb = triton_cdiv(B, BM), triton_cdiv(NT, BN)
    # fp16's range is too small for dS (s * P * g can be ~1e-9): keep it fp32 (tf32 GEMMs)
    ds_lowp = q.dtype == torch.bfloat16 and dev.type == "cuda"
    prec = "tf32" if (q.dtype == torch.float16 and dev.type == "cuda") else _precision(q)
    # deterministic: row owners for dq, column owners for dT; else row owners + atomic dT
    modes = [(1, n_rb), (2, n_cb)] if deterministic else [(0, n_rb)]
    with _enter(dev):
        for mode, grid in modes:
            _kernels().hardness_bwd_kernel[(grid,)](
                q, Tc, B, NT, n_col, D, offset, float(scale), float(alpha),
                tid_pos, tid_cand, n_tid, qid_row, qid_cand,
                row_lse.float().contiguous(), col_lse_arg, g_row.float().contiguous(), g_col_arg,
                dq, dTc,
                MODE=mode, BM=BM, BN=BN, BK=cfg["BK"],
                HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and has_col, HAS_COL=has_col,
                UPCAST=_upcast(q), DS_LOWP=ds_lowp, PREC=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
    return dq, dTc


TritonHardnessLoss = make_loss_function(
    "TritonHardnessLoss", strip_forward, strip_backward, "Autograd function of the fused Triton backend."
)

__all__ = ["TritonHardnessLoss", "strip_forward", "strip_backward", "kernel_config", "available_on"]
