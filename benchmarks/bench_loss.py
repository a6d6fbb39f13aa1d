#!/usr/bin/env python3
"""Benchmark of the fused hardness-weighted contrastive loss against the eager LLaVE formula.

    python benchmarks/bench_loss.py [--quick] [--backends torch reference --B 2048 8192 --d 1024]

Correctness against float64 first, then interleaved timing and peak memory: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
from _infcl import inf_cl_available, make_inf_cl_loss  # noqa: E402
from gemm3 import gemm3_fn  # noqa: E402
from gpu_ceilings import measure_ceilings  # noqa: E402
from llave_fast import hardness_weighted_loss  # noqa: E402
from llave_fast.backends import launch  # noqa: E402
from llave_fast.backends import triton_backend as tb  # noqa: E402
from llave_fast.backends.common import plan_s, s_cache_budget, s_mode_setting  # noqa: E402
from llave_fast.reference import reference_loss  # noqa: E402
from report import loss_table  # noqa: E402

# the memory-lean ones (numerators of the ratios); "triton" and "torch" run the package's default path
FUSED = ("triton", "triton_cache", "triton_stream", "triton_strip", "triton_tuned", "torch", "torch_chunked")
ALL_BACKENDS = (*FUSED, "reference", "compile", "inf_cl", "gemm3")
# the others force where S lives: (the package's backend, its kernel_config); triton_tuned: the one-pass
# path with the library autotuner's tiles (chosen in its first warm-up run; the sweep is in "autotune")
FORCED = {"triton_cache": ("triton", dict(S_MODE="cache")), "triton_stream": ("triton", dict(S_MODE="stream")),
          "triton_strip": ("triton", dict(S_MODE="fused")), "torch_chunked": ("torch", dict(S_MODE="fused")),
          "triton_tuned": ("triton", dict(S_MODE="fused", autotune=True))}
BASELINES = ("reference", "compile", "gemm3")  # gemm3: not a loss, the three cuBLAS GEMMs the loss needs at least
DEFAULT_BACKENDS = {"cpu": ["torch", "torch_chunked", "reference"],
                    "cuda": [b for b in ALL_BACKENDS if b not in ("torch_chunked", "triton_tuned")]}
# acceptance point (CPU): torch backend vs eager reference
ACCEPT = dict(B=8192, d=1024, dtype="fp32", time_ratio_max=0.8, mem_ratio_max=0.1)
TOLERANCES = C.TOLERANCES  # (loss, gradients) against the float64 truth
# the deadline's prediction of a (dtype, d, B) group: predicted seconds x margin + a fixed allowance;
# on CPU each memory figure is a fresh process, about this much beyond the run itself
PREDICT_MARGIN = 1.25
GROUP_OVERHEAD_S = 2.0
CPU_MEMORY_WORKER_S = 4.0
USEFUL_GEMMS = (1, 3)  # the three-GEMM floor's count, used for every backend's "useful" TFLOP/s
# (symmetric, one-way) GEMM-equivalents (forward, backward) of the others; inf_cl's backward: a dq and a dk kernel
# per direction, each recomputing the logits
OTHER_GEMMS = {"gemm3": ((1, 2), (1, 2)), "reference": ((2, 4), (1, 2)), "compile": ((2, 4), (1, 2)),
               "inf_cl": ((2, 8), (1, 4))}
log = functools.partial(print, flush=True)


def gemm_counts(backend: str, symmetric: bool, B: int = 0, N: int = 0, device="cpu") -> tuple[int, int]:
    """GEMM-equivalents (2*B*N*d FLOPs each) of (forward, backward) as each backend runs them
    (benchmarks/README.md, "FLOP rates"); a fused one keeps S where the backends' own plan does."""
    if backend in FUSED:
        mode = s_mode_setting(FORCED[backend][1]["S_MODE"] if backend in FORCED else None)
        kept = plan_s(B, N, keep=True, mode=mode, budget=s_cache_budget(torch.device(device))).mode == "cache"
        return (1, 2) if kept else (1, 3)
    return OTHER_GEMMS[backend][0 if symmetric else 1]


def backend_available(name: str, device: torch.device) -> tuple[bool, str]:
    if name.startswith("triton"):
        if device.type != "cuda":
            return False, f"{name} is benchmarked on CUDA only (on CPU it runs under the interpreter)"
        return tb.available_on(device)
    if name == "gemm3" and device.type != "cuda":
        return False, "gemm3 (the three cuBLAS GEMMs) is a GPU floor: CUDA only"
    return inf_cl_available(device) if name == "inf_cl" else (True, "")


