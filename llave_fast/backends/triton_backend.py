"""The Triton backend: launchers of the fused kernels and their autograd function.

Runs compiled on CUDA, or on CPU tensors under the Triton interpreter
(``TRITON_INTERPRET=1`` set before triton is first imported). Nothing here touches CUDA
at import time; triton itself is imported on first use.
"""

from __future__ import annotations

import contextlib
import os

import torch

from .common import (
    PATH_COUNTS,
    S_MIN_ROWS,
    LossConfig,
    SPlan,
    StripIds,
    StripOps,
    StripStats,
    checked_backward,
    combine_lse,
    hardness_forward,
    new_output,
    plan_s,
    round_up,
    s_cache_budget,
    s_mode_setting,
    s_row_stride,
    sim_operand_dtype,
    similarity_into,
)
from ..errors import InvalidArgument, InvalidArgumentType

_KERNELS = None
_CONFIG_OVERRIDE: dict | None = None


def _kernels():
    global _KERNELS
    if _KERNELS is None:
        from types import SimpleNamespace

        from llave_fast.kernels.hardness_bwd import hardness_bwd_kernel
        from llave_fast.kernels.hardness_ds import hardness_ds_kernel
        from llave_fast.kernels.hardness_fwd import hardness_fwd_kernel
        from llave_fast.kernels.hardness_stats import hardness_stats_kernel

        _KERNELS = SimpleNamespace(hardness_fwd_kernel=hardness_fwd_kernel, hardness_bwd_kernel=hardness_bwd_kernel,
                                   hardness_ds_kernel=hardness_ds_kernel, hardness_stats_kernel=hardness_stats_kernel)
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


BWD_VARIANTS = ("tiles", "strip")


def _bwd_variant_from_env() -> str | None:
    v = os.environ.get("LLAVE_FAST_BWD", "").strip().lower()
    if not v:
        return None
    if v not in BWD_VARIANTS:
        raise InvalidArgument(f"LLAVE_FAST_BWD must be one of {BWD_VARIANTS}, got {v!r}")
    return v


#: the tile backward is the CUDA default up to this embedding width, the strip backward above.
#: 0: the strip everywhere. Measured on an H200 (benchmarks/results/nvidia-h200/2026-11-29-variants.json,
#: bf16, B = N = 16384): at d = 256 the tile backward took 5.0 ms, the strip 1.5 ms; at d = 1536
#: 47 ms against 4.5 ms (NOTES.md, prediction 10: refuted). d = 128 was not measured.
TILES_MAX_D = 0


