"""The fused backends' launch configuration: one typed, validated ``KernelConfig``.

Where a value comes from, first match wins:

1. ``kernel_config(**overrides)`` (``triton_backend``), a context manager: its keywords are
   ``KernelConfig`` field names, checked when the ``with`` is entered;
2. a tuned configuration, only when autotuning was asked for (``kernel_config(autotune=True)``,
   or ``LLAVE_FAST_AUTOTUNE=1`` with no override in force);
3. the fixed default of the device (``default_config``): the tuned GPU tiles on CUDA
   (``gpu_config``), small tiles under the Triton interpreter (``interpreter_config``). Both
   make the same choices of backward and of where S lives; only tile sizes, warps, stages and
   grid caps differ.

The environment is read when a value is needed (every call), never at import, so
``monkeypatch.setenv`` works and a long-lived process sees a changed variable.

Environment variables (all optional):

=====================================  ==========================================================
``LLAVE_FAST_S_MODE``                  where S lives when ``S_MODE`` is None: auto (default),
                                       cache, stream or fused (``backends.common.S_MODES``)
``LLAVE_FAST_S_CACHE_BYTES``           the byte budget of the kept / streamed fp32 S when
                                       ``S_CACHE_BYTES`` is None (``4096``, ``512M``, ``2G``);
                                       default: the device's total memory / 8
``LLAVE_FAST_AUTOTUNE``                ``1``: time the candidate tiles on the first call of each
                                       problem class and keep the fastest (``autotune`` None and
                                       no override in force); ``0`` (default): the fixed config
``LLAVE_FAST_TORCH_CHUNK_ELEMS``       the torch backend's chunk (elements of one chunk x NT
                                       fp32 temporary) on the CPU when ``TORCH_CHUNK_ELEMS`` is
                                       None; default 2^21 (8 MiB)
``LLAVE_FAST_TORCH_CHUNK_ELEMS_CUDA``  the same on CUDA; default 2^26 (256 MiB)
``LLAVE_FAST_POISON``                  ``1``: fill fresh outputs with NaN (tests: an element a
                                       kernel should write and does not shows)
``TRITON_INTERPRET``                   ``1`` before triton is imported: the kernels run on CPU
                                       tensors (the test suite); not ours, Triton's
=====================================  ==========================================================

(``LLAVE_FAST_COMPILED``, ``LLAVE_FAST_LATEST`` and ``LLAVE_FAST_WARM_OPS_DIR`` belong to the
test suite, ``scripts/setup.sh`` and ``llave_fast.testing``; they change no kernel launch.)
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, fields, replace

import torch

from ..errors import InvalidArgument, InvalidArgumentType
from .common import S_MIN_ROWS, S_MODES, parse_bytes

log = logging.getLogger(__name__)

#: the one backward of the Triton backend (``hardness_ds`` + two library GEMMs)
BWD_VARIANTS = ("strip",)
#: where the fused forward keeps its column partials (``KernelConfig.FWD_COL``)
FWD_COL_MODES = ("program", "tile", "transpose")


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclass(frozen=True)
class KernelConfig:
    """Tiles, grids and paths of one launch of the fused backends. Field by field:

    ========================  ===============================================================
    forward, "fused" path (``hardness_fwd``: one pass over tiles of S recomputed on chip)
    ``BM``                    row tile (power of two >= 16)
    ``BN``                    column tile (power of two >= 16)
    ``BK``                    K step over the embedding width, shared by every kernel that
                              recomputes S (power of two >= 16)
    ``GR_MAX``                most row program groups of the forward's grid (>= 1)
    ``GC_MAX``                most column program groups (>= 1)
    ``num_warps``             warps of the forward kernel (a power of two up to 32, as every
                              ``*_WARPS``)
    ``num_stages``            software pipeline stages of the forward kernel (>= 1)
    ``FWD_COL``               its column statistics: "program" (one partial row per row
                              program group, read-modified-written by every tile behind a
                              barrier), "tile" (one per row tile, written once, no read
                              back: B / BM partial rows, N x B / BM floats per statistic) or
                              "transpose" (a second, row-only sweep over S^T: no column
                              reductions, S computed twice)
    backward (``hardness_ds``: dS of a strip of rows, then dq and dT as two library GEMMs)
    ``BWD``                   the backward: "strip", the only one (the former tile backward was
                              slower at every measured width, benchmarks/NOTES.md)
    ``DS_BM``                 the dS kernel's row tile (power of two >= 16)
    ``DS_BN``                 its column tile (power of two >= 16)
    ``DS_GROUP_M``            row tiles that walk the column tiles together (L2 reuse, >= 1)
    ``DS_WARPS``              warps of the dS kernel when it recomputes S
    ``DS_STAGES``             its pipeline stages
    ``DSC_WARPS``             warps of the dS kernel when it reads a kept / streamed S
    ``DS_ONE_STRIP_BYTES``    the whole B x NT dS in one strip when it fits this (>= 0)
    ``DS_STRIP_BYTES``        else strips of this many bytes (>= 0) ...
    ``DS_MIN_ROWS``           ... but at least this many rows (>= 0)
    ``DS_STRIP_ROWS``         rows per strip, forced (None: by the bytes above; else >= 1)
    ``DS_LOWP``               None: the strip's precision from the inputs (``ds_dtype``);
                              True / False: a 16-bit / an fp32 strip
    where S lives (``backends.common.plan_s``)
    ``S_MODE``                None: ``LLAVE_FAST_S_MODE``, else "auto"; or one of S_MODES
    ``S_CACHE_BYTES``         None: ``LLAVE_FAST_S_CACHE_BYTES``, else total memory / 8; or a
                              byte count (int >= 0, or "512M")
    ``S_MIN_ROWS``            the smallest stream block "auto" takes; below it, "fused" (>= 1)
    statistics pass of the cache / stream forward (``hardness_stats``)
    ``STATS_BM``              its row tile (power of two >= 16)
    ``STATS_BN``              its column tile (power of two >= 16)
    ``STATS_WARPS``           its warps
    ``STATS_PROGRAMS``        about how many programs its grid aims at (>= 1)
    ``STATS_GC_MAX``          most column program groups (>= 1)
    torch backend
    ``TORCH_CHUNK_ELEMS``     elements of one chunk x NT temporary (None: the environment, then
                              2^21 on the CPU, 2^26 on CUDA; else >= 1)
    tuning
    ``autotune``              None: ``LLAVE_FAST_AUTOTUNE`` when no override is in force (an
                              override's tiles are what was asked for); True / False: tune / not
    ========================  ===============================================================

    The defaults of the class are the CUDA defaults for 16-bit inputs on a 132-SM GPU
    (``gpu_config``); ``default_config`` adapts them to the device and dtype.
    """

    BM: int = 64
    BN: int = 128
    BK: int = 64
    GR_MAX: int = 16
    GC_MAX: int = 33
    num_warps: int = 4
    num_stages: int = 4
    FWD_COL: str = "program"
    BWD: str = "strip"
    DS_BM: int = 64
    DS_BN: int = 128
    DS_GROUP_M: int = 8
    DS_WARPS: int = 4
    DS_STAGES: int = 4
    DSC_WARPS: int = 8
    DS_ONE_STRIP_BYTES: int = 1 << 30
    DS_STRIP_BYTES: int = 256 << 20
    DS_MIN_ROWS: int = 4096
    DS_STRIP_ROWS: int | None = None
    DS_LOWP: bool | None = None
    S_MODE: str | None = None
    S_CACHE_BYTES: int | str | None = None
    S_MIN_ROWS: int = S_MIN_ROWS
    STATS_BM: int = 64
    STATS_BN: int = 64
    STATS_WARPS: int = 8
    STATS_PROGRAMS: int = 8 * 132
    STATS_GC_MAX: int = 64
    TORCH_CHUNK_ELEMS: int | None = None
    autotune: bool | None = None

    def __post_init__(self):
        for name in ("BM", "BN", "BK", "DS_BM", "DS_BN", "STATS_BM", "STATS_BN"):
            v = _int_field(self, name)
            if v < 16 or not _is_pow2(v):
                raise InvalidArgument(f"kernel config {name} must be a power of two >= 16, got {v!r}")
        for name in ("num_warps", "DS_WARPS", "DSC_WARPS", "STATS_WARPS"):
            v = _int_field(self, name)
            if not _is_pow2(v) or v > 32:
                raise InvalidArgument(f"kernel config {name} must be a power of two from 1 to 32, got {v!r}")
        for name in ("GR_MAX", "GC_MAX", "num_stages", "DS_GROUP_M", "DS_STAGES", "S_MIN_ROWS", "STATS_PROGRAMS",
                     "STATS_GC_MAX"):
            if _int_field(self, name) < 1:
                raise InvalidArgument(f"kernel config {name} must be >= 1, got {getattr(self, name)!r}")
        for name in ("DS_ONE_STRIP_BYTES", "DS_STRIP_BYTES", "DS_MIN_ROWS"):
            if _int_field(self, name) < 0:
                raise InvalidArgument(f"kernel config {name} must be >= 0, got {getattr(self, name)!r}")
        for name in ("DS_STRIP_ROWS", "TORCH_CHUNK_ELEMS"):
            if getattr(self, name) is not None and _int_field(self, name) < 1:
                raise InvalidArgument(f"kernel config {name} must be None or >= 1, got {getattr(self, name)!r}")
        for name in ("DS_LOWP", "autotune"):
            v = getattr(self, name)
            if v is not None and not isinstance(v, bool):
                raise InvalidArgumentType(f"kernel config {name} must be None, True or False, got {v!r}")
        if self.FWD_COL not in FWD_COL_MODES:
            raise InvalidArgument(f"kernel config FWD_COL must be one of {FWD_COL_MODES}, got {self.FWD_COL!r}")
        if self.BWD not in BWD_VARIANTS:
            raise InvalidArgument(
                f"kernel config BWD must be one of {BWD_VARIANTS}, got {self.BWD!r} (the tile backward was removed: "
                "the strip backward was faster at every measured width, benchmarks/NOTES.md)")
        if self.S_MODE is not None and self.S_MODE not in S_MODES:
            raise InvalidArgument(f"kernel config S_MODE must be None or one of {S_MODES}, got {self.S_MODE!r}")
        b = self.S_CACHE_BYTES
        if isinstance(b, str):
            parse_bytes(b, "kernel config S_CACHE_BYTES")
        elif b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise InvalidArgument(f"kernel config S_CACHE_BYTES must be None or a byte count >= 0, got {b!r}")

    def replace(self, **changes) -> "KernelConfig":
        """A copy with ``changes`` (field names, checked: an unknown name raises InvalidArgument)."""
        check_names(changes)
        return replace(self, **changes)


FIELD_NAMES = tuple(f.name for f in fields(KernelConfig))


def _int_field(cfg: KernelConfig, name: str) -> int:
    v = getattr(cfg, name)
    if isinstance(v, bool) or not isinstance(v, int):
        raise InvalidArgumentType(f"kernel config {name} must be an int, got {v!r}")
    return v


def check_names(overrides: dict) -> None:
    """Raise InvalidArgument naming every keyword that is not a KernelConfig field."""
    unknown = sorted(set(overrides) - set(FIELD_NAMES))
    if unknown:
        raise InvalidArgument(f"kernel_config got unknown keyword(s) {unknown}; valid names: {', '.join(FIELD_NAMES)}")


def gpu_config(dtype: torch.dtype, sm_count: int = 132) -> KernelConfig:
    """The fixed default on CUDA for inputs of ``dtype`` on a GPU with ``sm_count`` SMs.

    fp32 inputs take BK = 32 (fp32 tiles need twice the shared memory of 16-bit ones); the
    forward's column groups (GC_MAX) and the statistics pass's programs scale with the SM
    count. Where the constants come from: benchmarks/NOTES.md, "Launch configuration: why
    these constants"."""
    return KernelConfig(BK=32 if dtype == torch.float32 else 64, GC_MAX=max(1, (4 * sm_count) // 16),
                        STATS_PROGRAMS=8 * sm_count)


def interpreter_config() -> KernelConfig:
    """The default under the Triton interpreter (CPU tensors): ``gpu_config``'s choices of
    backward, strip sizing and where S lives, with small tiles, one stage and small grids
    (every interpreted op is a numpy call over a whole tile)."""
    return replace(gpu_config(torch.float32, sm_count=1), BM=32, BN=32, BK=32, GR_MAX=2, GC_MAX=2, num_stages=1,
                   DS_BM=32, DS_BN=32, DS_GROUP_M=2, DS_STAGES=1, DSC_WARPS=4, STATS_BM=32, STATS_BN=32,
                   STATS_WARPS=4, STATS_PROGRAMS=4, STATS_GC_MAX=2)


#: the fields that decide which backward runs and where S lives: the same on every device
PATH_FIELDS = ("BWD", "S_MODE", "S_CACHE_BYTES", "S_MIN_ROWS", "DS_ONE_STRIP_BYTES", "DS_STRIP_BYTES",
               "DS_MIN_ROWS", "DS_STRIP_ROWS", "DS_LOWP")


def default_config(device: torch.device, dtype: torch.dtype) -> KernelConfig:
    """The fixed default for tensors of ``dtype`` on ``device`` (no override, no tuning)."""
    if device.type == "cuda":
        return gpu_config(dtype, torch.cuda.get_device_properties(device).multi_processor_count)
    return interpreter_config()


def with_overrides(cfg: KernelConfig, overrides: dict | None) -> KernelConfig:
    """``cfg`` with ``overrides`` (a kernel_config's keywords) applied and checked."""
    if not overrides:
        return cfg
    check_names(overrides)
    return replace(cfg, **overrides)


# --------------------------------------------------------------------------- environment
def env_flag(name: str, default: bool = False) -> bool:
    v = os.environ.get(name, "").strip().lower()
    if v == "":
        return default
    if v in ("0", "false", "no", "off"):
        return False
    if v in ("1", "true", "yes", "on"):
        return True
    raise InvalidArgument(f"{name} must be 0 or 1, got {v!r}")


def autotune_enabled() -> bool:
    """``LLAVE_FAST_AUTOTUNE``, read now."""
    return env_flag("LLAVE_FAST_AUTOTUNE")


#: the torch backend's default chunk: elements of one chunk x NT fp32 temporary (a few live at
#: once). On the CPU a chunk stays near the caches (8 MiB); on CUDA it is large enough that the
#: GEMMs fill the GPU and the chunk loop's launches do not dominate (256 MiB per temporary).
TORCH_CHUNK_ELEMS = {"cpu": 1 << 21, "cuda": 1 << 26}


def torch_chunk_elems(device: torch.device, setting: int | None = None) -> int:
    """The torch backend's chunk on ``device``: ``setting`` (a kernel_config's TORCH_CHUNK_ELEMS),
    else ``LLAVE_FAST_TORCH_CHUNK_ELEMS`` (``..._CUDA`` on CUDA), read now, else the default."""
    if setting is not None:
        return int(setting)
    cuda = torch.device(device).type == "cuda"
    name = "LLAVE_FAST_TORCH_CHUNK_ELEMS_CUDA" if cuda else "LLAVE_FAST_TORCH_CHUNK_ELEMS"
    v = os.environ.get(name, "").strip()
    if not v:
        return TORCH_CHUNK_ELEMS["cuda" if cuda else "cpu"]
    try:
        n = int(v)
    except ValueError:
        n = 0
    if n < 1:
        raise InvalidArgument(f"{name} must be a whole number of elements >= 1, got {v!r}")
    return n


# --------------------------------------------------------------------------- autotuning
# Candidates: field overrides timed against each other on the first call of a problem class.
FWD_CANDIDATES_GPU = [
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=3),
    # half the tile per thread: the 128 x 128 tile spills registers (ptxas, triton 3.6 and 3.9, sm_90)
    dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3),
    dict(BM=64, BN=128, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=64, BK=64, num_warps=4, num_stages=4),
    dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4),
    dict(BM=128, BN=256, BK=64, num_warps=8, num_stages=3),
    dict(BM=128, BN=128, BK=128, num_warps=8, num_stages=2),
    # the column statistics from partials written once per row tile (no read-back barrier), or from
    # a second row-only sweep over S^T (no cross-warp column reductions) (NOTES.md, Prediction 15)
    dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4, FWD_COL="tile"),
    dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3, FWD_COL="tile"),
    dict(BM=64, BN=128, BK=64, num_warps=4, num_stages=4, FWD_COL="transpose"),
    dict(BM=128, BN=64, BK=64, num_warps=8, num_stages=3, FWD_COL="transpose"),
]
BWD_CANDIDATES_GPU = [
    dict(DS_BM=128, DS_BN=128, BK=64, DS_WARPS=8, DS_STAGES=3),
    dict(DS_BM=128, DS_BN=128, BK=64, DS_WARPS=4, DS_STAGES=4),
    dict(DS_BM=128, DS_BN=256, BK=64, DS_WARPS=8, DS_STAGES=3),
    dict(DS_BM=64, DS_BN=128, BK=64, DS_WARPS=4, DS_STAGES=4),
]
# under the interpreter (tests of the mechanism): small tiles only
FWD_CANDIDATES_CPU = [dict(BM=16, BN=16, BK=16), dict(BM=32, BN=16, BK=32), dict(BM=16, BN=16, BK=16, FWD_COL="tile"),
                      dict(BM=16, BN=16, BK=16, FWD_COL="transpose")]