def backward_config(loss: torch.Tensor, **cfg) -> torch.Tensor:
    """Run the triton backward of ``loss`` under ``kernel_config(**cfg)`` too (it runs after the
    forward's ``with`` has closed): hooks on the loss's node set the override and restore it."""
    todo, seen = [loss.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            if "TritonHardnessLoss" in type(node).__name__:
                break
            seen.add(node)
            todo.extend(f for f, _ in node.next_functions)
    else:
        raise RuntimeError("backward_config: no TritonHardnessLoss node in the graph of the loss")
    saved = {}

    def pre(grad_outputs):  # the override as a plain assignment: nothing added to the timed backward
        saved["old"], tb._CONFIG_OVERRIDE = tb._CONFIG_OVERRIDE, dict(cfg)

    def post(grad_inputs, grad_outputs):
        tb._CONFIG_OVERRIDE = saved.get("old")

    node.register_prehook(pre)
    node.register_hook(post)
    return loss


def make_loss_fn(name: str, *, alpha: float, scale, symmetric: bool, deterministic: bool, d: int):
    """A callable (q, t) -> scalar mean loss for one backend (gemm3: the GEMM floor, not a loss)."""
    kw = dict(logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction="mean")
    if name in ("torch", "reference", "triton"):
        return lambda q, t: hardness_weighted_loss(q, t, **kw, backend=name, deterministic=deterministic)
    if name in FORCED:
        backend, cfg = FORCED[name]

        def fn(q, t):  # only the path is forced; torch's backward follows its forward's path by itself
            with tb.kernel_config(**cfg):
                loss = hardness_weighted_loss(q, t, **kw, backend=backend, deterministic=deterministic)
            return backward_config(loss, **cfg) if backend == "triton" else loss
        return fn
    if name == "gemm3":
        return gemm3_fn()
    if name == "compile":
        torch._dynamo.reset()  # fresh graph per shape: no dynamic-shape kernels, no recompile limit
        compiled = torch.compile(reference_loss, dynamic=False)
        return lambda q, t: compiled(q, t, **kw)
    if name == "inf_cl":
        if alpha != 0:
            raise ValueError("Inf-CL has no hardness weights: it is compared at alpha = 0 only")
        return make_inf_cl_loss(scale=float(scale), symmetric=symmetric, d=d)
    raise ValueError(name)


def check_all(backends, args, device, report: dict | None = None) -> dict:
    """{backend: {"passed", "checks"}} against the float64 truth (benchmarks/README.md, "Correctness first"), filled
    into ``report`` as it goes; torch.compile's ``check_wall_s`` is the deadline's allowance per new size."""
    report = {} if report is None else report
    report.update({b: {"passed": True, "checks": []} for b in backends})
    B = 2560 if device.type == "cpu" else 4096
    log("correctness vs reference (float64 truth)")
    for i, dn in enumerate(args.dtype):
        g = torch.Generator().manual_seed(args.seed + 1000 + i)
        q0 = C.normalized_rows(B, 256, dtype=torch.float32, device=device, generator=g)
        t0 = C.normalized_rows(B, 256, dtype=torch.float32, device=device, generator=g, like=q0, noise=1.0)
        q0, t0 = q0.to(C.DTYPES[dn]), t0.to(C.DTYPES[dn])  # rounded once; the truth uses these values
        for b in backends:
            if b == "gemm3":
                report[b]["note"] = "not a loss (the GEMM floor): nothing to check"
                continue
            alpha, t_check = 0.0 if b == "inf_cl" else args.alpha, time.perf_counter()
            rec = {"case": f"moderate-{dn}", "B": B, "d": 256, "alpha": alpha, "dtype": dn}
            try:
                x64 = [x.detach().double().requires_grad_() for x in (q0, t0)]
                x = [x.detach().clone().requires_grad_() for x in (q0, t0)]
                losses = [reference_loss(*x64, logit_scale=args.logit_scale, alpha=alpha, symmetric=args.symmetric),
                          make_loss_fn(b, alpha=alpha, scale=args.logit_scale, symmetric=args.symmetric,
                                       deterministic=args.deterministic, d=256)(*x)]
                for loss in losses:
                    loss.backward()
                tf32 = b == "inf_cl" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)
                kind = "tf32" if dn == "fp32" and tf32 else dn
                tol_loss, tol_grad = TOLERANCES[kind]
                errs = {"loss": C.rel_err(losses[1], losses[0]), "dq": C.rel_err(x[0].grad, x64[0].grad),
                        "dt": C.rel_err(x[1].grad, x64[1].grad)}
                rec.update(tolerance_kind=kind, tol_loss=tol_loss, tol_grad=tol_grad, errors=errs,
                           passed=errs["loss"] <= tol_loss and max(errs["dq"], errs["dt"]) <= tol_grad,
                           loss=float(losses[1].detach()), truth_loss=float(losses[0].detach()))
                msg = ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + f"; tol {tol_loss:.0e}/{tol_grad:.0e}"
            except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
                rec.update(passed=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=4))
                msg = rec["error"]
            rec["wall_s"] = time.perf_counter() - t_check
            if b == "compile":
                report[b]["check_wall_s"] = max(report[b].get("check_wall_s", 0.0), rec["wall_s"])
            report[b]["checks"].append(rec)
            report[b]["passed"] &= rec["passed"]
            log(f"  {b} ({dn}, B={B}, d=256, alpha={alpha:g}): {'ok' if rec['passed'] else 'FAILED'} ({msg})")
    return report


