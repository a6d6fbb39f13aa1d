"""What the benchmark scripts share: metadata, inputs, timing, memory, error measures.

Timing of one callable is ``bench_ms``: ``triton.testing.do_bench`` on CUDA (CUDA events, L2
flushed, median), ``torch.utils.benchmark.Timer`` on the CPU. ``time_interleaved`` is ours: it
splits one loss call into forward and backward, interleaves backends (ABBA) and fits a deadline.
Nothing here touches CUDA at import time; the loss formula is never copied here (the truth is
``llave_fast.reference.reference_loss``).
"""

from __future__ import annotations

import datetime as _dt
import gc
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
DTYPES = {**{v: k for k, v in DTYPE_NAMES.items()}, **{str(k).replace("torch.", ""): k for k in DTYPE_NAMES}}
MiB = 1024 * 1024
GiB = 1024 * MiB


# --------------------------------------------------------------------------- metadata


def slugify(text: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", re.sub(r"\(r\)|\(tm\)", "", text.lower())).strip("-")
    return s or "unknown-device"


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.lower().startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def usable_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({usable_cores()} cores)"


def now_stamps() -> dict:
    local = _dt.datetime.now().astimezone()
    return {"date": local.strftime("%Y-%m-%d"), "local_time": local.isoformat(timespec="seconds"),
            "utc_time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def run_meta(device: torch.device) -> dict:
    """What every result file carries: the device, the versions, the commit (``git rev-parse``), the date."""
    import psutil
    from torch.utils.collect_env import get_nvidia_driver_version, run

    dev: dict = {"type": device.type, "name": device_name(device)}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        dev.update(gpu_name=p.name, driver=get_nvidia_driver_version(run) or "unknown",
                   cuda_runtime=torch.version.cuda, compute_capability=f"{p.major}.{p.minor}",
                   sm_count=p.multi_processor_count, total_memory_mib=round(p.total_memory / MiB),
                   allow_tf32_matmul=bool(torch.backends.cuda.matmul.allow_tf32))
    dev.update(cpu_model=cpu_model(), cpu_count=os.cpu_count(), usable_cores=usable_cores(),
               torch_threads=torch.get_num_threads(), mem_total_mib=psutil.virtual_memory().total // MiB)
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform()}
    for mod in ("triton", "numpy", "llave_fast", "inf_cl"):
        try:
            versions[mod] = getattr(__import__(mod), "__version__", "installed")
        except Exception:  # noqa: BLE001 - optional modules
            versions[mod] = None

    def git(*args):
        r = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=20)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except (OSError, subprocess.SubprocessError):
        commit = status = None
    return {"device": dev, "versions": versions, **now_stamps(),
            "git": {"commit": commit, "dirty": None if status is None else bool(status),
                    "changed_paths": len(status.splitlines()) if status else None}}


def default_out_path(device: torch.device) -> Path:
    """benchmarks/results/<device-slug>/<YYYY-MM-DD>.json; a second run the same day gets _2, _3..."""
    folder = REPO_ROOT / "benchmarks" / "results" / slugify(device_name(device))
    date = now_stamps()["date"]
    path, n = folder / f"{date}.json", 2
    while path.exists():
        path, n = folder / f"{date}_{n}.json", n + 1
    return path


def machine_load(seconds: float = 1.0) -> dict:
    """/proc/loadavg and the busy fraction of all CPUs over ``seconds`` while this process sleeps
    (so: other processes' load), from psutil."""
    import psutil

    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "busy_fraction_others": psutil.cpu_percent(interval=seconds) / 100}


# --------------------------------------------------------------------------- inputs


def normalized_rows(B: int, d: int, *, dtype: torch.dtype, device, generator: torch.Generator,
                    like: torch.Tensor | None = None, noise: float = 1.0) -> torch.Tensor:
    """Fresh random L2-normalised rows (never zeros), made in fp32 then cast; with ``like``,
    normalise(like + noise * randn): correlated positives. Normalised in place."""
    x = torch.randn(B, d, generator=generator, dtype=torch.float32, device=generator.device)
    if like is not None:
        x.mul_(noise).add_(like.detach().to(x.device, torch.float32))
    norms = x.norm(dim=1, keepdim=True)
    if not bool((norms > 0).all()):
        raise RuntimeError("a random row has zero norm")
    return x.div_(norms).to(device=device, dtype=dtype)