def gpu_config(dtype: torch.dtype, sm_count: int = 132, D: int | None = None) -> dict:
    """The fixed default tiles on CUDA (untuned until measured on a GPU: benchmarks/NOTES.md).

    fp32 tiles take twice the shared memory of 16-bit ones: half the K step keeps the
    3-stage forward pipeline at 96 KiB instead of 192 KiB.

    BWD picks the backward: "tiles" (one kernel: recompute, dq read-modify-write, dT
    atomics or the deterministic pair) or "strip" (``hardness_ds``: dS of a strip of rows,
    then dq and dT as two library GEMMs; always deterministic). The CUDA default depends on
    the width D: "tiles" for D <= TILES_MAX_D, where a row block's dq fits on chip and the
    one kernel saves the dS round trip; "strip" above (and when D is not given), where the
    tile backward moves ~20 bytes per FLOP (benchmarks/NOTES.md, predictions 1, 2 and 10).
    A prediction, not yet a measurement. Under the interpreter the default stays "tiles"
    (the CPU suite covers both explicitly).

    Strip sizing (``strip_rows``): the whole B x NT dS in one strip when it fits
    DS_ONE_STRIP_BYTES; else strips of DS_STRIP_BYTES, but at least DS_MIN_ROWS rows (each
    strip re-reads and re-writes the fp32 dT). DS_LOWP: None picks the strip's precision
    from the inputs (``ds_dtype``); True/False force a 16-bit / an fp32 strip.
    """
    bwd = "tiles" if D is not None and D <= TILES_MAX_D else "strip"
    # forward 64 x 128 x 64, 4 warps, 4 stages and the dS kernel's 64 x 128, 4 warps, 4 stages: the
    # fastest of the tuning sweep on an H200 at B = N = 16384, d = 1536, bf16 (two runs agree:
    # forward 2.78 ms against 3.15 ms for the first default 128 x 128 w8 s3, dS + GEMMs 4.28-4.36 ms
    # against 4.80 ms; benchmarks/results/nvidia-h200/2026-11-29-tune*.json)
    return dict(BM=64, BN=128, BK=32 if dtype == torch.float32 else 64, GR_MAX=16,
                GC_MAX=max(1, (4 * sm_count) // 16), num_warps=4, num_stages=4, BWD_BM=64, BWD_BN=64,
                BWD=bwd, DS_BM=64, DS_BN=128, DS_GROUP_M=8, DS_ONE_STRIP_BYTES=1 << 30,
                DS_STRIP_BYTES=256 << 20, DS_MIN_ROWS=4096, DS_STRIP_ROWS=None, DS_LOWP=None, DS_WARPS=4,
                DS_STAGES=4, **_S_PATH_DEFAULTS, DSC_WARPS=8, STATS_BM=64, STATS_BN=64, STATS_WARPS=8,
                STATS_PROGRAMS=8 * sm_count, STATS_GC_MAX=64)


# Where S lives (backends.common.S_MODES): S_MODE None reads LLAVE_FAST_S_MODE (default "auto"),
# S_CACHE_BYTES None reads LLAVE_FAST_S_CACHE_BYTES (default: total device memory / 8).
# The S-cache and stream paths: a library GEMM writes S in fp32, ``hardness_stats`` reduces it
# (STATS_* tiles), the backward's ``hardness_ds`` reads it instead of recomputing (CACHED).
_S_PATH_DEFAULTS = dict(S_MODE=None, S_CACHE_BYTES=None, S_MIN_ROWS=S_MIN_ROWS)


def launch_config(device: torch.device, D: int, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Tile sizes and the forward's program grid caps for embeddings of width ``D`` and ``dtype``."""
    if device.type == "cpu":
        # interpreter: every op is a numpy call, so tiles are moderate and grids small
        cfg = dict(BM=32, BN=32, BK=32, GR_MAX=2, GC_MAX=2, num_warps=4, num_stages=1,
                   BWD="tiles", DS_BM=32, DS_BN=32, DS_GROUP_M=2, DS_ONE_STRIP_BYTES=1 << 20,
                   DS_STRIP_BYTES=1 << 20, DS_STRIP_ROWS=None, DS_LOWP=None, DS_WARPS=4, DS_STAGES=1,
                   **_S_PATH_DEFAULTS, DSC_WARPS=4, STATS_BM=32, STATS_BN=32, STATS_WARPS=4, STATS_PROGRAMS=4,
                   STATS_GC_MAX=2)
    else:
        cfg = gpu_config(dtype, torch.cuda.get_device_properties(device).multi_processor_count, D=D)
    env_bwd = _bwd_variant_from_env()
    if env_bwd is not None:
        cfg["BWD"] = env_bwd
    if _CONFIG_OVERRIDE:
        cfg.update(_CONFIG_OVERRIDE)
    if cfg["BWD"] not in BWD_VARIANTS:
        raise InvalidArgument(f"kernel config BWD must be one of {BWD_VARIANTS}, got {cfg['BWD']!r}")
    return cfg


# --------------------------------------------------------------------------- autotuning
# LLAVE_FAST_AUTOTUNE=1: the first call of each problem class times the candidate configs
# below and keeps the fastest (in this process). Off by default: the fixed configuration
# above is used. An explicit ``kernel_config(...)`` always wins over autotuning.

FWD_CANDIDATES_GPU = [
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    # half the tile per thread: the default spills registers (ptxas, triton 3.6 and 3.9, sm_90)
    dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
    dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4),
    dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=2),
]
BWD_CANDIDATES_GPU = [
    dict(BWD="tiles", BWD_BM=64, BWD_BN=64, BK=64, num_warps=8, num_stages=3),
    dict(BWD="tiles", BWD_BM=64, BWD_BN=64, BK=64, num_warps=4, num_stages=3),
    dict(BWD="tiles", BWD_BM=128, BWD_BN=64, BK=32, num_warps=8, num_stages=2),
    dict(BWD="strip", DS_BM=128, DS_BN=128, BK=64, DS_WARPS=8, DS_STAGES=3),
    dict(BWD="strip", DS_BM=128, DS_BN=128, BK=64, DS_WARPS=4, DS_STAGES=4),
    dict(BWD="strip", DS_BM=128, DS_BN=256, BK=64, DS_WARPS=8, DS_STAGES=3),
    dict(BWD="strip", DS_BM=64, DS_BN=128, BK=64, DS_WARPS=4, DS_STAGES=4),
]
# under the interpreter (tests of the mechanism): small tiles only
FWD_CANDIDATES_CPU = [dict(BM=16, BN=16, BK=16), dict(BM=32, BN=16, BK=32)]
BWD_CANDIDATES_CPU = [dict(BWD="tiles", BWD_BM=16, BWD_BN=16, BK=16),
                      dict(BWD="strip", DS_BM=16, DS_BN=32, BK=16, DS_STRIP_ROWS=32)]