def mem_worker(spec: dict) -> None:
    """The CPU memory figure of one (backend, size), in this fresh process (benchmarks/README.md, "Peak memory")."""
    torch.manual_seed(0)
    dtype, device = C.DTYPES[spec["dtype"]], torch.device("cpu")
    fn = make_loss_fn(spec["backend"], alpha=spec["alpha"], scale=spec["scale"], symmetric=spec["symmetric"],
                      deterministic=spec["deterministic"], d=spec["d"])
    # a small warm-up loads the libraries (MKL/oneDNN kernels, autograd) before the baseline
    for (q, t) in C.make_pairs(2, 256, min(spec["d"], 128), dtype=dtype, device=device, seed=1):
        fn(q, t).backward()
    (q, t), = C.make_pairs(1, spec["B"], spec["d"], dtype=dtype, device=device, seed=spec["seed"])
    if spec["backend"] == "compile":  # compiled per shape: compile here first (the peak mark is reset below)
        fn(q, t).backward()
        q.grad = t.grad = None
    C.print_peak(fn, q, t)


def finish_record(rec, tm, fn, pairs, args, device, measure_memory: bool = True) -> dict:
    """``rec`` completed from its timings ``tm``: status, peak memory (benchmarks/README.md), FLOP rates; without
    ``measure_memory`` (the run was stopped) a memory figure not taken yet is marked not measured; ``tm`` stopped
    before its timed runs were all taken (``partial``): status PARTIAL with the count of runs taken, no median."""
    name, B, d = rec["backend"], rec["B"], rec["d"]
    rec["timing"] = {k: v for k, v in tm.items() if k not in ("exception", "memory")}
    if tm["error"] is not None:
        oom = isinstance(tm["exception"], torch.OutOfMemoryError) or "out of memory" in tm["error"].lower()
        rec.update(status="OOM" if oom else "ERROR", error=tm["error"])
        return rec
    if not all(math.isfinite(x) for x in tm["losses"]):
        rec["status"] = "NONFINITE"
        return rec
    not_measured = {"peak_bytes": None, "not_measured": "the run was stopped before this figure was taken"}
    if tm.get("partial"):  # stopped in its timing loop: no median, no FLOP rate, no ratio (benchmarks/README.md)
        rec.update(status="PARTIAL", partial=True, repeats_done=tm["repeats_done"],
                   repeats_planned=tm.get("repeats", runs_of(name, args)[1]),
                   memory=dict(tm["memory"]) if device.type == "cuda" and tm.get("memory") else not_measured)
        return rec
    if device.type == "cuda" and tm.get("memory"):
        rec["memory"] = dict(tm["memory"])
    elif not measure_memory:
        rec["memory"] = not_measured
    elif device.type == "cuda":
        rec["memory"] = C.cuda_peak_of_call(fn, *pairs[0], device)
    else:
        spec = dict(backend=name, B=B, d=d, dtype=rec["dtype"], alpha=rec["alpha"], scale=args.logit_scale,
                    symmetric=args.symmetric, deterministic=args.deterministic, seed=args.seed + 7)
        rec["memory"] = C.peak_in_fresh_process(Path(__file__).resolve(), spec)
    gf, gb = gemm_counts(name, args.symmetric, B, B, device)
    uf, ub = (gf, gb) if name == "gemm3" else USEFUL_GEMMS  # the floor's own count is its useful work
    one, med = 2.0 * B * B * d, tm["median_ms"]
    rec["flops"] = {"gemm_flops": one, "gemms_fwd": gf, "gemms_bwd": gb, "useful_gemms_fwd": uf, "useful_gemms_bwd": ub}
    for key, (f, b) in (("tflops_achieved", (gf, gb)), ("tflops_useful", (uf, ub))):
        rec[key] = {k: n * one / (med[k] * 1e-3) / 1e12 for k, n in (("fwd", f), ("bwd", b), ("fwd_bwd", f + b))}
    rec["status"] = "ok"
    return rec


def autotune_records() -> list[dict]:
    """The library autotuner's sweeps in this process (``launch.TUNE_LOG``: triton_tuned's, or any backend's
    under LLAVE_FAST_AUTOTUNE=1; each candidate's median ms, or why it was refused), keys as strings."""
    return [dict(r, key=[str(k) for k in r["key"]]) for r in launch.TUNE_LOG]


def alpha0_fused(backends, args):
    """The fused backend timed at alpha = 0 beside Inf-CL (--alpha0-fused, else the first fused one)."""
    return args.alpha0_fused if args.alpha0_fused in backends else next((f for f in FUSED if f in backends), None)


def runs_of(backend: str, args) -> tuple[int, int]:
    """(untimed, timed) runs: --warmup-for, else --warmup (compile: 3 at least); --repeats-for, else --repeats."""
    warm = (args.warmup_for or {}).get(backend, max(args.warmup, 3 if backend == "compile" else 0))
    return warm, (args.repeats_for or {}).get(backend, args.repeats)


def tune_allowance_s() -> float:
    """triton_tuned's allowance per new size: the wall time of the autotuner's latest forward and backward
    sweeps in this process (each new size class sweeps both again); 0 before any sweep."""
    return sum(r.get("wall_s", 0.0) for r in launch.TUNE_LOG[-2:])