def make_pairs(n: int, B: int, d: int, *, dtype, device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` independent (query, target) pairs of leaf tensors requiring grad, drawn on the device."""
    device = torch.device(device)
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    return [tuple(normalized_rows(B, d, dtype=dtype, device=device, generator=g).requires_grad_() for _ in "qt")
            for _ in range(n)]


# --------------------------------------------------------------------------- process


def start_script() -> None:
    """Once per script, after its imports: SIGTERM and SIGINT raise KeyboardInterrupt (SIGINT even
    when the process started with it ignored, as a background job of a script does), so a run
    stopped at its limit goes through the script's ``except KeyboardInterrupt`` and writes what it
    measured; ``gc.freeze()`` moves the imports' objects out of the collector's way, so the
    ``gc.collect()`` before each timed run is cheap."""
    import atexit
    import signal

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # else triton's bindings print "leaked instance" warnings at exit


# --------------------------------------------------------------------------- timing


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_ms(fn, device: torch.device, repeats: int = 10) -> float:
    """Median milliseconds of ``fn()``: ``triton.testing.do_bench`` on CUDA (warm-up, L2 flush,
    CUDA events), ``torch.utils.benchmark.Timer`` on the CPU (one warm-up, ``repeats`` runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=5, rep=max(20, 5 * repeats), return_mode="median"))
    from torch.utils.benchmark import Timer

    fn()
    m = Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return statistics.median(m.timeit(1).times[0] for _ in range(repeats)) * 1e3


def _one_run(fn, q, t, device: torch.device, memory: dict | None = None):
    """One forward + backward: (fwd ms, bwd ms, fwd+bwd ms, loss). With ``memory`` (CUDA) the same
    run also measures its peak memory into it (the allocator's counters add no synchronisation)."""
    q.grad = t.grad = None
    gc.collect()
    sync(device)
    cuda = device.type == "cuda"
    if memory is not None and cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        if cuda:
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
    if memory is not None and cuda:
        memory.update(retained_after_bytes=torch.cuda.memory_allocated(device) - base, loss=value)
    q.grad = t.grad = None
    return f, b, fb, value


def planned_repeats(per_round_ms: float, repeats: int, budget_s: float | None = None, min_repeats: int = 3,
                    time_left_s: float | None = None) -> int:
    """Timed rounds to run given one round's time (ms): ``budget_s`` lowers the count to about that
    many seconds (not below ``min(min_repeats, repeats)``); ``time_left_s`` (a deadline) lowers it
    to what fits, not below 1."""
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

    Each run takes three timestamps (perf_counter on CPU; CUDA events, then a synchronize).
    ``warmup``/``repeats``: an int or {label: int}. Every function gets its warm-up runs first,
    then the timed runs are interleaved ABBA, each run on the next input pair; a function that
    raises is dropped and its error recorded. ``budget_s`` and ``deadline_at`` (a perf_counter
    value) lower the repeat counts via ``planned_repeats`` from the last warm-up's time.
    ``memory_from_warmup`` (CUDA): the last warm-up also measures peak memory (entry ``memory``).
    """
    labels = list(fns)
    out = {lab: {"raw_ms": {"fwd": [], "bwd": [], "fwd_bwd": []}, "warmup_ms": {"fwd": [], "bwd": [], "fwd_bwd": []},
                 "losses": [], "error": None, "exception": None} for lab in labels}
    count = dict.fromkeys(labels, 0)

    def run(lab, dest, memory=None):
        # backend j's n-th run uses pair (n + j) % len(pairs): no two consecutive runs share a pair
        q, t = pairs[(count[lab] + labels.index(lab)) % len(pairs)]
        count[lab] += 1
        try:
            res = _one_run(fns[lab], q, t, device, memory)
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            out[lab]["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            out[lab]["exception"] = exc
            q.grad = t.grad = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            return
        for k, v in zip(("fwd", "bwd", "fwd_bwd"), res):
            dest[k].append(v)
        out[lab]["losses"].append(res[3])

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
    per_round = sum(out[lab]["warmup_ms"]["fwd_bwd"][-1] for lab in labels
                    if out[lab]["error"] is None and out[lab]["warmup_ms"]["fwd_bwd"])
    top = max(wanted.values()) if wanted else 0
    time_left = None if deadline_at is None else deadline_at - time.perf_counter()
    n_rounds = planned_repeats(per_round, top, budget_s, min_repeats, time_left)
    for lab in labels:
        out[lab]["repeats"] = min(wanted[lab], n_rounds) if wanted[lab] < top else n_rounds
    for it in range(max(out[lab]["repeats"] for lab in labels) if labels else 0):
        for lab in (labels if it % 2 == 0 else labels[::-1]):
            if out[lab]["error"] is None and it < out[lab]["repeats"]:
                run(lab, out[lab]["raw_ms"])
    for lab in labels:
        raw = out[lab]["raw_ms"]
        ok = out[lab]["error"] is None and all(raw.values())
        for key, f in (("median_ms", statistics.median), ("min_ms", min), ("max_ms", max)):
            out[lab][key] = {k: f(v) for k, v in raw.items()} if ok else {}
    return out


# --------------------------------------------------------------------------- memory


def _proc_status_kib() -> dict:
    """VmRSS and VmHWM (KiB) from /proc/self/status, plus getrusage's ru_maxrss (KiB on Linux)."""
    with open("/proc/self/status") as f:
        out = {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS:", "VmHWM:"))}
    return {**out, "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def cpu_peak_rss_of_call(fn, q, t, *, tolerance_kib: int = 1024) -> dict:
    """Peak RSS during ``fn(q, t).backward()`` minus the RSS just before the call (bytes).

    The peak is the kernel's high-water mark VmHWM; it is reset (clear_refs) when it is above the
    RSS before the call, and ``baseline_clean`` says whether the two then agree. getrusage's
    ru_maxrss is kept as a cross-check only when it also equals that RSS: in a child process it
    starts at the parent's peak, which nothing resets."""
    gc.collect()
    before = _proc_status_kib()
    reset = False
    if before["VmHWM"] - before["VmRSS"] > tolerance_kib:
        try:  # reset the peak mark (VmHWM, ru_maxrss) to the current RSS: Linux clear_refs 5
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            pass
        before = _proc_status_kib()
    clean = abs(before["VmHWM"] - before["VmRSS"]) <= tolerance_kib
    ru_ok = abs(before["ru_maxrss"] - before["VmRSS"]) <= tolerance_kib
    loss = fn(q, t)
    after_fwd = _proc_status_kib()
    loss.backward()
    after_bwd = _proc_status_kib()
    value = float(loss.detach())
    del loss
    gc.collect()
    end = _proc_status_kib()
    base = before["VmRSS"]
    return {
        "method": "VmHWM after - VmRSS before (/proc/self/status), fresh process",
        "baseline_clean": clean, "peak_mark_reset": reset, "rss_before_kib": base,
        "peak_fwd_bytes": (after_fwd["VmHWM"] - base) * 1024,
        "retained_after_fwd_bytes": (after_fwd["VmRSS"] - base) * 1024,
        "peak_bytes": (after_bwd["VmHWM"] - base) * 1024,
        "peak_bytes_ru_maxrss": (after_bwd["ru_maxrss"] - base) * 1024 if ru_ok else None,
        "ru_maxrss_note": None if ru_ok else ("ru_maxrss before the call exceeded the RSS (inherited from the "
                                              "parent): not used"),
        "retained_after_bytes": (end["VmRSS"] - base) * 1024, "loss": value,
        "raw_kib": {"before": before, "after_fwd": after_fwd, "after_bwd": after_bwd, "end": end},
    }


def cuda_peak_of_call(fn, q, t, device: torch.device) -> dict:
    """torch.cuda.max_memory_allocated() during fn(q, t).backward() minus memory_allocated() before."""
    mem: dict = {}
    _one_run(fn, q, t, device, mem)
    mem["method"] = "torch.cuda.max_memory_allocated delta"
    return mem


# --------------------------------------------------------------------------- errors


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref| / max |ref| (the scale-free error used for gradients and the loss)."""
    x, ref = x.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if not bool(torch.isfinite(x).all()):
        return float("inf")
    return (x - ref).abs().max().item() / max(ref.abs().max().item(), 1e-30)


def median(xs):
    return statistics.median(xs) if xs else None


def fmt(x, spec: str = ".1f", na: str = "-") -> str:
    if x is None:
        return na
    return "nan" if isinstance(x, float) and x != x else format(x, spec)