BWD_CANDIDATES_CPU = [dict(DS_BM=16, DS_BN=32, BK=16, DS_STRIP_ROWS=32), dict(DS_BM=32, DS_BN=16, BK=16)]

TUNED: dict = {}
TUNE_LOG: list = []  # one record per tuning: key, the base's time, every candidate's time or error, the choice, wall_s


def candidates(kind: str, device: torch.device, dtype: torch.dtype) -> list[dict]:
    if device.type != "cuda":
        return FWD_CANDIDATES_CPU if kind == "fwd" else BWD_CANDIDATES_CPU
    cands = FWD_CANDIDATES_GPU if kind == "fwd" else BWD_CANDIDATES_GPU
    if dtype == torch.float32:  # fp32 tiles need twice the shared memory: halve the K step
        cands = [{**c, "BK": min(c.get("BK", 64), 32)} for c in cands]
    return cands


def size_class(n: int) -> int:
    """Problems are tuned per power-of-two size class (at least 16)."""
    return 1 << max(4, (max(1, n) - 1).bit_length())


def time_ms(fn, device: torch.device) -> float:
    """Milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (warm-up, L2 flush, median);
    under the interpreter one call after an untimed one (the mechanism, not a measurement)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
    import time

    fn()
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


#: how far a candidate's outputs may lie from the reference configuration's, element by element,
#: before it is refused. The candidates change tile shapes and summation order, rounding-level
#: changes (about 1e-4 nats in a log-sum-exp of ~50, one bf16 ulp of dS); a wrong kernel is off by
#: far more. Log-sum-exps are compared in nats (the loss is a small difference of two ~50-nat
#: numbers, so a relative rule would let a 0.5-nat error through), softmax means of S (in [-1, 1])
#: absolutely, gradients relatively with a floor at a fraction of the tensor's largest element.
AGREE = {"lse": dict(atol=1e-2, rtol=0.0, floor=0.0), "es": dict(atol=1e-3, rtol=0.0, floor=0.0),
         "grad": dict(atol=0.0, rtol=2e-2, floor=1e-2)}


def _outputs(res) -> list[tuple[str, str, torch.Tensor]]:
    """(name, kind, tensor) of a launch's result: the forward's statistics (``StripStats``) or the
    backward's (dq, dT)."""
    if isinstance(res, (tuple, list)):
        return [(f"grad{i}", "grad", x) for i, x in enumerate(res) if isinstance(x, torch.Tensor)]
    return [(f, "lse" if f.endswith("lse") else "es", x)
            for f, x in ((f, getattr(res, f, None)) for f in ("row_lse", "row_es", "col_lse", "col_es"))
            if isinstance(x, torch.Tensor)]