def predict_rows(rows, hist: dict, B: int, d: int, args, device, compile_s: float = 0.0,
                 tune_s: float = 0.0) -> dict | None:
    """{label: predicted seconds} of a (dtype, d, B) group from ``hist[label] = (B, d, median ms per timed run)``
    (benchmarks/README.md, ``--deadline-s``); None before anything was timed."""
    if not hist:
        return None
    scaled = {lab: ms * (B / B0) ** 2 * (d / d0) for lab, (B0, d0, ms) in hist.items()}
    per_run = {label: scaled.get(label, max(scaled.values())) for _, label, _ in rows}  # never timed: the dearest
    cuda, out = device.type == "cuda", {}
    for b, label, _ in rows:
        round_ms = per_run[label] if args.sequential else sum(per_run.values())
        warm, reps = runs_of(b, args)
        reps = C.planned_repeats(round_ms, reps, args.point_budget_s)
        runs = warm + reps + (0 if cuda and warm > 0 else 1)  # CUDA measures the memory in the last warm-up
        out[label] = (per_run[label] * runs / 1e3 + (0.0 if cuda else CPU_MEMORY_WORKER_S)
                      + (compile_s if b == "compile" else 0.0) + (tune_s if b == "triton_tuned" else 0.0))
    return out


def fit_deadline(rows, pred: dict | None, time_left_s: float) -> tuple[list, list]:
    """(kept, dropped) rows so that the kept ones' predicted time fits: the first row (the package's
    default) is kept while it fits alone, the dearest others go first."""
    if pred is None:
        return (list(rows), []) if time_left_s > 0 else ([], list(rows))
    keep, dropped = list(rows), []
    while keep and GROUP_OVERHEAD_S + PREDICT_MARGIN * sum(pred[label] for _, label, _ in keep) > time_left_s:
        worst = max(keep[1:] or keep, key=lambda r: pred[r[1]])
        keep.remove(worst)
        dropped.append(worst)
    return keep, dropped


