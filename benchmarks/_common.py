"""Shared helpers of the loss benchmarks: metadata, inputs, timing, memory, error measures.

Nothing here imports CUDA-only code at import time; ``torch.cuda`` is touched only when a
CUDA device is actually used. The benchmarked formula is never copied here: the truth is
``llave_fast.reference.reference_loss``.
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

DTYPES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "fp64": torch.float64,
    "float64": torch.float64,
}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}

MiB = 1024 * 1024
GiB = 1024 * MiB


# --------------------------------------------------------------------------- metadata


def slugify(text: str) -> str:
    s = re.sub(r"\(r\)|\(tm\)", "", text.lower())
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "unknown-device"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def mem_available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _nvidia_driver() -> str:
    exe = shutil.which("nvidia-smi")
    if exe:
        try:
            out = subprocess.run(
                [exe, "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )
            if out.returncode == 0 and out.stdout.strip():
                return out.stdout.strip().splitlines()[0]
        except (OSError, subprocess.SubprocessError):
            pass
    try:
        import pynvml  # type: ignore

        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:  # noqa: BLE001 - optional
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({usable_cores()} cores)"


def device_info(device: torch.device) -> dict:
    info: dict = {"type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu_name=p.name,
            driver=_nvidia_driver(),
            cuda_runtime=torch.version.cuda,
            compute_capability=f"{p.major}.{p.minor}",
            sm_count=p.multi_processor_count,
            total_memory_mib=round(p.total_memory / MiB),
            allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32),
        )
    info.update(
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        usable_cores=usable_cores(),
        torch_threads=torch.get_num_threads(),
        mem_total_mib=_mem_total_mib(),
    )
    return info


def _mem_total_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def versions() -> dict:
    out = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    for mod in ("triton", "numpy", "llave_fast", "inf_cl"):
        try:
            m = __import__(mod)
            out[mod] = getattr(m, "__version__", "installed")
        except Exception:  # noqa: BLE001 - optional modules
            out[mod] = None
    return out


def git_info(root: Path = REPO_ROOT) -> dict:
    def git(*args):
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        status = git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "changed_paths": None if not status else len(status.splitlines()),
    }


def now_stamps() -> dict:
    local = _dt.datetime.now().astimezone()
    return {
        "date": local.strftime("%Y-%m-%d"),
        "local_time": local.isoformat(timespec="seconds"),
        "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def default_out_path(device: torch.device) -> Path:
    """benchmarks/results/<device-slug>/<YYYY-MM-DD>.json; a second run the same day gets _2, _3..."""
    folder = REPO_ROOT / "benchmarks" / "results" / slugify(device_name(device))
    date = now_stamps()["date"]
    path = folder / f"{date}.json"
    n = 2
    while path.exists():
        path = folder / f"{date}_{n}.json"
        n += 1
    return path


# --------------------------------------------------------------------------- inputs


def normalized_rows(B: int, d: int, *, dtype: torch.dtype, device, generator: torch.Generator,
                    like: torch.Tensor | None = None, noise: float = 1.0) -> torch.Tensor:
    """Fresh random L2-normalised rows (never zeros), made in fp32 then cast.

    With ``like``, rows are normalise(like + noise * randn), i.e. correlated positives.
    Normalisation is in place so no large temporary outlives the call.
    """
    x = torch.randn(B, d, generator=generator, dtype=torch.float32, device=generator.device)
    if like is not None:
        x.mul_(noise).add_(like.detach().to(x.device, torch.float32))
    norms = x.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise RuntimeError("a random row has zero norm")
    x.div_(norms)
    return x.to(device=device, dtype=dtype)


def make_pairs(n: int, B: int, d: int, *, dtype, device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` independent (query, target) pairs of leaf tensors requiring grad, to rotate among.

    On CUDA the random numbers are drawn on the device (at B = 262144, d = 1536 each tensor is
    400 M numbers: seconds on the host, milliseconds on the GPU)."""
    device = torch.device(device)
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    pairs = []
    for _ in range(n):
        q = normalized_rows(B, d, dtype=dtype, device=device, generator=g).requires_grad_()
        t = normalized_rows(B, d, dtype=dtype, device=device, generator=g).requires_grad_()
        pairs.append((q, t))
    return pairs


# --------------------------------------------------------------------------- process