def disagreement(res, ref) -> float:
    """The worst element-wise |x - x_ref| / tolerance over the outputs (``AGREE``; <= 1 agrees).
    Where the reference is not finite (a column every row masks: a log-sum-exp of -inf; NaN
    inputs) the candidate must hold the same value (NaN where NaN); a NaN or infinity elsewhere,
    or a different set of outputs, is inf."""
    got, want = _outputs(res), _outputs(ref)
    if [(n, x.shape) for n, _, x in got] != [(n, y.shape) for n, _, y in want]:
        return float("inf")
    worst = 0.0
    for (_, kind, x), (_, _, y) in zip(got, want):
        x, y = x.detach().double(), y.detach().double()
        fin, nan = torch.isfinite(y), torch.isnan(y)
        if not (bool(torch.isnan(x[nan]).all()) and bool(torch.equal(x[~fin & ~nan], y[~fin & ~nan]))
                and bool(torch.isfinite(x[fin]).all())):
            return float("inf")
        if not bool(fin.any()):
            continue
        x, y, t = x[fin], y[fin], AGREE[kind]
        tol = t["atol"] + t["rtol"] * y.abs() + t["floor"] * float(y.abs().max())
        worst = max(worst, float(((x - y).abs() / tol.clamp_min(1e-30)).max()))
    return worst