def run_benchmarks(backends, report, args, device, on_progress=None, results: list | None = None) -> list[dict]:
    """Times every (dtype, d, B) group into ``results``; ``on_progress(results)`` after each group (and
    each backend with --sequential) writes what was measured."""
    results = [] if results is None else results
    progress = on_progress or (lambda _: None)
    mem_avail = psutil.virtual_memory().available
    hist = {}  # label -> (B, d, median fwd+bwd ms of its timed runs) at the last size it ran
    compile_s = report.get("compile", {}).get("check_wall_s", 0.0)
    deadline_at = None if args.deadline_s is None else args.t_begin + args.deadline_s
    log("timing " + ("(one backend at a time)" if args.sequential else "(interleaved)") + " + peak memory")

    def done(rec, msg):
        results.append(rec)
        log(f"  {rec['label']} {rec['dtype']} B=N={rec['B']} d={rec['d']}: {msg}")

    def skip(base, why):
        done({**base, "status": "SKIPPED", "note": why}, f"SKIPPED ({why})")

    rows = [(b, b, args.alpha) for b in backends if b != "inf_cl"]  # (backend, label, alpha) of every size
    if "inf_cl" in backends:  # no hardness weights: Inf-CL and a fused backend at alpha = 0
        fused = alpha0_fused(backends, args)
        if fused is not None and args.alpha != 0:
            rows.append((fused, f"{fused}@alpha=0", 0.0))
        rows.append(("inf_cl", "inf_cl@alpha=0", 0.0))
    for dn, d, B in itertools.product(args.dtype, args.d, sorted(args.B)):
        kept = {}  # (backend, label, alpha) -> the record's first fields
        for b, label, alpha in rows:
            base = {"backend": b, "label": label, "dtype": dn, "B": B, "N": B, "d": d, "alpha": alpha,
                    "logit_scale": args.logit_scale, "symmetric": args.symmetric}
            need = (5 * C.DTYPES[dn].itemsize + 1) * B * B  # the eager ones' B x N matrices: about 5, a bool mask
            checks = [c["passed"] for c in report[b]["checks"] if c["case"] == f"moderate-{dn}"]
            if args.max_B and B > args.max_B.get(b, B):
                skip(base, f"--max-B {b}={args.max_B[b]}")
            elif args.only_B and b in args.only_B and B not in args.only_B[b]:
                skip(base, f"--only-B {b}={','.join(map(str, sorted(args.only_B[b])))}")
            elif device.type == "cpu" and b in ("reference", "compile") and need > 0.6 * mem_avail:
                skip(base, f"needs ~{need / C.MiB:.0f} MiB, {mem_avail / C.MiB:.0f} MiB available")
            elif b != "gemm3" and not (checks and all(checks)):  # the floor has no check
                done({**base, "status": "FAILED"}, "FAILED correctness, not timed")
            else:
                kept[(b, label, alpha)] = base
        if args.deadline_s is not None and kept:
            left = deadline_at - time.perf_counter()
            pred = predict_rows(list(kept), hist, B, d, args, device, compile_s, tune_allowance_s())
            _, dropped = fit_deadline(list(kept), pred, left)
            for row in dropped:
                p = "" if pred is None else f", this backend predicted ~{pred[row[1]]:.0f} s here"
                skip(kept.pop(row), f"--deadline-s {args.deadline_s:g}: {left:.0f} s left{p}")
            if pred is not None and kept:
                log(f"  {dn} B=N={B} d={d}: predicted {sum(pred[r[1]] for r in kept):.1f} s for {len(kept)} "
                    f"backends ({left:.0f} s left before the deadline)")
        todo = []
        for (b, label, alpha), base in kept.items():
            try:
                todo.append((base, make_loss_fn(b, alpha=alpha, scale=args.logit_scale, symmetric=args.symmetric,
                                                deterministic=args.deterministic, d=d)))
            except Exception as exc:  # noqa: BLE001
                done({**base, "status": "ERROR", "error": f"{type(exc).__name__}: {exc}"}, f"ERROR {exc}")
        if not todo:
            continue
        C.free_memory(device)
        try:
            why, pairs = None, C.make_pairs(args.n_inputs, B, d, dtype=C.DTYPES[dn], device=device,
                                            seed=args.seed + B + d)
        except Exception as exc:  # noqa: BLE001 - this size's error (an OOM at a large B), the run goes on
            oom = isinstance(exc, torch.OutOfMemoryError)
            why = f"building the inputs: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
        if why is not None:  # out of the except block: its frames no longer hold what was allocated
            for base, _ in todo:
                done({**base, "status": "OOM" if oom else "ERROR", "error": why}, f"{'OOM' if oom else 'ERROR'} {why}")
            C.free_memory(device)
            progress(results)
            continue
        # SIGINT/SIGTERM (KeyboardInterrupt) in the timing loop or a memory figure: the runs taken are kept (a row
        # whose timed runs were not all taken is PARTIAL), written, then the stop is raised on
        stopped = None
        for batch in ([[x] for x in todo] if args.sequential else [todo]):
            t0, timings = time.perf_counter(), {}
            try:
                C.time_interleaved(
                    {base["label"]: fn for base, fn in batch}, pairs, device=device,
                    warmup={base["label"]: runs_of(base["backend"], args)[0] for base, _ in batch},
                    repeats={base["label"]: runs_of(base["backend"], args)[1] for base, _ in batch},
                    budget_s=args.point_budget_s, deadline_at=deadline_at, memory_from_warmup=True, into=timings)
            except KeyboardInterrupt as exc:
                stopped = exc
                log(f"  stopped ({str(exc) or 'KeyboardInterrupt'}) while timing {dn} B=N={B} d={d}: the runs "
                    "taken are kept")
            t_time = time.perf_counter() - t0
            for base, fn in batch:
                t1, rec = time.perf_counter(), dict(base)
                tm = timings.get(base["label"]) or {"raw_ms": {k: [] for k in C.PARTS}, "losses": [], "error": None,
                                                    "exception": None, "partial": True, "repeats_done": 0}
                try:
                    finish_record(rec, tm, fn, pairs, args, device, stopped is None)
                except KeyboardInterrupt as exc:
                    stopped, rec = exc, dict(base)
                    finish_record(rec, tm, fn, pairs, args, device, measure_memory=False)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    rec.update(status="OOM" if isinstance(exc, torch.OutOfMemoryError) else "ERROR",
                               error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=6))
                C.free_memory(device)
                rec.update(wall_s_memory=time.perf_counter() - t1, wall_s_timing_group=t_time)
                if rec["status"] == "PARTIAL":
                    done(rec, f"PARTIAL: stopped after {rec['repeats_done']} of {rec['repeats_planned']} timed runs"
                              + ("" if not rec["repeats_done"] else
                                 f" (median of those {rec['timing']['partial_median_ms']['fwd_bwd']:.1f} ms)"))
                    continue
                if rec["status"] != "ok":
                    done(rec, f"{rec['status']} {rec.get('error', '')}")
                    continue
                m, peak = rec["timing"]["median_ms"], rec["memory"]["peak_bytes"]
                hist[base["label"]] = (B, d, m["fwd_bwd"])
                done(rec, f"fwd {m['fwd']:.1f} ms, bwd {m['bwd']:.1f} ms, fwd+bwd {m['fwd_bwd']:.1f} ms, peak "
                          + ("not measured (stopped)" if peak is None else f"{peak / C.MiB:.1f} MiB")
                          + f" ({rec['timing']['repeats']} timed runs)")
            if stopped is not None:
                progress(results)
                raise stopped
            if args.sequential:
                progress(results)
        del pairs, timings
        C.free_memory(device)
        progress(results)
    return results