_TUNED: dict = {}
TUNE_LOG: list = []  # one record per tuning: key, every candidate's time or error, the choice


def autotune_enabled() -> bool:
    v = os.environ.get("LLAVE_FAST_AUTOTUNE", "0").strip().lower()
    if v in ("", "0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise InvalidArgument(f"LLAVE_FAST_AUTOTUNE must be 0 or 1, got {v!r}")


def _bucket(n: int) -> int:
    """Problems are tuned per power-of-two size class."""
    return 1 << max(4, (max(1, n) - 1).bit_length())


def _candidates(kind: str, dtype: torch.dtype, device: torch.device) -> list[dict]:
    if device.type == "cpu":
        return FWD_CANDIDATES_CPU if kind == "fwd" else BWD_CANDIDATES_CPU
    cands = FWD_CANDIDATES_GPU if kind == "fwd" else BWD_CANDIDATES_GPU
    if dtype == torch.float32:  # fp32 tiles need twice the shared memory: halve the K step
        cands = [{**c, "BK": min(c.get("BK", 64), 32)} for c in cands]
    return cands


def _time_call(fn, device: torch.device, repeats: int = 5) -> float:
    """Median milliseconds of ``fn()`` after one untimed call (which compiles)."""
    import statistics
    import time

    fn()
    out = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def _tuned_override(kind: str, q: torch.Tensor, NT: int, flags: tuple, run) -> dict | None:
    """The fastest candidate for this problem class (tuning it on first sight), or None when
    autotuning is off or an explicit kernel_config is in force."""
    if _CONFIG_OVERRIDE is not None or not autotune_enabled():
        return None
    dev = q.device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "interpreter"
    key = (kind, name, str(q.dtype), q.shape[1], _bucket(q.shape[0]), _bucket(NT), flags)
    if key in _TUNED:
        return _TUNED[key]
    import sys

    record = {"key": key, "candidates": []}
    best, best_ms = None, float("inf")
    for cand in _candidates(kind, q.dtype, dev):
        try:
            with kernel_config(**cand):
                ms = _time_call(run, dev)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
            record["candidates"].append({"config": cand, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        record["candidates"].append({"config": cand, "ms": ms})
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        raise RuntimeError(f"llave-fast autotune: no {kind} candidate ran for {key}: {record['candidates']}")
    record.update(choice=best, ms=best_ms)
    TUNE_LOG.append(record)
    _TUNED[key] = best
    print(f"llave-fast autotune: {kind} {q.dtype} B~{key[4]} N~{key[5]} d={key[3]}: {best} ({best_ms:.3f} ms, "
          f"{len(record['candidates'])} candidates)", file=sys.stderr)
    return best


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


def s_plan_for(cfg: dict, B: int, NT: int, device: torch.device, keep: bool) -> SPlan:
    """The path of this strip under launch config ``cfg`` (see ``backends.common.plan_s``)."""
    return plan_s(B, NT, keep=keep, mode=s_mode_setting(cfg.get("S_MODE")),
                  budget=s_cache_budget(device, cfg.get("S_CACHE_BYTES")),
                  min_rows=int(cfg.get("S_MIN_ROWS", S_MIN_ROWS)))


def strip_forward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, need_col, need_e,
                  keep_s: bool = False) -> StripStats:
    """Row and column statistics of the strip. ``keep_s``: a backward follows, so an fp32 S
    that fits the budget is kept for it (the S-cache path)."""
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    cfg = launch_config(dev, D, q.dtype)
    autotune_enabled()  # a bad LLAVE_FAST_AUTOTUNE is an error on every path, not only where it is read
    plan = s_plan_for(cfg, B, NT, dev, keep_s)
    if plan.mode != "fused":
        PATH_COUNTS[plan.mode] += 1
        return _strip_forward_s(q, Tc, cfg, plan, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                                need_col=need_col, need_e=need_e)
    PATH_COUNTS["fused"] += 1
    tuned = _tuned_override(
        "fwd", q, NT, (ids.has_tid, ids.has_qid, need_col, need_e),
        lambda: strip_forward(q, Tc, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                              need_col=need_col, need_e=need_e))
    if tuned:
        cfg.update(tuned)
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
    return StripStats(row_lse, row_es, col_lse, col_es, plan=plan)


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
    BM, BN = cfg["STATS_BM"], cfg["STATS_BN"]
    n_cb = triton_cdiv(NT, BN)
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
            n_rt = triton_cdiv(r1 - r0, BM)
            GC = max(1, min(n_cb, int(cfg["STATS_GC_MAX"]), triton_cdiv(int(cfg["STATS_PROGRAMS"]), n_rt)))
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
                NEED_E=need_e, num_warps=cfg["STATS_WARPS"],
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


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def strip_backward(q, Tc, *, n_col, offset, scale, alpha, ids: StripIds, row_lse, col_lse, g_row, g_col,
                   pos_coef, deterministic, s_cache=None, s_plan: SPlan | None = None):
    """dq and dTc of the strip. The path is the forward's (``s_plan``): the kept S
    (``s_cache``), fp32 blocks recomputed by the library GEMM ("stream"), or the fused kernels
    ("fused", or no plan: the tile or the strip backward, cfg["BWD"])."""
    _check_dtype(q)
    q, Tc = q.contiguous(), Tc.contiguous()
    B, D = q.shape
    NT = Tc.shape[0]
    dev = q.device
    cfg = launch_config(dev, D, q.dtype)
    if s_plan is not None and s_plan.mode != "fused":
        if s_plan.mode == "cache" and s_cache is None:
            raise RuntimeError("the S-cache forward kept no S for this backward (internal error)")
        return _strip_backward_ds(q, Tc, cfg, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                                  row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col, pos_coef=pos_coef,
                                  s_cache=s_cache, s_plan=s_plan)
    tuned = _tuned_override(
        "bwd", q, NT, (ids.has_tid, ids.has_qid, g_col is not None, bool(deterministic)),
        lambda: strip_backward(q, Tc, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                               row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col,
                               pos_coef=pos_coef, deterministic=deterministic))
    if tuned:
        cfg.update(tuned)
    if cfg["BWD"] == "strip":
        return _strip_backward_ds(q, Tc, cfg, n_col=n_col, offset=offset, scale=scale, alpha=alpha, ids=ids,
                                  row_lse=row_lse, col_lse=col_lse, g_row=g_row, g_col=g_col, pos_coef=pos_coef)
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
                pos_coef.float().contiguous(), dq, dTc,
                MODE=mode, BM=BM, BN=BN, BK=cfg["BK"],
                HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and has_col, HAS_COL=has_col,
                UPCAST=_upcast(q), DS_LOWP=ds_lowp, PREC=prec,
                num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
            )
    return dq, dTc




def ds_row_stride(NT: int) -> int:
    """Elements between consecutive rows of the dS strip buffer: NT rounded up to a multiple
    of common.ROW_ALIGN (64). Every row then starts 128-byte aligned (16-bit), so the kernel's
    stores vectorise and the library GEMMs get an aligned leading dimension for any NT
    (hard negatives, uneven ranks); they read the ``[:rows, :stride]`` view (the kernel writes
    exact zeros past NT), so their K is a multiple of 64 too. The kept / streamed fp32 S has the
    same stride (``common.s_row_stride``)."""
    return s_row_stride(NT)


# The library GEMMs of the strip backward get their inner dimension (K: NT for dq, the strip's rows
# for dT) padded with exact zeros to a multiple of GEMM_K_ALIGN (of GEMM_LD_ALIGN when K < 64), and
# every leading dimension to a multiple of GEMM_LD_ALIGN: cuBLAS was 2-6x slower with an odd K
# (H200, NT = 16383; NOTES.md).
GEMM_K_ALIGN = 64
GEMM_LD_ALIGN = 8


def gemm_k(n: int) -> int:
    """An inner dimension of ``n`` as the library GEMMs get it: a multiple of GEMM_K_ALIGN, or of
    GEMM_LD_ALIGN below that (a thin strip would otherwise take several times its own memory)."""
    return round_up(n, GEMM_K_ALIGN if n >= GEMM_K_ALIGN else GEMM_LD_ALIGN)


def gemm_operand(x: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a ``rows`` x ``cols`` GEMM operand of ``dtype``: zero rows below and zero columns to
    the right (they add exact zeros to every product), or ``x`` itself (cast) when it has that shape."""
    r, c = x.shape
    if (r, c) == (rows, cols):
        return x if x.dtype == dtype else x.to(dtype)
    out = torch.zeros((rows, cols), dtype=dtype, device=x.device)
    out[:r, :c] = x
    return out


def strip_rows(cfg: dict, B: int, NT: int, ds_bytes: int) -> int:
    """Rows per dS strip (each row takes ``ds_row_stride(NT) * ds_bytes`` bytes):

    * DS_STRIP_ROWS if set;
    * else all B rows (one strip) when the whole padded B x NT dS fits DS_ONE_STRIP_BYTES;
    * else as many as DS_STRIP_BYTES holds, a multiple of the row tile, but at least one
      tile and DS_MIN_ROWS rows (each strip re-reads and re-writes the fp32 dT: very thin
      strips at huge N would spend more time there than in the GEMMs);

    never more than B."""
    if cfg.get("DS_STRIP_ROWS") is not None:
        r = int(cfg["DS_STRIP_ROWS"])
        if r < 1:
            raise InvalidArgument(f"kernel config DS_STRIP_ROWS must be >= 1, got {r}")
        return min(B, r)
    row_bytes = ds_row_stride(NT) * ds_bytes
    if B * row_bytes <= int(cfg.get("DS_ONE_STRIP_BYTES", 0)):
        return B
    bm = cfg["DS_BM"]
    r = int(cfg["DS_STRIP_BYTES"]) // row_bytes
    r = max(bm, int(cfg.get("DS_MIN_ROWS", 0)), (r // bm) * bm)
    return min(B, r)


def ds_dtype(cfg: dict, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dS strip's precision: the inputs' 16-bit type (fp16 scaled by sigma, see
    ``hardness_ds``), fp32 for fp32 inputs. DS_LOWP True/False forces a 16-bit/fp32 strip.

    Under the interpreter (CPU) the default for bf16 is an fp32 strip: the interpreter
    rounds fp32 to bf16 by truncation, not to nearest as the GPU does, so a bf16 strip there
    would not test the GPU's numerics (tests force it with DS_LOWP=True to cover the path).
    fp16 conversion and fp16 values are exact under the interpreter: fp16 runs its real path."""
    lowp = cfg.get("DS_LOWP")
    if dtype == torch.float32 or lowp is False:
        return torch.float32
    if lowp is None and dtype == torch.bfloat16 and device.type != "cuda":
        return torch.float32
    return dtype


# fp16 strip: sigma * max|dS| in [2^14, 2^15); sigma clamped to 2^+-SIGMA_MAX_EXP (1/sigma stays a
# normal fp32 and s * sigma finite for any s < 2^27)
SIGMA_MAX_EXP = 100


def ds_scale(g_row: torch.Tensor, g_col: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, 1/sigma) of the fp16 strip as one-element fp32 tensors, computed on the device
    (no host sync). |dS_ij| <= M = |s| (max|g_row| + max|g_col|) (``hardness_ds``); with
    M = m 2^e, m in [0.5, 1): sigma = 2^(15 - e), so sigma * M in [2^14, 2^15). Both are
    built from their exponent bits: exact powers of two. M = 0 (g all zero) gives e = 0; a
    NaN/inf in g gives e = 0 too, and the kernel's own arithmetic carries the NaN/inf."""
    m = g_row.abs().amax()
    if g_col is not None:
        m = m + g_col.abs().amax()
    m = (m * abs(float(scale))).reshape(1)
    _, e = torch.frexp(m)
    e = torch.clamp(15 - e.to(torch.int32), -SIGMA_MAX_EXP, SIGMA_MAX_EXP)
    sigma = torch.bitwise_left_shift(e + 127, 23).view(torch.float32)
    inv_sigma = torch.bitwise_left_shift(127 - e, 23).view(torch.float32)
    return sigma, inv_sigma


# How to add a 16-bit GEMM into an fp32 accumulator on this torch: decided on first use.
_ACC_MM = None


def _probe_acc_mm(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest form this torch accepts: "addmm" (cuBLAS C = A B + beta C with fp32 C in one
    pass, torch >= 2.8 on CUDA), "mm" (fp32 product, then added), or "cast" (16-bit product,
    cast, added). Checked numerically on 16 x 16 operands as they are used: a transposed first
    operand, beta = 1 accumulating, and beta = 0 over a NaN-filled output (which must not be
    read)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(16, 16, generator=g, device=device).to(dtype)
    b = torch.randn(16, 16, generator=g, device=device).to(dtype)
    want = a.t().double() @ b.double()

    def close(x, ref):
        return x.dtype == torch.float32 and bool(torch.allclose(x.double(), ref, rtol=1e-3, atol=1e-3))

    try:
        c = torch.ones(16, 16, device=device)
        torch.addmm(c, a.t(), b, beta=1, out_dtype=torch.float32, out=c)
        z = torch.full((16, 16), float("nan"), device=device)
        torch.addmm(z, a.t(), b, beta=0, out_dtype=torch.float32, out=z)
        if close(c, want + 1) and close(z, want):
            return "addmm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        if close(torch.mm(a.t(), b, out_dtype=torch.float32), want):
            return "mm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return "cast"


def _mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """dst = a @ b  or  dst += a @ b, with 16-bit operands kept on the tensor cores and the
    product never rounded to 16 bits where torch allows (see ``_probe_acc_mm``). dst is
    fp32, or (``accumulate=False``) of the operands' dtype: one GEMM, rounded once."""
    global _ACC_MM
    if a.dtype == dst.dtype:
        if accumulate:
            dst.addmm_(a, b)
        else:
            torch.mm(a, b, out=dst)
        return
    if _ACC_MM is None:
        _ACC_MM = _probe_acc_mm(a.device, a.dtype)
    if _ACC_MM == "addmm":
        torch.addmm(dst, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=dst)
        return
    if _ACC_MM == "mm":
        prod = torch.mm(a, b, out_dtype=torch.float32)
    elif a.dtype == torch.float16:
        # no fp32-output GEMM on this torch/device (the CPU, torch < 2.8): an fp16 product
        # of the scaled strip could overflow fp16 (a row of dS sums to more than its max),
        # so multiply in fp32 (exact products, fp32 sums: what the tensor cores do)
        prod = torch.mm(a.float(), b.float())
    else:
        prod = torch.mm(a, b).float()
    if accumulate:
        dst += prod
    else:
        dst.copy_(prod)


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
    BM, BN = cfg["DS_BM"], cfg["DS_BN"]
    n_ct = triton_cdiv(stride, BN)  # every column of the row stride is written (0 past NT)
    with _enter(dev):
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            grid = (triton_cdiv(r1 - r0, BM) * n_ct,)
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
                BM=BM, BN=BN, BK=cfg["BK"], GROUP_M=cfg["DS_GROUP_M"],
                HAS_TID=ids.has_tid, HAS_QID=ids.has_qid and has_col, HAS_COL=has_col,
                UPCAST=_upcast(q), PREC=prec, SCALED=scaled, CACHED=mode != "fused",
                # reading S (no K loop): more warps keep the fp32 tile and its epilogue in registers
                num_warps=cfg["DS_WARPS"] if mode == "fused" else cfg["DSC_WARPS"],
                num_stages=cfg["DS_STAGES"] if mode == "fused" else 1,
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

__all__ = ["TritonHardnessLoss", "strip_forward", "strip_backward", "kernel_config", "available_on",
           "autotune_enabled", "TUNE_LOG", "gpu_config", "launch_config", "strip_rows", "ds_row_stride", "ds_dtype"]