def tuned(kind: str, base: KernelConfig, key: tuple, device: torch.device, dtype: torch.dtype, run) -> KernelConfig:
    """``base`` with the fastest of ``candidates(kind, ...)`` applied, tuning on first sight of
    ``(kind, device type, device index, dtype) + key + (base,)``. ``run(cfg)`` launches the
    kernels under ``cfg`` and returns their outputs. Each candidate's outputs are compared with
    ``base``'s first (with the first candidate that runs where ``base`` itself fails): one that
    fails to compile or fit, or disagrees beyond ``AGREE``, is recorded and skipped, so a fast
    wrong configuration is never chosen."""
    full = (kind, device.type, device.index, dtype) + tuple(key) + (base,)
    if full in TUNED:
        return TUNED[full]
    record, t_sweep = {"key": full, "candidates": []}, time.perf_counter()
    best, best_ms = None, float("inf")
    try:
        ref = run(base)
    except Exception as exc:  # noqa: BLE001 - an override that does not fit: the candidates may
        ref, record["base_error"] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
    if ref is not None:
        try:
            record["base_ms"] = time_ms(lambda: run(base), device)  # what the choice is measured against
        except Exception as exc:  # noqa: BLE001 - the reference stands; only its time is missing
            record["base_time_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for cand in candidates(kind, device, dtype):
        try:
            cfg = base.replace(**cand)
            out = run(cfg)
            if ref is None:  # the first candidate that runs is the reference of the others
                ref, record["reference"] = out, cand
            err = disagreement(out, ref)
            del out
            if not err <= 1.0:
                record["candidates"].append({"config": cand, "error": f"wrong: outputs differ from the reference "
                                             f"configuration's by {err:.3g}x the tolerance (AGREE)"})
                continue
            ms = time_ms(lambda: run(cfg), device)
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit is skipped
            record["candidates"].append({"config": cand, "error": f"{type(exc).__name__}: {str(exc)[:200]}"})
            continue
        record["candidates"].append({"config": cand, "ms": ms, "disagreement": err})
        if ms < best_ms:
            best, best_ms = cand, ms
    if best is None:
        raise RuntimeError(f"llave-fast autotune: no {kind} candidate ran for {full}: {record['candidates']}")
    record.update(choice=best, ms=best_ms, wall_s=time.perf_counter() - t_sweep)
    TUNE_LOG.append(record)
    TUNED[full] = base.replace(**best)
    log.info("llave-fast autotune: %s %s on %s %s: %s (%.3f ms, %d candidates)", kind, dtype, device, key, best,
             best_ms, len(record["candidates"]))
    return TUNED[full]


__all__ = ["KernelConfig", "FIELD_NAMES", "PATH_FIELDS", "BWD_VARIANTS", "gpu_config", "interpreter_config",
           "default_config", "with_overrides", "autotune_enabled", "torch_chunk_elems", "tuned", "TUNE_LOG",
           "FWD_CANDIDATES_GPU", "BWD_CANDIDATES_GPU", "FWD_CANDIDATES_CPU", "BWD_CANDIDATES_CPU"]