def compute_ratios(results, backends, args) -> list[dict]:
    """Fused / baseline time (medians) and peak memory at each size, from the same run; printed as a table."""
    ok = {(r["label"], r["dtype"], r["B"], r["d"]): r for r in results if r.get("status") == "ok"}
    if args.alpha == 0:  # the fused row is its own alpha = 0 row
        ok.update({(f"{k[0]}@alpha=0", *k[1:]): r for k, r in list(ok.items()) if k[0] in FUSED})
    pairs = [(num, den) for num in FUSED if num in backends for den in BASELINES if den in backends]
    fused = alpha0_fused(backends, args) if "inf_cl" in backends else None
    if fused:
        pairs.append((f"{fused}@alpha=0", "inf_cl@alpha=0"))
    if pairs:
        log("\nRatios, measured side by side in this run (time: medians; < 1: the numerator is faster / leaner)\n"
            f"{'dtype':>5} {'B=N':>6} {'d':>5}  {'numerator / denominator':<30} {'fwd':>6} {'bwd':>6} {'fwd+bwd':>7} "
            f"{'peak mem':>8}")
    out = []
    for (num, den), dn, d, B in itertools.product(pairs, args.dtype, args.d, sorted(args.B)):
        a, b = ok.get((num, dn, B, d)), ok.get((den, dn, B, d))
        rec = {"numerator": num, "denominator": den, "dtype": dn, "B": B, "d": d}
        head = f"{dn:>5} {B:>6} {d:>5}  {num + ' / ' + den:<30}"
        if a is None or b is None:
            rec["status"] = "n/a (a side FAILED, SKIPPED, PARTIAL or errored)"
            log(f"{head} {rec['status']}")
        else:
            ma, mb = a["timing"]["median_ms"], b["timing"]["median_ms"]
            pa, pb = a["memory"]["peak_bytes"], b["memory"]["peak_bytes"]
            rec.update(status="ok", time_ratio={k: ma[k] / mb[k] for k in ("fwd", "bwd", "fwd_bwd")},
                       mem_ratio=pa / pb if pa is not None and pb else None)  # None: not measured, or a zero peak
            tr = rec["time_ratio"]
            log(f"{head} {tr['fwd']:6.3f} {tr['bwd']:6.3f} {tr['fwd_bwd']:7.3f} {C.fmt(rec['mem_ratio'], '.3f'):>8}")
        out.append(rec)
    return out


def acceptance(ratios, args, device) -> dict | None:
    """CPU: torch / reference at the acceptance point (fwd+bwd medians, peak memory) against the targets."""
    if device.type != "cpu":
        return None
    a = ACCEPT
    out = {"point": dict(B=a["B"], N=a["B"], d=a["d"], dtype=a["dtype"]),
           "at_acceptance_config": args.symmetric and args.alpha == 9.0 and args.logit_scale == 50.0,
           "targets": {k: a[k] for k in ("time_ratio_max", "mem_ratio_max")}}
    log(f"\nAcceptance (CPU, {a['dtype']}, B=N={a['B']}, d={a['d']}"
        + ("" if out["at_acceptance_config"] else "; NOT the acceptance configuration: symmetric, alpha 9, scale 50")
        + "):")
    point = ("torch", "reference", a["dtype"], a["B"], a["d"])
    r = next((r for r in ratios if (r["numerator"], r["denominator"], r["dtype"], r["B"], r["d"]) == point), {})
    if r.get("status") != "ok":
        out["status"] = f"not measured ({r.get('status', 'not in this run')})"
        log(f"  {out['status']}")
        return out
    tr, mr = r["time_ratio"]["fwd_bwd"], r["mem_ratio"]
    out.update(status="measured", time_ratio=tr, mem_ratio=mr, time_pass=tr <= a["time_ratio_max"],
               mem_pass=None if mr is None else mr <= a["mem_ratio_max"])
    for what, x, ok, key in (("time (fwd+bwd medians)", tr, out["time_pass"], "time_ratio_max"),
                             ("peak memory", mr, out["mem_pass"], "mem_ratio_max")):
        word = "n/a (not measured)" if ok is None else "PASS" if ok else "FAIL"
        log(f"  torch / reference {what:<22} = {C.fmt(x, '.3f')}  (target <= {a[key]})  {word}")
    return out


