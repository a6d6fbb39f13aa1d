"""What the benchmark scripts share: metadata, result files, inputs, timing, memory, errors (benchmarks/README.md).

No CUDA at import time.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import gc
import json
import os
import platform
import re
import signal
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
PARTS = ("fwd", "bwd", "fwd_bwd")  # the three times of one run (time_interleaved)
# (loss relative error, gradient max-abs error / max |grad|) against the float64 truth (benchmarks/README.md)
TOLERANCES = {"fp64": (1e-10, 1e-8), "fp32": (1e-4, 2e-3), "tf32": (5e-3, 5e-2), "fp16": (5e-3, 3e-2),
              "bf16": (1e-2, 6e-2)}
# a CPU peak (VmHWM - VmRSS) is trusted to cpu_peak_rss_of_call's tolerance: no memory ratio from a smaller one
RSS_NOISE_BYTES = 1024 * 1024


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
    import psutil  # not needed at import time (test_microbench.py)
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


def result_path(device: torch.device, out=None, suffix: str = "") -> Path:
    """``out``, else benchmarks/results/<device-slug>/<YYYY-MM-DD><suffix>.json (then _2, _3... that day)."""
    if out:
        return Path(out)
    folder = REPO_ROOT / "benchmarks" / "results" / slugify(device_name(device))
    date = now_stamps()["date"]
    path, n = folder / f"{date}{suffix}.json", 2
    while path.exists():
        path, n = folder / f"{date}{suffix}_{n}.json", n + 1
    return path


def write_json(path, obj, indent: int = 1) -> Path:
    """``obj`` as JSON at ``path``, replaced whole (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
    return path


def peak_in_fresh_process(script, spec: dict, timeout: float = 1800) -> dict:
    """``script --_mem-worker SPEC`` in a fresh process; its ``MEMRESULT`` line (``print_peak``) parsed."""
    r = subprocess.run([sys.executable, str(script), "--_mem-worker", json.dumps(spec)], capture_output=True,
                       text=True, timeout=timeout)
    for line in r.stdout.splitlines():
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT "):])
    raise RuntimeError(f"memory worker failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")


def print_peak(fn, q, t) -> None:
    """The memory worker's answer: ``cpu_peak_rss_of_call`` as one MEMRESULT line."""
    print("MEMRESULT " + json.dumps(cpu_peak_rss_of_call(fn, q, t)), flush=True)


def machine_load(seconds: float = 1.0) -> dict:
    """/proc/loadavg and the CPUs' busy fraction over ``seconds`` while we sleep (others' load)."""
    import psutil

    return {"loadavg": [round(x, 2) for x in os.getloadavg()],
            "busy_fraction_others": psutil.cpu_percent(interval=seconds) / 100}


def normalized_rows(B: int, d: int, *, dtype: torch.dtype, device, generator: torch.Generator,
                    like: torch.Tensor | None = None, noise: float = 1.0) -> torch.Tensor:
    """Random L2-normalised rows, made in fp32 then cast; with ``like``, normalise(like + noise * randn):
    correlated positives."""
    x = torch.randn(B, d, generator=generator, dtype=torch.float32, device=generator.device)
    if like is not None:
        x.mul_(noise).add_(like.detach().to(x.device, torch.float32))
    return torch.nn.functional.normalize(x, dim=1).to(device=device, dtype=dtype)


def make_pairs(n: int, B: int, d: int, *, dtype, device, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` independent (query, target) pairs of leaf tensors requiring grad, drawn on the device."""
    device = torch.device(device)
    g = torch.Generator(device=device if device.type == "cuda" else "cpu").manual_seed(seed)
    return [tuple(normalized_rows(B, d, dtype=dtype, device=device, generator=g).requires_grad_() for _ in "qt")
            for _ in range(n)]


def start_script() -> None:
    """Once per script, after its imports: SIGTERM and SIGINT (even if inherited as ignored) raise
    KeyboardInterrupt, so a stopped run writes what it measured; ``gc.freeze()`` (benchmarks/README.md)."""

    def _raise(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    gc.collect()
    gc.freeze()
    atexit.register(gc.unfreeze)  # else triton's bindings print "leaked instance" warnings at exit


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Garbage collected, and on CUDA the allocator's cached blocks returned."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


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


def stamp(device: torch.device):
    """A time point: a recorded CUDA event on the GPU (its own timeline), perf_counter on the CPU."""
    if device.type == "cuda":
        (e := torch.cuda.Event(enable_timing=True)).record()
        return e
    return time.perf_counter()


def elapsed_ms(a, b) -> float:
    """Milliseconds between two ``stamp``s (CUDA events: after a synchronize)."""
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


def _one_run(fn, q, t, device: torch.device, memory: dict | None = None):
    """One forward + backward: (fwd ms, bwd ms, fwd+bwd ms, loss); with ``memory`` (CUDA) its peak too."""
    q.grad = t.grad = None
    gc.collect()
    sync(device)
    measure = memory is not None and device.type == "cuda"
    if measure:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    gc_was = gc.isenabled()
    gc.disable()
    try:
        p0 = stamp(device)
        loss = fn(q, t)
        p1 = stamp(device)
        if measure:  # the allocator's counters add no synchronisation
            memory.update(peak_fwd_bytes=torch.cuda.max_memory_allocated(device) - base,
                          retained_after_fwd_bytes=torch.cuda.memory_allocated(device) - base)
        loss.backward()
        p2 = stamp(device)
        sync(device)
    finally:
        if gc_was:
            gc.enable()
    value = float(loss.detach())
    del loss
    if measure:
        memory.update(method="torch.cuda.max_memory_allocated delta (measured in the last warm-up run)",
                      baseline_clean=True, peak_bytes=torch.cuda.max_memory_allocated(device) - base,
                      retained_after_bytes=torch.cuda.memory_allocated(device) - base, loss=value)
    q.grad = t.grad = None
    return elapsed_ms(p0, p1), elapsed_ms(p1, p2), elapsed_ms(p0, p2), value


def alternate(runs: dict, repeats: int, device: torch.device, secs: dict | None = None,
              errors: dict | None = None) -> tuple[dict, dict]:
    """Whole calls of each of ``runs`` ({name: fn()}), ABBA, ``repeats`` rounds: ({name: [s]}, {name: last result});
    ``secs`` is filled in place (a stopped run keeps its rounds); with ``errors``, a call that raises is recorded
    there ({name: "Type: message"}) and its name not run again, the others go on."""
    secs, last, names = {k: [] for k in runs} if secs is None else secs, {}, list(runs)
    secs.update({k: [] for k in runs if k not in secs})
    for r in range(repeats):
        for k in names if r % 2 == 0 else names[::-1]:
            if errors is not None and k in errors:
                continue
            sync(device)
            t0 = time.perf_counter()
            try:
                last[k] = runs[k]()
            except Exception as exc:
                if errors is None:
                    raise
                errors[k] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                continue
            sync(device)
            secs[k].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in secs.items()), file=sys.stderr)
    return secs, last


def planned_repeats(per_round_ms: float, repeats: int, budget_s: float | None = None, min_repeats: int = 3,
                    time_left_s: float | None = None) -> int:
    """Timed rounds given one round's ms: ``budget_s`` lowers the count to about that many seconds (not
    below ``min(min_repeats, repeats)``), ``time_left_s`` to what fits (not below 1)."""
    n = repeats
    if budget_s is not None and per_round_ms > 0:
        n = max(min(min_repeats, repeats), min(repeats, int(budget_s * 1e3 / per_round_ms)))
    if time_left_s is not None and per_round_ms > 0:
        n = max(1, min(n, int(time_left_s * 1e3 / per_round_ms)))
    return n


def time_interleaved(fns: dict, pairs, *, device: torch.device, warmup, repeats,
                     budget_s: float | None = None, min_repeats: int = 3, deadline_at: float | None = None,
                     memory_from_warmup: bool = False, into: dict | None = None) -> dict:
    """Forward, backward and fwd+bwd ms of several ``fn(q, t) -> loss``, warm-ups first, then interleaved ABBA
    (benchmarks/README.md, "Time"). ``warmup``, ``repeats``: an int or {label: int}; a function that raises is
    dropped with its error; ``budget_s``/``deadline_at``: ``planned_repeats``; ``memory_from_warmup``: CUDA peak.
    ``into``: the result dict, filled in place: stopped (KeyboardInterrupt: SIGINT, or SIGTERM after
    ``start_script``), it holds every run taken, a label whose timed runs were not all taken marked ``partial``
    with ``repeats_done`` and ``partial_median_ms`` (no ``median_ms``), and the stop is raised on."""
    labels = list(fns)
    out = {} if into is None else into
    out.update({lab: {"raw_ms": {k: [] for k in PARTS}, "warmup_ms": {k: [] for k in PARTS}, "losses": [],
                      "error": None, "exception": None} for lab in labels})

    def run(lab, dest, memory=None):
        o = out[lab]
        # backend j's n-th run uses pair (n + j) % len(pairs): no two consecutive runs share a pair
        q, t = pairs[(len(o["losses"]) + labels.index(lab)) % len(pairs)]
        try:
            *ms, loss = _one_run(fns[lab], q, t, device, memory)
        except Exception as exc:  # noqa: BLE001 - recorded, the others go on
            o["error"] = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
            # without its traceback: the frames would keep the failed run's tensors (an OOM's ~40 GiB) alive
            # through every later run of the group
            o["exception"] = exc.with_traceback(None)
            exc.__context__ = exc.__cause__ = None
            q.grad = t.grad = None
            free_memory(device)
            return
        for k, v in zip(PARTS, ms):
            o[dest][k].append(v)
        o["losses"].append(loss)
        if memory:
            o["memory"] = memory

    def per_label(x, lab):
        return x[lab] if isinstance(x, dict) else x

    measure = memory_from_warmup and device.type == "cuda"
    wanted = {lab: per_label(repeats, lab) for lab in labels}
    try:
        for lab in labels:
            n_warm = per_label(warmup, lab)
            for i in range(n_warm):
                if out[lab]["error"] is None:
                    run(lab, "warmup_ms", {} if measure and i == n_warm - 1 else None)
        per_round = sum(o["warmup_ms"]["fwd_bwd"][-1] for o in out.values()
                        if o["error"] is None and o["warmup_ms"]["fwd_bwd"])
        time_left = None if deadline_at is None else deadline_at - time.perf_counter()
        n_rounds = planned_repeats(per_round, max(wanted.values(), default=0), budget_s, min_repeats, time_left)
        for lab in labels:
            out[lab]["repeats"] = min(wanted[lab], n_rounds)
        for it in range(n_rounds):
            for lab in (labels if it % 2 == 0 else labels[::-1]):
                if out[lab]["error"] is None and it < out[lab]["repeats"]:
                    run(lab, "raw_ms")
    except KeyboardInterrupt:  # stopped: what ran is kept, each unfinished label marked partial
        for o in (out[lab] for lab in labels):
            done = len(o["raw_ms"]["fwd_bwd"])
            if o["error"] is None and done < o.get("repeats", 1):  # no "repeats" yet: stopped in the warm-ups
                o.update(partial=True, repeats_done=done,
                         partial_median_ms={k: statistics.median(v) for k, v in o["raw_ms"].items() if v})
        raise
    finally:
        for o in (out[lab] for lab in labels):
            ok = o["error"] is None and not o.get("partial") and all(o["raw_ms"].values())
            for key, f in (("median_ms", statistics.median), ("min_ms", min), ("max_ms", max)):
                o[key] = {k: f(v) for k, v in o["raw_ms"].items()} if ok else {}
    return out


def _proc_status_kib() -> dict:
    """VmRSS and VmHWM (KiB) from /proc/self/status."""
    with open("/proc/self/status") as f:
        return {ln.split(":")[0]: int(ln.split()[1]) for ln in f if ln.startswith(("VmRSS:", "VmHWM:"))}


def cpu_peak_rss_of_call(fn, q, t, *, tolerance_kib: int = RSS_NOISE_BYTES // 1024) -> dict:
    """Peak RSS during ``fn(q, t).backward()`` minus the RSS just before (bytes): the high-water mark
    VmHWM, reset first (clear_refs) where it is above the RSS; ``baseline_clean`` says they agree."""
    gc.collect()
    before = _proc_status_kib()
    reset = False
    if before["VmHWM"] - before["VmRSS"] > tolerance_kib:
        with contextlib.suppress(OSError):  # reset the peak mark to the current RSS: Linux clear_refs 5
            Path("/proc/self/clear_refs").write_text("5")
            reset = True
        before = _proc_status_kib()
    loss = fn(q, t)
    after_fwd = _proc_status_kib()
    loss.backward()
    after_bwd = _proc_status_kib()
    value = float(loss.detach())
    del loss
    gc.collect()
    end, base = _proc_status_kib(), before["VmRSS"]
    return {"method": "VmHWM after - VmRSS before (/proc/self/status), fresh process",
            "baseline_clean": abs(before["VmHWM"] - base) <= tolerance_kib, "peak_mark_reset": reset,
            "rss_before_kib": base, "peak_fwd_bytes": (after_fwd["VmHWM"] - base) * 1024,
            "retained_after_fwd_bytes": (after_fwd["VmRSS"] - base) * 1024,
            "peak_bytes": (after_bwd["VmHWM"] - base) * 1024, "retained_after_bytes": (end["VmRSS"] - base) * 1024,
            "loss": value, "raw_kib": {"before": before, "after_fwd": after_fwd, "after_bwd": after_bwd, "end": end}}


def cuda_peak_of_call(fn, q, t, device: torch.device) -> dict:
    """torch.cuda.max_memory_allocated() during fn(q, t).backward() minus memory_allocated() before."""
    mem: dict = {}
    _one_run(fn, q, t, device, mem)
    return {**mem, "method": "torch.cuda.max_memory_allocated delta"}


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