def start_script() -> None:
    """What every benchmark script does once its imports are done.

    * SIGTERM raises KeyboardInterrupt, as SIGINT does: a run stopped by ``timeout`` (SIGINT
      in gpu_check.sh, SIGTERM from a plain ``timeout`` or a batch system) goes through the
      script's ``except KeyboardInterrupt`` and writes what it has measured. SIGINT gets
      Python's handler back even when the script was started with SIGINT ignored.
    * ``gc.freeze()``: the objects of the imports (torch, triton, transformers: millions)
      move to a generation the collector never scans, so the ``gc.collect()`` before each
      timed run costs milliseconds, not a large part of the run.
    """
    import signal

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _raise)
    # SIGINT -> KeyboardInterrupt even when this process started with SIGINT ignored: Python
    # keeps an inherited SIG_IGN, and a background job of a non-interactive shell (`cmd &` in
    # a script, nohup) inherits one, so a limit's SIGINT would be lost and only its SIGKILL,
    # which writes nothing, would stop the run
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.collect()
    gc.freeze()
    # frozen objects are otherwise never collected at exit, and triton's bindings then print
    # pages of "leaked instance" warnings
    import atexit

    atexit.register(gc.unfreeze)


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _one_run(fn, q, t, device: torch.device, memory: dict | None = None):
    """One timed forward + backward; returns (fwd ms, bwd ms, fwd+bwd ms, loss value).

    With ``memory`` (a dict, CUDA only) the same run also measures its peak memory into it,
    as ``cuda_peak_of_call`` does (the allocator's statistics are host-side: reading them
    adds no synchronisation), so that a warm-up run doubles as the memory measurement and a
    slow backend is not run once more just for its memory."""
    q.grad = None
    t.grad = None
    gc.collect()
    sync(device)
    if memory is not None and device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if device.type == "cuda":
            e0, e1, e2 = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            e0.record()
            loss = fn(q, t)
            e1.record()
            if memory is not None:
                memory["peak_fwd_bytes"] = torch.cuda.max_memory_allocated(device) - base
                memory["retained_after_fwd_bytes"] = torch.cuda.memory_allocated(device) - base
            loss.backward()
            e2.record()
            torch.cuda.synchronize(device)
            f, b, fb = e0.elapsed_time(e1), e1.elapsed_time(e2), e0.elapsed_time(e2)
            if memory is not None:
                memory.update(method="torch.cuda.max_memory_allocated delta (measured in the last warm-up run)",
                              baseline_clean=True, peak_bytes=torch.cuda.max_memory_allocated(device) - base)
        else:
            t0 = time.perf_counter()
            loss = fn(q, t)
            t1 = time.perf_counter()
            loss.backward()
            t2 = time.perf_counter()
            f, b, fb = (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3
    finally:
        if gc_was:
            gc.enable()
    value = float(loss.detach())
    del loss
    if memory is not None and device.type == "cuda":
        memory.update(retained_after_bytes=torch.cuda.memory_allocated(device) - base, loss=value)
    q.grad = None
    t.grad = None
    return f, b, fb, value


def planned_repeats(per_round_ms: float, repeats: int, budget_s: float | None = None, min_repeats: int = 3,
                    time_left_s: float | None = None) -> int:
    """Timed rounds to run, given one round's time (every function once, ms).

    ``budget_s``: the timed rounds should take about this long: the count is lowered, to no
    fewer than ``min(min_repeats, repeats)``. ``time_left_s``: a hard limit (a deadline): the
    count is lowered to what fits, to no fewer than 1.
    """
    n = repeats
    if budget_s is not None and per_round_ms > 0:
        n = max(min(min_repeats, repeats), min(repeats, int(budget_s * 1e3 / per_round_ms)))
    if time_left_s is not None and per_round_ms > 0:
        n = max(1, min(n, int(time_left_s * 1e3 / per_round_ms)))
    return n


def time_interleaved(fns: dict, pairs, *, device: torch.device, warmup, repeats,
                     budget_s: float | None = None, min_repeats: int = 3, deadline_at: float | None = None,
                     memory_from_warmup: bool = False) -> dict:
    """Forward, backward and forward+backward times (ms) of several ``fn(q, t) -> scalar loss``.

    Each run takes three timestamps: before the forward, between forward and backward,
    after the backward (CPU: time.perf_counter, CPU ops being synchronous; CUDA: events on
    the current stream, then a synchronize). Leaf gradients are cleared and gc runs outside
    the timed region; gc is off inside it.

    Every function first gets its warm-up runs (``warmup``: an int or {label: int}; excluded
    from the statistics). The timed runs are then interleaved, ABBA order (A B, B A, A B ...),
    so that a slow phase of the machine hits every backend alike; consecutive runs use the
    next of the input pairs, so no run starts on the inputs the previous one just touched.
    A function that raises is dropped from the rotation and its error recorded.

    ``repeats`` (and ``warmup``): an int, or {label: int} where some functions are run fewer
    times (a slow peer at the largest size). ``budget_s``: the timed runs of all functions
    together should take about this long; the repeat counts are lowered (to no fewer than
    ``min_repeats``) from the warm-up runs' times. ``deadline_at`` (a ``time.perf_counter()``
    value): the timed runs are lowered further to end before it (at least one each). The count
    used is in each entry's ``repeats``.

    ``memory_from_warmup`` (CUDA): the last warm-up run of each function also measures its
    peak memory (entry ``memory``), which saves the separate memory run.
    """
    labels = list(fns)
    out = {lab: {"raw_ms": {"fwd": [], "bwd": [], "fwd_bwd": []},
                 "warmup_ms": {"fwd": [], "bwd": [], "fwd_bwd": []},
                 "losses": [], "error": None, "exception": None} for lab in labels}
    count = {lab: 0 for lab in labels}

    def run(lab, dest, memory=None):
        # backend j's n-th run uses pair (n + j) % len(pairs): every backend cycles through all
        # pairs and, in the ABBA order, no two consecutive runs share a pair (len(pairs) >= 2)
        q, t = pairs[(count[lab] + labels.index(lab)) % len(pairs)]
        count[lab] += 1
        try:
            f, b, fb, v = _one_run(fns[lab], q, t, device, memory)
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            out[lab]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out[lab]["exception"] = exc
            q.grad = None
            t.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        dest["fwd"].append(f)
        dest["bwd"].append(b)
        dest["fwd_bwd"].append(fb)
        out[lab]["losses"].append(v)

    measure = memory_from_warmup and device.type == "cuda"
    for lab in labels:
        n_warm = warmup[lab] if isinstance(warmup, dict) else warmup
        for i in range(n_warm):
            if out[lab]["error"] is None:
                mem = {} if (measure and i == n_warm - 1) else None
                run(lab, out[lab]["warmup_ms"], mem)
                if mem and out[lab]["error"] is None:
                    out[lab]["memory"] = mem
    wanted = {lab: (repeats[lab] if isinstance(repeats, dict) else repeats) for lab in labels}
    # one round: every function once; the last warm-up is the one closest to steady state
    per_round = sum(out[lab]["warmup_ms"]["fwd_bwd"][-1] for lab in labels
                    if out[lab]["error"] is None and out[lab]["warmup_ms"]["fwd_bwd"])
    top = max(wanted.values()) if wanted else 0
    time_left = None if deadline_at is None else deadline_at - time.perf_counter()
    n_rounds = planned_repeats(per_round, top, budget_s, min_repeats, time_left)
    for lab in labels:
        out[lab]["repeats"] = min(wanted[lab], n_rounds) if wanted[lab] < top else n_rounds
    for it in range(max(out[lab]["repeats"] for lab in labels) if labels else 0):
        order = labels if it % 2 == 0 else labels[::-1]
        for lab in order:
            if out[lab]["error"] is None and it < out[lab]["repeats"]:
                run(lab, out[lab]["raw_ms"])
    for lab in labels:
        raw = out[lab]["raw_ms"]
        ok = out[lab]["error"] is None and all(raw.values())
        out[lab]["median_ms"] = {kk: statistics.median(v) for kk, v in raw.items()} if ok else {}
        out[lab]["min_ms"] = {kk: min(v) for kk, v in raw.items()} if ok else {}
        out[lab]["max_ms"] = {kk: max(v) for kk, v in raw.items()} if ok else {}
    return out


def machine_load(seconds: float = 1.0) -> dict:
    """How busy the machine is: /proc/loadavg and the busy fraction of all CPUs over ``seconds``
    (sampled from /proc/stat while this process sleeps, so it is other processes' load)."""
    info: dict = {}
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = [float(x) for x in f.read().split()[:3]]

        def stat():
            with open("/proc/stat") as f:
                vals = [int(x) for x in f.readline().split()[1:]]
            idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
            return sum(vals), idle

        a = stat()
        time.sleep(seconds)
        b = stat()
        total, idle = b[0] - a[0], b[1] - a[1]
        info["busy_fraction_others"] = (1 - idle / total) if total > 0 else None
    except OSError:
        pass
    return info


# --------------------------------------------------------------------------- memory


def proc_status_kib() -> dict:
    """VmRSS and VmHWM (KiB) from /proc/self/status, plus getrusage's ru_maxrss (KiB on Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, val = line.split(":", 1)
                out[key] = int(val.split()[0])
    out["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return out


def reset_rss_peak() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM, ru_maxrss) to the current RSS: Linux clear_refs 5."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_peak_rss_of_call(fn, q, t, *, tolerance_kib: int = 1024) -> dict:
    """Peak RSS during ``fn(q, t).backward()`` minus the RSS just before the call (bytes).

    The peak is the kernel's high-water mark VmHWM (/proc/self/status). The delta is only
    meaningful when that mark equals the current RSS right before the call (else an earlier,
    higher peak could hide the call's); the caller arranges it (inputs built in place, a small
    warm-up first), and if the two still differ the mark is reset via /proc/self/clear_refs.
    ``baseline_clean`` records whether they agree. getrusage's ru_maxrss is recorded as a
    cross-check only when it also equals the RSS before the call: in a child process it starts
    at the parent's peak (Linux carries the pre-exec high-water mark into signal->maxrss, which
    nothing resets), so after a large parent it is not usable.
    """
    gc.collect()
    before = proc_status_kib()
    reset = False
    if before["VmHWM"] - before["VmRSS"] > tolerance_kib:
        reset = reset_rss_peak()
        before = proc_status_kib()
    clean = abs(before["VmHWM"] - before["VmRSS"]) <= tolerance_kib
    ru_ok = abs(before["ru_maxrss"] - before["VmRSS"]) <= tolerance_kib
    loss = fn(q, t)
    after_fwd = proc_status_kib()
    loss.backward()
    after_bwd = proc_status_kib()
    value = float(loss.detach())
    del loss
    gc.collect()
    end = proc_status_kib()
    base = before["VmRSS"]
    return {
        "method": "VmHWM after - VmRSS before (/proc/self/status), fresh process",
        "baseline_clean": clean,
        "peak_mark_reset": reset,
        "rss_before_kib": base,
        "peak_fwd_bytes": (after_fwd["VmHWM"] - base) * 1024,
        "retained_after_fwd_bytes": (after_fwd["VmRSS"] - base) * 1024,
        "peak_bytes": (after_bwd["VmHWM"] - base) * 1024,
        "peak_bytes_ru_maxrss": (after_bwd["ru_maxrss"] - base) * 1024 if ru_ok else None,
        "ru_maxrss_note": None if ru_ok else "ru_maxrss before the call exceeded the RSS (inherited from the parent): not used",
        "retained_after_bytes": (end["VmRSS"] - base) * 1024,
        "loss": value,
        "raw_kib": {"before": before, "after_fwd": after_fwd, "after_bwd": after_bwd, "end": end},
    }


def cuda_peak_of_call(fn, q, t, device: torch.device) -> dict:
    """torch.cuda.max_memory_allocated() during fn(q, t).backward() minus memory_allocated() before."""
    q.grad = None
    t.grad = None
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    loss = fn(q, t)
    torch.cuda.synchronize(device)
    peak_fwd = torch.cuda.max_memory_allocated(device) - base
    retained_fwd = torch.cuda.memory_allocated(device) - base
    loss.backward()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    value = float(loss.detach())
    del loss
    retained = torch.cuda.memory_allocated(device) - base
    q.grad = None
    t.grad = None
    return {
        "method": "torch.cuda.max_memory_allocated delta",
        "baseline_clean": True,
        "peak_fwd_bytes": peak_fwd,
        "retained_after_fwd_bytes": retained_fwd,
        "peak_bytes": peak,
        "retained_after_bytes": retained,
        "loss": value,
    }


# --------------------------------------------------------------------------- errors


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (the scale-free error used for gradients and the loss)."""
    x = x.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    denom = ref.abs().max().item()
    return (x - ref).abs().max().item() / max(denom, 1e-30)


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, spec: str = ".1f", na: str = "-") -> str:
    if x is None:
        return na
    if isinstance(x, float) and (x != x):
        return "nan"
    return format(x, spec)