def write_plot(results, json_path: Path) -> Path | None:
    """Time and peak memory against B, one row of two plots per (dtype, d), as a PNG beside the JSON."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        log("matplotlib is not importable: plot skipped")
        return None
    series = {}  # (dtype, d) -> label -> its ok records, by B
    for r in sorted((r for r in results if r.get("status") == "ok"), key=lambda r: r["B"]):
        series.setdefault((r["dtype"], r["d"]), {}).setdefault(r["label"], []).append(r)
    if not series:
        return None
    fig = Figure(figsize=(11, 4 * len(series)))
    axes = fig.subplots(len(series), 2, squeeze=False)
    for row, ((dn, d), by_label) in enumerate(sorted(series.items())):
        for label, rs in sorted(by_label.items()):
            axes[row][0].plot([r["B"] for r in rs], [r["timing"]["median_ms"]["fwd_bwd"] for r in rs], "o-",
                              label=label)
            rs = [r for r in rs if r["memory"]["peak_bytes"] is not None]  # a run stopped before its memory figure
            axes[row][1].plot([r["B"] for r in rs], [r["memory"]["peak_bytes"] / C.MiB for r in rs], "o-", label=label)
        for ax, ylab in zip(axes[row], ("fwd+bwd time (ms, median)", "peak extra memory (MiB)")):
            ax.set(yscale="log", xlabel="B = N", ylabel=ylab, title=f"{dn}, d={d}")
            ax.set_xscale("log", base=2)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    log(f"plot written to {png}")
    return png


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--backends", nargs="+", choices=ALL_BACKENDS, help=f"default: {DEFAULT_BACKENDS}")
    add("--B", nargs="+", type=int, help="batch sizes (N = B); default CPU: 2048 4096 8192")
    add("--d", nargs="+", type=int, help="embedding widths; default 1024")
    add("--dtype", nargs="+", choices=("fp32", "bf16", "fp16"), help="default: fp32 (CPU), fp32 bf16 (CUDA)")
    add("--repeats", type=int, help="timed runs per point; default 3 (CPU), 20 (CUDA)")
    add("--warmup", type=int, help="untimed runs first; default 1 (CPU), 3 (CUDA)")
    add("--out", type=Path, help="JSON path; default benchmarks/results/<device-slug>/<YYYY-MM-DD>.json")
    add("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    add("--device", choices=("auto", "cpu", "cuda"), default="auto")
    add("--alpha", type=float, default=9.0)
    add("--logit-scale", type=float, default=50.0)
    add("--one-way", dest="symmetric", action="store_false", help="query->target only (default symmetric)")
    add("--deterministic", action="store_true",
        help="pass deterministic=True (accepted, changes nothing: every backward is bitwise reproducible)")
    add("--tf32", action="store_true", help="CUDA: allow TF32 matmuls (default: left as torch has it)")
    add("--n-inputs", type=int, default=3, help="input pairs rotated among runs")
    add("--seed", type=int, default=0)
    add("--point-budget-s", type=float, help="~seconds of timed runs per size (at least 3 runs)")
    add("--deadline-s", type=float, help="start no backend predicted to end after this (SKIPPED)")
    add("--repeats-for", nargs="+", metavar="BACKEND=N", help="timed runs for one backend, e.g. inf_cl=1")
    add("--warmup-for", nargs="+", metavar="BACKEND=N", help="untimed runs for one backend")
    add("--sequential", action="store_true", help="one backend at a time, the JSON written after each")
    add("--max-B", nargs="+", metavar="BACKEND=B", help="largest B for a backend, e.g. reference=65536")
    add("--only-B", nargs="+", metavar="BACKEND=B[,B...]", help="a backend at these B only")
    add("--alpha0-fused", choices=FUSED, help="with inf_cl: the fused backend timed at alpha = 0")
    add("--no-plot", action="store_true", help="write no PNG beside the JSON")
    add("--no-ceilings", action="store_true", help="CUDA: skip measuring the copy and bf16 GEMM ceilings first")
    add("--_mem-worker", dest="mem_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, lo, many in (("max_B", 0, False), ("only_B", 0, True), ("repeats_for", 1, False),
                           ("warmup_for", 0, False)):
        items, vals = getattr(args, flag), {}
        for item in items or ():
            name, sep, val = item.partition("=")
            nums = val.split(",") if many else [val]
            if not sep or name not in ALL_BACKENDS or not all(v.isdigit() and int(v) >= lo for v in nums):
                p.error(f"--{flag.replace('_', '-')} takes BACKEND={'N[,N...]' if many else 'N'} with BACKEND in "
                        f"{ALL_BACKENDS} and N an integer >= {lo}, got {item!r}")
            vals[name] = sorted({int(v) for v in nums}) if many else int(val)  # a list: the file holds JSON
        setattr(args, flag, vals if items is not None else None)
    if args.mem_worker is not None:
        return args
    for flag in ("B", "d", "dtype", "backends"):
        given = getattr(args, flag)
        if flag in ("B", "d") and any(x < 1 for x in given or ()):
            p.error(f"--{flag} takes integers >= 1, got {given}")
        if given is not None and len(set(given)) < len(given):
            p.error(f"--{flag} names {sorted({x for x in given if given.count(x) > 1})} more than once, got {given}")
    for flag in ("deadline_s", "point_budget_s"):
        if getattr(args, flag) is not None and getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0 seconds, got {getattr(args, flag):g}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available here (torch.cuda.is_available() is False)")
    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    backends = args.backends or DEFAULT_BACKENDS["cuda" if cuda else "cpu"]
    for flag in ("max_B", "only_B", "repeats_for", "warmup_for"):
        if extra := sorted(set(getattr(args, flag) or ()) - set(backends)):
            p.error(f"--{flag.replace('_', '-')} names {extra}, not in the backends run {backends}")
    if args.alpha0_fused is not None and args.alpha0_fused not in backends:
        p.error(f"--alpha0-fused {args.alpha0_fused} is not in the backends run {backends}")
    for b in ("compile", "triton_tuned"):  # their first run compiles or autotunes: never a timed one
        # (compile's default warm-up is 3 at least whatever --warmup says: runs_of)
        default = 3 if b == "compile" else (1 if args.warmup is None else args.warmup)
        if b in backends and (args.warmup_for or {}).get(b, default) < 1:
            flag = f"--warmup-for {b}=0" if b in (args.warmup_for or {}) else "--warmup 0"
            p.error(f"{flag}: {b}'s first run {'compiles' if b == 'compile' else 'autotunes'}, it would be timed; "
                    f"give it at least one warm-up run (--warmup-for {b}=1)")
    return args


def apply_defaults(args, device):
    cpu = device.type == "cpu"
    if args.repeats is not None and args.repeats < 1:  # before the defaults, which would replace a 0
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    args.backends = args.backends or list(DEFAULT_BACKENDS[device.type])
    if args.quick:
        args.B, args.d = args.B or ([512, 1024] if cpu else [2048, 4096]), args.d or ([256] if cpu else [1024])
        args.repeats = args.repeats or (2 if cpu else 5)
    args.B = args.B or ([2048, 4096, 8192] if cpu else [4096, 8192, 16384, 32768])
    args.d = args.d or [1024]
    args.dtype = args.dtype or (["fp32"] if cpu else ["fp32", "bf16"])
    args.repeats = args.repeats or (3 if cpu else 20)
    args.warmup = args.warmup if args.warmup is not None else (1 if cpu else 3)
    if args.repeats < 1 or args.n_inputs < 1 or args.warmup < 0:
        raise SystemExit("--repeats and --n-inputs must be >= 1, --warmup >= 0")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.mem_worker is not None:
        mem_worker(json.loads(args.mem_worker))
        return 0
    C.start_script()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 |= args.tf32
    args = apply_defaults(args, device)
    t_begin = args.t_begin = time.perf_counter()
    meta = {**C.run_meta(device), "machine_load_before": C.machine_load()}
    ver, git = meta["versions"], meta["git"]
    log(f"llave-fast loss benchmark on {meta['device']['name']}; torch {ver['torch']}, triton {ver['triton']}, "
        f"python {ver['python']}; commit {str(git['commit'])[:12]}{' (dirty)' if git.get('dirty') else ''}")
    log(f"config: backends {args.backends}, B=N {args.B}, d {args.d}, dtype {args.dtype}, "
        f"{'symmetric' if args.symmetric else 'one-way'}, alpha {args.alpha:g}, logit_scale {args.logit_scale:g}, "
        f"warmup {args.warmup}, repeats {args.repeats}, {args.n_inputs} rotating input pairs")
    avail = {b: backend_available(b, device) for b in args.backends}
    backends = [b for b, (ok, _) in avail.items() if ok]
    skipped = {b: why for b, (ok, why) in avail.items() if not ok}
    for b, why in skipped.items():
        log(f"note: backend {b} skipped: {why}")
    if not backends:
        log("no backend can run here")
        return 1
    busy = meta["machine_load_before"]["busy_fraction_others"]
    if busy > 0.1:
        log(f"WARNING: other processes keep {busy:.0%} of the CPUs busy: timings will be noisy and slower")
    out = C.result_path(device, args.out)
    config = {k: v for k, v in vars(args).items() if k not in ("mem_worker", "t_begin")}  # JSON: paths as str
    report, results, payload = {}, [], {"schema": 1, "partial": True, "meta": meta, "config": config}

    def write(_=None):
        C.write_json(out, {**payload, "correctness": report, "results": results})

    # SIGINT or SIGTERM end the measuring, not the run: what was measured is written, marked "interrupted"
    try:
        if device.type == "cuda" and not args.no_ceilings:
            meta["ceilings"] = ceil = measure_ceilings(device)
            log(f"ceilings measured here: copy {ceil['copy']['tb_per_s']:.2f} TB/s (read + write), "
                f"bf16 mm {ceil['mm_bf16']['tflop_per_s']:.0f} TFLOP/s")
        check_all(backends, args, device, report)
        C.start_script()  # the checks' objects out of the collector's way too
        write()
        run_benchmarks(backends, report, args, device, on_progress=write, results=results)
    except KeyboardInterrupt as exc:
        payload["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        n_partial = sum(r.get("status") == "PARTIAL" for r in results)
        log(f"\nINTERRUPTED ({payload['interrupted']}) after {time.perf_counter() - t_begin:.0f} s: writing the "
            f"{sum(r.get('status') == 'ok' for r in results)} results measured so far"
            + (f" and {n_partial} PARTIAL (stopped in their timing loop)" if n_partial else ""))
    if meta.get("ceilings"):  # achieved TFLOP/s over the measured bf16 GEMM ceiling
        top = meta["ceilings"]["mm_bf16"]["tflop_per_s"]
        for r in (r for r in results if r.get("status") == "ok"):
            r["fraction_of_mm_ceiling"] = {k: v / top for k, v in r["tflops_achieved"].items()}
            r["fraction_of_mm_ceiling_useful"] = {k: v / top for k, v in r["tflops_useful"].items()}
    if tuned := autotune_records():
        payload["autotune"] = tuned
    log("\n" + "\n".join(loss_table({"meta": meta, "results": results, "autotune": payload.get("autotune")})))
    payload["ratios"] = compute_ratios(results, backends, args)
    payload["acceptance"] = acceptance(payload["ratios"], args, device)
    config.update(device_used=str(device), backends_run=backends, backends_skipped=skipped,
                  tolerances=TOLERANCES, useful_gemms=USEFUL_GEMMS)
    meta["machine_load_after"] = after = C.machine_load()
    log(f"machine load by other processes: {busy:.0%} before the run, {after['busy_fraction_others']:.0%} after "
        "(> 10%: timings disturbed)")
    del payload["partial"]
    payload["total_wall_s"] = time.perf_counter() - t_begin
    png = None if args.no_plot else write_plot(results, out)
    if png:
        payload["plot"] = png.name  # beside the JSON; no machine paths in results
    write()
    log(f"\nresults written to {out}\ntotal wall time {time.perf_counter() - t_begin:.0f} s")
    return 130 if "interrupted" in payload else 0


if __name__ == "__main__":
    sys.exit(main())
