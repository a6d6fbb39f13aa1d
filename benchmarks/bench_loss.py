#!/usr/bin/env python3
"""Benchmark of the fused hardness-weighted contrastive loss against the eager LLaVE formula.

    python benchmarks/bench_loss.py                 # defaults for this machine (CPU or CUDA)
    python benchmarks/bench_loss.py --quick         # a smoke run at small sizes
    python benchmarks/bench_loss.py --backends torch reference --B 2048 8192 --d 1024 --dtype fp32

Order of work: (1) every backend is checked against ``llave_fast.reference.reference_loss``
(float64 truth) on a small case and, at each benchmark dtype, on a moderate one; a backend that
fails is reported FAILED and gets no timing and no ratio. (2) Forward, backward and
forward+backward are timed (median of ``--repeats`` runs after warm-up, rotating among several
input pairs). (3) Peak memory of one forward+backward is measured (CPU: a fresh subprocess and
its peak RSS; CUDA: torch.cuda.max_memory_allocated). (4) A table, the ratios and, on CPU, the
two acceptance ratios at B = N = 8192, d = 1024, fp32 are printed; everything is written to JSON
(and a PNG when matplotlib is importable). See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from llave_fast import hardness_weighted_loss  # noqa: E402
from llave_fast.reference import reference_loss  # noqa: E402

ALL_BACKENDS = ("triton", "triton_cache", "triton_stream", "triton_strip", "triton_tiles", "torch", "torch_chunked",
                "reference", "compile", "inf_cl", "gemm3")
# the memory-lean ones (numerators of the ratios)
FUSED = ("triton", "triton_cache", "triton_stream", "triton_strip", "triton_tiles", "torch", "torch_chunked")
# "torch" keeps S where it fits (the default); "torch_chunked" forces the chunked recompute loop
TORCH_ALL = ("torch", "torch_chunked")
# "triton" runs the default configuration (the path "auto" picks by memory); these force a path
# where S lives (S_MODE, backends.common.S_MODES) and, on the fused path, a backward (BWD)
TRITON_VARIANTS = {
    "triton_cache": dict(S_MODE="cache"),
    "triton_stream": dict(S_MODE="stream"),
    "triton_strip": dict(S_MODE="fused", BWD="strip"),
    "triton_tiles": dict(S_MODE="fused", BWD="tiles"),
}
TRITON_ALL = ("triton", *TRITON_VARIANTS)


def torch_path(backend: str, B: int, N: int, device="cpu", dtype: torch.dtype = torch.float32) -> str:
    """What a torch row runs: "cache" (S kept) or "chunked" (recomputed chunk by chunk)."""
    from llave_fast.backends.torch_backend import s_plan_for

    if backend == "torch_chunked":
        return "chunked"
    return "cache" if s_plan_for(B, N, torch.device(device), dtype, keep=True).mode == "cache" else "chunked"


def triton_path(backend: str, B: int, N: int, device="cpu", dtype: torch.dtype = torch.bfloat16,
                d: int | None = None) -> str:
    """What a triton row runs on CUDA: "cache", "stream", or on the fused path its backward
    ("strip" or "tiles"): forced by the row, or the default configuration's choice for B x N."""
    from llave_fast.backends.common import plan_s, s_cache_budget, s_mode_setting
    from llave_fast.backends.triton_backend import gpu_config

    forced = TRITON_VARIANTS.get(backend, {})
    mode = forced.get("S_MODE") or s_mode_setting()
    if mode == "auto":
        mode = plan_s(B, N, keep=True, mode="auto", budget=s_cache_budget(torch.device(device))).mode
    if mode != "fused":
        return mode
    return forced.get("BWD") or gpu_config(dtype, D=d)["BWD"]


BASELINES = ("reference", "compile", "gemm3")
# not a loss: the three cuBLAS GEMMs the loss needs at least (fwd: S = q T^T; bwd: dS T and dS^T q)
FLOOR = ("gemm3",)

# Acceptance point (CPU): torch backend vs eager reference.
ACCEPT = dict(B=8192, d=1024, dtype="fp32", time_ratio_max=0.8, mem_ratio_max=0.1)

# Tolerances (loss relative error, gradient max-abs error / max |grad|) against the float64 truth.
TOLERANCES = {
    "fp64": (1e-10, 1e-8),
    "fp32": (1e-4, 2e-3),
    "tf32": (5e-3, 5e-2),
    "fp16": (5e-3, 3e-2),
    "bf16": (1e-2, 6e-2),
}

SMALL_CASE = dict(B=64, d=64)  # B a multiple of 64: Inf-CL's backward reads past its buffers otherwise
# checked on the moderate case only: every new shape is a compile of tens of seconds
MODERATE_ONLY = ("compile",)

# The deadline's prediction of a (dtype, d, B) group: its predicted seconds times this margin,
# plus a fixed allowance for making inputs and releasing memory.
PREDICT_MARGIN = 1.25
GROUP_OVERHEAD_S = 2.0
# CPU: each memory figure is a fresh process (imports, a warm-up, the run): about this much
# beyond the run itself
CPU_MEMORY_WORKER_S = 4.0


# --------------------------------------------------------------------------- FLOP counts


def gemm_counts(backend: str, symmetric: bool, deterministic: bool, d: int | None = None, B: int = 0, N: int = 0,
                device="cpu") -> tuple[int, int]:
    """GEMM-equivalents (2*B*N*d FLOPs each) of (forward, backward) as each backend runs them."""
    if backend in TRITON_ALL:
        path = triton_path(backend, B, N, device, d=d)
        if path == "cache":
            return 1, 2  # S kept: dq and dT only
        if path in ("stream", "strip"):
            return 1, 3  # bwd: S again (cuBLAS, or inside the dS kernel), then the two GEMMs
        return 1, (4 if deterministic else 3)  # tiles: recompute S, dq, dT (+1 recompute if deterministic)
    if backend == "gemm3":
        return 1, 2
    if backend in TORCH_ALL:
        return (1, 2) if torch_path(backend, B, N, device) == "cache" else (1, 3)
    if backend in ("reference", "compile"):
        # q @ t^T and t @ q^T are separate products; each one's backward is 2 GEMMs
        return (2, 4) if symmetric else (1, 2)
    if backend == "inf_cl":
        # per direction: fwd 1; bwd: dq kernel (recompute + dq) and dk kernel (recompute + dk)
        return (2, 8) if symmetric else (1, 4)
    raise ValueError(backend)


USEFUL_GEMMS = (1, 3)  # the three-GEMM floor's count, used for every backend's "useful" TFLOP/s


# --------------------------------------------------------------------------- analytic memory


def analytic_peak_bytes(backend: str, B: int, N: int, d: int, dtype: torch.dtype, symmetric: bool,
                        device: torch.device | str = "cpu") -> int | None:
    """Order-of-magnitude model of the extra memory of one forward+backward (inputs excluded).

    reference: per direction it materialises sim, log_w, logits (+ one temporary) as B x N
        matrices in the input dtype, plus a B x N bool mask; direction 1's logits stay saved
        while direction 2 runs, so the peak is ~5 B x N matrices + 1 bool (4 + 1 one-way),
        plus the two gradients.
    torch: ~5 (chunk x N) accumulation-dtype temporaries + 1 bool, plus dq, dT and one
        B x d temporary (the positive's term) in the accumulation dtype.
    triton, tile backward: no B x N or chunk x N tensor: dq, dT fp32 + one B x d temporary
        (+ grads cast back to a 16-bit input dtype).
    triton, strip backward: the dS strip (``strip_rows`` rows of ``ds_row_stride(N)``
        elements, 16-bit for 16-bit inputs), dT fp32, dq fp32 (in the input dtype directly
        when one bf16 strip holds all rows), one B x d temporary, the grads.
    """
    es = torch.empty((), dtype=dtype).element_size()
    acc = 8 if dtype == torch.float64 else 4
    grads = 2 * B * d * es
    if backend == "reference":
        E = B * N
        return (5 if symmetric else 4) * E * es + E + grads
    if backend in TORCH_ALL:
        from llave_fast.backends.torch_backend import chunk_rows

        Ec = chunk_rows(B, N, device) * N
        kept = B * N * acc if torch_path(backend, B, N, device, dtype) == "cache" else 0
        return kept + 5 * Ec * acc + Ec + 3 * B * d * acc + (grads if es != acc else 0)
    path = triton_path(backend, B, N, device, dtype, d) if backend in TRITON_ALL else None
    if path == "tiles":
        return 3 * B * d * 4 + (grads if es != 4 else 0)
    if path is not None:
        from llave_fast.backends.common import plan_s, s_cache_budget
        from llave_fast.backends.triton_backend import ds_row_stride, gpu_config, strip_rows

        cfg = gpu_config(dtype, D=d)
        ds_es = 2 if dtype in (torch.bfloat16, torch.float16) else 4
        R = strip_rows(cfg, B, N, ds_es)
        s_bytes = 0
        if path in ("cache", "stream"):
            # the fp32 S: all B rows kept, or one block (the stream backward's strips are no taller)
            rows = B if path == "cache" else plan_s(B, N, keep=True, mode="stream",
                                                    budget=s_cache_budget(torch.device(device))).rows
            s_bytes = rows * ds_row_stride(N) * 4
            R = R if path == "cache" else min(R, rows)
        dq_es = 2 if (R >= B and dtype == torch.bfloat16) else 4
        return s_bytes + R * ds_row_stride(N) * ds_es + B * d * dq_es + 2 * B * d * 4 + (grads if es != 4 else 0)
    if backend == "gemm3":
        from gemm3 import gemm3_rows

        R = gemm3_rows(B, N)
        return 2 * R * N * es + grads
    return None


# --------------------------------------------------------------------------- backends


def backend_available(name: str, device: torch.device) -> tuple[bool, str]:
    if name in ("torch", "torch_chunked", "reference"):
        return True, ""
    if name in TRITON_ALL:
        if device.type != "cuda":
            return False, f"{name} is benchmarked on CUDA only (on CPU it runs under the interpreter)"
        from llave_fast.backends.triton_backend import available_on

        return available_on(device)
    if name == "gemm3":
        if device.type != "cuda":
            return False, "gemm3 (the three cuBLAS GEMMs) is a GPU floor: CUDA only"
        return True, ""
    if name == "compile":
        # in the defaults on CUDA only; on CPU it runs when asked for (inductor needs a C++ compiler)
        return True, ""
    if name == "inf_cl":
        from _infcl import inf_cl_available

        return inf_cl_available(device)
    return False, f"unknown backend {name!r}"


def backward_config(loss: torch.Tensor, **cfg) -> torch.Tensor:
    """Make the triton backend's backward of ``loss`` run under ``kernel_config(**cfg)``
    (the backward runs after the forward's ``with`` block has closed, possibly on the
    autograd engine's thread): hooks on the loss's node set and restore the override."""
    from llave_fast.backends import triton_backend as tb

    todo, seen, node = [loss.grad_fn], set(), None
    while todo:
        n = todo.pop()
        if n is None or n in seen:
            continue
        seen.add(n)
        if "TritonHardnessLoss" in type(n).__name__:
            node = n
            break
        todo.extend(f for f, _ in n.next_functions)
    if node is None:
        raise RuntimeError("backward_config: no TritonHardnessLoss node in the graph of the loss")
    saved = {}

    def pre(grad_outputs):
        saved["old"] = tb._CONFIG_OVERRIDE
        tb._CONFIG_OVERRIDE = dict(cfg)

    def post(grad_inputs, grad_outputs):
        tb._CONFIG_OVERRIDE = saved.get("old")

    node.register_prehook(pre)
    node.register_hook(post)
    return loss


def make_loss_fn(name: str, *, alpha: float, scale, symmetric: bool, deterministic: bool, d: int):
    """A callable (q, t) -> scalar mean loss for one backend (gemm3: the GEMM floor, not a loss)."""
    if name in ("torch", "reference", "triton"):
        def fn(q, t):
            return hardness_weighted_loss(
                q, t, logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction="mean",
                backend=name, deterministic=deterministic,
            )
        return fn
    if name == "torch_chunked":
        from llave_fast.backends.triton_backend import kernel_config

        def fn(q, t):
            with kernel_config(S_MODE="fused"):  # the backward follows the forward's path
                return hardness_weighted_loss(q, t, logit_scale=scale, alpha=alpha, symmetric=symmetric,
                                              reduction="mean", backend="torch", deterministic=deterministic)
        return fn
    if name in TRITON_VARIANTS:
        from llave_fast.backends.triton_backend import kernel_config

        cfg = TRITON_VARIANTS[name]

        def fn(q, t):
            # only the path (and backward) is forced; every other tile setting is the default's
            with kernel_config(**cfg):
                loss = hardness_weighted_loss(q, t, logit_scale=scale, alpha=alpha, symmetric=symmetric,
                                              reduction="mean", backend="triton", deterministic=deterministic)
            return backward_config(loss, **cfg)
        return fn
    if name == "gemm3":
        from gemm3 import gemm3_fn

        return gemm3_fn()
    if name == "compile":
        torch._dynamo.reset()  # fresh graph per shape: no dynamic-shape kernels, no recompile limit
        compiled = torch.compile(reference_loss, dynamic=False)

        def fn(q, t):
            return compiled(q, t, logit_scale=scale, alpha=alpha, symmetric=symmetric, reduction="mean")
        return fn
    if name == "inf_cl":
        if alpha != 0:
            raise ValueError("Inf-CL has no hardness weights: it is compared at alpha = 0 only")
        from _infcl import make_inf_cl_loss

        return make_inf_cl_loss(scale=float(scale), symmetric=symmetric, d=d)
    raise ValueError(name)


# --------------------------------------------------------------------------- progress


class Progress:
    """A tqdm bar on a terminal; numbered plain lines otherwise (logs, or no tqdm)."""

    def __init__(self, total: int, desc: str):
        self.total, self.n = total, 0
        self.bar = None
        if sys.stdout.isatty():
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="task", file=sys.stdout, dynamic_ncols=True)
            except ImportError:
                pass
        if self.bar is None:
            print(f"{desc}: {total} tasks", flush=True)

    def start(self, msg: str):
        if self.bar is not None:
            self.bar.set_postfix_str(msg)
        else:
            print(f"  [{self.n + 1}/{self.total}] {msg} ...", flush=True)

    def done(self, msg: str):
        self.n += 1
        if self.bar is not None:
            self.bar.write("  " + msg)
            self.bar.update(1)
        else:
            print(f"  [{self.n}/{self.total}] {msg}", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def forced_torch_chunk(rows_times_n: int):
    """Force the torch backend's chunk size (module global read at call time) so the small case
    runs through several chunks, the last one partial."""
    from llave_fast.backends import torch_backend as tb

    old = tb._CHUNK_ELEMS
    tb._CHUNK_ELEMS = rows_times_n
    try:
        yield
    finally:
        tb._CHUNK_ELEMS = old


def correctness_cases(args, device) -> list[dict]:
    cases = [dict(name="small", B=SMALL_CASE["B"], d=SMALL_CASE["d"], dtype=torch.float64, tensor_scale=True)]
    Bm = 2560 if device.type == "cpu" else 4096
    for dn in args.dtype:
        cases.append(dict(name=f"moderate-{dn}", B=Bm, d=256, dtype=C.DTYPES[dn], tensor_scale=False))
    return cases


def run_check(name, case, inputs, truth, args, device, *, alpha):
    """Runs one backend on one case; returns the error record."""
    q0, t0 = inputs
    dtype = case["dtype"]
    if (name in TRITON_ALL or name == "inf_cl") and dtype == torch.float64:
        dtype = torch.float32  # these take 16/32-bit inputs; the fp32 values are exact in fp64
    tensor_scale = case["tensor_scale"] and name != "inf_cl"
    q = q0.detach().to(dtype).clone().requires_grad_()
    t = t0.detach().to(dtype).clone().requires_grad_()
    scale = args.logit_scale
    if tensor_scale:
        scale = torch.tensor(args.logit_scale, dtype=torch.float32 if dtype != torch.float64 else dtype,
                             device=device, requires_grad=True)
    fn = make_loss_fn(name, alpha=alpha, scale=scale, symmetric=args.symmetric,
                      deterministic=args.deterministic, d=case["d"])
    loss = fn(q, t)
    loss.backward()
    dn = C.DTYPE_NAMES[dtype]
    kind = dn
    if dtype == torch.float32 and (name == "inf_cl" or (device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32)):
        kind = "tf32"
    tol_loss, tol_grad = TOLERANCES[kind]
    errs = {
        "loss": C.rel_err(loss, truth["loss"]),
        "dq": C.rel_err(q.grad, truth["dq"]),
        "dt": C.rel_err(t.grad, truth["dt"]),
    }
    if tensor_scale:
        errs["dscale"] = C.rel_err(scale.grad, truth["dscale"])
    ok = errs["loss"] <= tol_loss and all(v <= tol_grad for k, v in errs.items() if k != "loss")
    return {"dtype": dn, "tolerance_kind": kind, "tol_loss": tol_loss, "tol_grad": tol_grad,
            "errors": errs, "passed": bool(ok), "loss": float(loss.detach()), "truth_loss": float(truth["loss"])}


def truth_of(q0, t0, args, device, *, alpha, tensor_scale):
    q = q0.detach().to(torch.float64).clone().requires_grad_()
    t = t0.detach().to(torch.float64).clone().requires_grad_()
    scale = torch.tensor(args.logit_scale, dtype=torch.float64, device=device, requires_grad=True) \
        if tensor_scale else args.logit_scale
    loss = reference_loss(q, t, logit_scale=scale, alpha=alpha, symmetric=args.symmetric, reduction="mean")
    loss.backward()
    return {"loss": loss.detach(), "dq": q.grad, "dt": t.grad,
            "dscale": scale.grad if tensor_scale else None}


def check_all(backends, args, device, report: dict | None = None) -> dict:
    """{backend: {"passed": bool, "checks": [...]}}; nothing is timed before this returns.

    ``report`` (optional): the dict to fill, so that a caller interrupted in the middle still
    has the checks done so far. torch.compile is checked on the moderate case only (each case
    is a new shape, and each shape costs a compile of tens of seconds); the wall time of that
    check (mostly the compile) is kept as ``report["compile"]["check_wall_s"]``: the
    deadline's allowance for compiling at a new size."""
    report = {} if report is None else report
    report.update({b: {"passed": True, "checks": []} for b in backends})
    for b in backends:
        if b in FLOOR:
            report[b]["note"] = "not a loss (the GEMM floor): nothing to check"
    cases = correctness_cases(args, device)
    alphas = sorted({0.0 if b == "inf_cl" else args.alpha for b in backends})

    def variants_of(case, alpha):
        names = [b for b in backends if (0.0 if b == "inf_cl" else args.alpha) == alpha and b not in FLOOR
                 and not (b in MODERATE_ONLY and case["name"] == "small")]
        variants = [(b, None) for b in names]
        if case["name"] == "small" and "torch" in names:
            variants.append(("torch", 7 * case["B"]))  # 7-row chunks: multi-chunk path, partial last
        return variants

    n_tasks = sum(len(variants_of(c, a)) for c in cases for a in alphas)
    prog = Progress(n_tasks, "correctness vs reference (float64 truth)")
    for ci, case in enumerate(cases):
        g = torch.Generator().manual_seed(args.seed + 1000 + ci)
        q0 = C.normalized_rows(case["B"], case["d"], dtype=torch.float32, device=device, generator=g)
        t0 = C.normalized_rows(case["B"], case["d"], dtype=torch.float32, device=device, generator=g,
                               like=q0, noise=1.0)  # correlated positives: a peaked softmax
        q0, t0 = q0.to(case["dtype"]), t0.to(case["dtype"])  # rounded once; truth uses these values
        for alpha in alphas:
            truth = truth_of(q0, t0, args, device, alpha=alpha, tensor_scale=case["tensor_scale"])
            for b, chunk in variants_of(case, alpha):
                label = f"{b} {case['name']} ({C.DTYPE_NAMES[case['dtype']]}, B={case['B']}, d={case['d']}, alpha={alpha:g})"
                if chunk:
                    label += " [7-row chunks]"
                prog.start(label)
                t_check = time.perf_counter()
                try:
                    ctx = forced_torch_chunk(chunk) if chunk else contextlib.nullcontext()
                    with ctx:
                        rec = run_check(b, case, (q0, t0), truth, args, device, alpha=alpha)
                except Exception as exc:  # noqa: BLE001 - a crash is a failure, reported
                    rec = {"passed": False, "error": f"{type(exc).__name__}: {exc}",
                           "traceback": traceback.format_exc(limit=4)}
                rec.update(case=case["name"] + (" [7-row chunks]" if chunk else ""), B=case["B"], d=case["d"], alpha=alpha,
                           wall_s=time.perf_counter() - t_check)
                if b == "compile":
                    report[b]["check_wall_s"] = max(report[b].get("check_wall_s", 0.0), rec["wall_s"])
                report[b]["checks"].append(rec)
                if not rec["passed"]:
                    report[b]["passed"] = False
                if "errors" in rec:
                    e = rec["errors"]
                    msg = ", ".join(f"{k} {v:.1e}" for k, v in e.items())
                    verdict = "ok" if rec["passed"] else "FAILED"
                    prog.done(f"{label}: {verdict} ({msg}; tol {rec['tol_loss']:.0e}/{rec['tol_grad']:.0e})")
                else:
                    prog.done(f"{label}: FAILED ({rec['error']})")
            del truth
    prog.close()
    return report


def dtype_passed(report, backend, dn) -> bool:
    """The small check (none for torch.compile) and the check at this benchmark dtype passed."""
    if backend in FLOOR:
        return True
    checks = report[backend]["checks"]
    small = [c for c in checks if c["case"].startswith("small")]
    mod = [c for c in checks if c["case"] == f"moderate-{dn}"]
    need_small = backend not in MODERATE_ONLY
    return (all(c["passed"] for c in small) and all(c["passed"] for c in mod) and bool(mod)
            and (bool(small) or not need_small))


# --------------------------------------------------------------------------- memory (CPU worker)


def mem_worker(spec: dict) -> None:
    """Hidden entry point: one fwd+bwd in this fresh process, peak RSS delta printed as JSON."""
    torch.manual_seed(0)
    dtype = C.DTYPES[spec["dtype"]]
    device = torch.device("cpu")
    fn = make_loss_fn(spec["backend"], alpha=spec["alpha"], scale=spec["scale"], symmetric=spec["symmetric"],
                      deterministic=spec["deterministic"], d=spec["d"])
    # warm-up at a small size: loads the libraries (MKL/oneDNN kernels, autograd) before the baseline
    for (q, t) in C.make_pairs(2, 256, min(spec["d"], 128), dtype=dtype, device=device, seed=1):
        fn(q, t).backward()
    del q, t
    (q, t), = C.make_pairs(1, spec["B"], spec["d"], dtype=dtype, device=device, seed=spec["seed"])
    if spec["backend"] == "compile":
        # compilation is per shape: compile at this shape first (the peak mark is reset below);
        # memory the heap kept from this run may be reused, so here the default-malloc figure
        # can read low, the live one (fixed mmap threshold) does not
        q.grad = t.grad = None
        fn(q, t).backward()
        q.grad = t.grad = None
    gc.collect()
    rec = C.cpu_peak_rss_of_call(fn, q, t)
    print("MEMRESULT " + json.dumps(rec), flush=True)


# glibc malloc normally serves blocks >= 128 KiB by mmap but raises that threshold (up to 32 MiB)
# each time such a block is freed; later blocks then come from the heap and, once freed, stay in
# the RSS. With a fixed 64 KiB threshold every large block is unmapped when freed, so the RSS
# follows the live tensors (the CPU analogue of CUDA's allocated bytes).
LIVE_MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def cpu_memory_in_subprocess(spec: dict, env_extra: dict | None = None, timeout: float = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem-worker", json.dumps(spec)]
    env = dict(os.environ)
    for k in LIVE_MALLOC_ENV:
        env.pop(k, None)
    env.update(env_extra or {})
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    for line in r.stdout.splitlines():
        if line.startswith("MEMRESULT "):
            return json.loads(line[len("MEMRESULT "):])
    raise RuntimeError(f"memory worker failed (rc {r.returncode}): {r.stderr.strip()[-800:]}")


# --------------------------------------------------------------------------- benchmark


def finish_record(rec, tm, *, fn, pairs, B, d, dtype, dn, args, device) -> dict:
    """Adds memory, the analytic model and FLOP rates to a timed record."""
    name, alpha = rec["backend"], rec["alpha"]
    rec["timing"] = {k: v for k, v in tm.items() if k not in ("exception", "memory")}
    if tm["error"] is not None:
        oom = isinstance(tm["exception"], torch.OutOfMemoryError) or "out of memory" in tm["error"].lower()
        rec["status"] = "OOM" if oom else "ERROR"
        rec["error"] = tm["error"]
        return rec
    if not all(math.isfinite(x) for x in tm["losses"]):
        rec["status"] = "NONFINITE"
        return rec
    if device.type == "cuda":
        q, t = pairs[0]
        # measured in the last warm-up run where there was one (no extra run of a slow backend)
        rec["memory"] = dict(tm["memory"]) if tm.get("memory") else C.cuda_peak_of_call(fn, q, t, device)
    else:
        spec = dict(backend=name, B=B, d=d, dtype=dn, alpha=alpha, scale=args.logit_scale,
                    symmetric=args.symmetric, deterministic=args.deterministic, seed=args.seed + 7)
        rec["memory"] = cpu_memory_in_subprocess(spec)
        rec["memory"]["malloc"] = "glibc defaults"
        if args.live_memory:
            live = cpu_memory_in_subprocess(spec, LIVE_MALLOC_ENV)
            live["malloc"] = " ".join(f"{k}={v}" for k, v in LIVE_MALLOC_ENV.items())
            rec["memory"]["live"] = live
            rec["memory"]["peak_live_bytes"] = live["peak_bytes"]
    model = analytic_peak_bytes(name, B, B, d, dtype, args.symmetric, device)
    rec["memory"]["analytic_bytes"] = model
    if model:
        # the model counts live tensors: compare it with the live figure where there is one
        r = rec["memory"].get("peak_live_bytes", rec["memory"]["peak_bytes"]) / model
        rec["memory"]["measured_over_analytic"] = r
        rec["memory"]["analytic_check"] = "ok" if 1 / 3 <= r <= 3 else "CHECK"
    gf, gb = gemm_counts(name, args.symmetric, args.deterministic, d, B, B, device)
    uf, ub = (gf, gb) if name in FLOOR else USEFUL_GEMMS  # the floor's own count is its useful work
    one = 2.0 * B * B * d
    med = tm["median_ms"]
    rec["flops"] = {"gemm_flops": one, "gemms_fwd": gf, "gemms_bwd": gb, "useful_gemms_fwd": uf, "useful_gemms_bwd": ub}
    rec["tflops_achieved"] = {
        "fwd": gf * one / (med["fwd"] * 1e-3) / 1e12,
        "bwd": gb * one / (med["bwd"] * 1e-3) / 1e12,
        "fwd_bwd": (gf + gb) * one / (med["fwd_bwd"] * 1e-3) / 1e12,
    }
    rec["tflops_useful"] = {
        "fwd": uf * one / (med["fwd"] * 1e-3) / 1e12,
        "bwd": ub * one / (med["bwd"] * 1e-3) / 1e12,
        "fwd_bwd": (uf + ub) * one / (med["fwd_bwd"] * 1e-3) / 1e12,
    }
    rec["status"] = "ok"
    return rec


def add_ceiling_fractions(results, ceilings) -> None:
    """Achieved TFLOP/s (the backend's own GEMM count) over the measured bf16 GEMM ceiling."""
    if not ceilings:
        return
    top = ceilings["mm_bf16"]["tflop_per_s"]
    for r in results:
        if r.get("status") == "ok":
            r["fraction_of_mm_ceiling"] = {k: v / top for k, v in r["tflops_achieved"].items()}
            r["fraction_of_mm_ceiling_useful"] = {k: v / top for k, v in r["tflops_useful"].items()}


def free_device_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


_ALPHA0_FUSED = None  # set from --alpha0-fused


def alpha0_fused(backends):
    """The fused backend timed at alpha = 0 beside Inf-CL (--alpha0-fused, else the first fused one)."""
    if _ALPHA0_FUSED is not None and _ALPHA0_FUSED in backends:
        return _ALPHA0_FUSED
    return next((f for f in FUSED if f in backends), None)


def plan_groups(args, backends):
    """{(dtype name, d, B): [(backend, label, alpha), ...]} in run order."""
    groups = {}
    for dn in args.dtype:
        for d in args.d:
            for B in sorted(args.B):
                rows = [(b, b, args.alpha) for b in backends if b != "inf_cl"]
                # the floor has no alpha: it is listed once, with the fused rows
                if "inf_cl" in backends:
                    fused = alpha0_fused(backends)
                    if fused is not None and args.alpha != 0:
                        rows.append((fused, f"{fused}@alpha=0", 0.0))
                    rows.append(("inf_cl", "inf_cl@alpha=0", 0.0))
                groups[(dn, d, B)] = rows
    return groups


def warmup_of(backend: str, args) -> int:
    """Untimed runs of a backend: --warmup-for, else --warmup (torch.compile: at least 3)."""
    n = (args.warmup_for or {}).get(backend, args.warmup)
    return max(n, 3) if backend == "compile" and backend not in (args.warmup_for or {}) else n


def repeats_of(backend: str, args) -> int:
    """Timed runs asked for a backend: --repeats-for, else --repeats."""
    return (args.repeats_for or {}).get(backend, args.repeats)


def predict_rows(rows, hist: dict, B: int, d: int, args, device, compile_s: float = 0.0) -> dict | None:
    """Predicted seconds of each row of a (dtype, d, B) group, {label: seconds}; None before
    anything has been timed.

    The basis is each label's own median forward+backward time per timed run at the last size
    it ran (``hist[label] = (B, d, ms)``): warm-ups, compiles and memory runs are not in it, so
    fixed costs do not grow with B^2. It is scaled as B^2 d (every backend's work) and
    multiplied by the runs planned here: warm-ups, timed runs (as --point-budget-s lowers them,
    with the same rule as the timing itself) and the memory run (none on CUDA, where the last
    warm-up measures it; a fresh process on CPU). A label never timed gets the largest scaled
    figure of the others; torch.compile adds its compile time (measured in its correctness
    check), since every new size is compiled anew.
    """
    if not hist:
        return None

    def scaled(B0, d0, ms):
        return ms * (B / B0) ** 2 * (d / d0)

    fallback = max(scaled(*v) for v in hist.values())
    per_run = {label: (scaled(*hist[label]) if label in hist else fallback) for _, label, _ in rows}
    per_round = sum(per_run.values())
    cuda = device.type == "cuda"
    out = {}
    for b, label, _ in rows:
        round_ms = per_run[label] if args.sequential else per_round
        reps = min(repeats_of(b, args), C.planned_repeats(round_ms, repeats_of(b, args), args.point_budget_s))
        warm = warmup_of(b, args)
        mem_runs = 0 if (cuda and warm > 0) else 1
        sec = per_run[label] * (warm + reps + mem_runs) / 1e3
        if not cuda:
            sec += CPU_MEMORY_WORKER_S * (2 if args.live_memory else 1) + (per_run[label] / 1e3 if args.live_memory else 0)
        if b == "compile":
            sec += compile_s
        out[label] = sec
    return out


def fit_deadline(rows, pred: dict | None, time_left_s: float) -> tuple[list, list]:
    """(rows kept, rows dropped) so that the kept rows' predicted time fits ``time_left_s``.

    The first row (the package's own default backend) is kept as long as it fits alone;
    otherwise the most expensive of the others go first, so that a size that does not fit
    whole still brings back its cheap rows instead of nothing."""
    def cost(keep):
        return GROUP_OVERHEAD_S + PREDICT_MARGIN * sum(pred[label] for _, label, _ in keep)

    if pred is None:
        return (list(rows), []) if time_left_s > 0 else ([], list(rows))
    keep, dropped = list(rows), []
    while len(keep) > 1 and cost(keep) > time_left_s:
        worst = max(keep[1:], key=lambda r: pred[r[1]])
        keep.remove(worst)
        dropped.append(worst)
    if keep and cost(keep) > time_left_s:
        dropped.extend(keep)
        keep = []
    return keep, dropped


def run_benchmarks(backends, report, args, device, on_progress=None, results: list | None = None) -> list[dict]:
    """Times every (dtype, d, B) group; ``on_progress(results)`` runs after each group, or
    after each backend with --sequential (the caller writes partial results, so a run cut
    short still leaves its figures). ``results``: the list to append to (the caller keeps
    what was measured if the run is interrupted)."""
    groups = plan_groups(args, backends)
    prog = Progress(sum(len(r) for r in groups.values()), "timing (interleaved) + peak memory"
                    if not args.sequential else "timing (one backend at a time) + peak memory")
    results = [] if results is None else results
    mem_avail = C.mem_available_bytes()
    hist = {}  # label -> (B, d, median fwd+bwd ms of its timed runs) at the last size it ran
    compile_s = report.get("compile", {}).get("check_wall_s", 0.0)
    deadline_at = None if args.deadline_s is None else args.t_begin + args.deadline_s

    def skipped(rows, dn, d, B, why):
        for b, label, alpha in rows:
            results.append({"backend": b, "label": label, "dtype": dn, "B": B, "N": B, "d": d,
                            "alpha": alpha, "status": "SKIPPED", "note": why})
            prog.done(f"{label} {dn} B=N={B} d={d}: SKIPPED ({why})")

    for (dn, d, B), rows in groups.items():
        dtype = C.DTYPES[dn]
        kept = []
        for b, label, alpha in rows:
            why = None
            if args.max_B and B > args.max_B.get(b, B):
                why = f"--max-B {b}={args.max_B[b]}"
            elif args.only_B and b in args.only_B and B not in args.only_B[b]:
                why = f"--only-B {b}={','.join(map(str, sorted(args.only_B[b])))}"
            if why is None:
                kept.append((b, label, alpha))
            else:
                skipped([(b, label, alpha)], dn, d, B, why)
        rows = []
        for b, label, alpha in kept:
            what = f"{label} {dn} B=N={B} d={d}"
            base = {"backend": b, "label": label, "dtype": dn, "B": B, "N": B, "d": d, "alpha": alpha,
                    "logit_scale": args.logit_scale, "symmetric": args.symmetric}
            if not dtype_passed(report, b, dn):
                results.append({**base, "status": "FAILED"})
                prog.done(f"{what}: FAILED correctness, not timed")
                continue
            model = analytic_peak_bytes(b, B, B, d, dtype, args.symmetric, device)
            if device.type == "cpu" and model and mem_avail and model > 0.6 * mem_avail:
                results.append({**base, "status": "SKIPPED",
                                "note": f"needs ~{model / C.MiB:.0f} MiB, {mem_avail / C.MiB:.0f} MiB available"})
                prog.done(f"{what}: SKIPPED (needs ~{model / C.MiB:.0f} MiB)")
                continue
            rows.append((b, label, alpha))
        if args.deadline_s is not None and rows:
            left = deadline_at - time.perf_counter()
            pred = predict_rows(rows, hist, B, d, args, device, compile_s)
            rows, dropped = fit_deadline(rows, pred, left)
            for b, label, alpha in dropped:
                p = "" if pred is None else f", this backend predicted ~{pred[label]:.0f} s here"
                skipped([(b, label, alpha)], dn, d, B,
                        f"--deadline-s {args.deadline_s:g}: {left:.0f} s left{p}")
            if pred is not None and rows:
                print(f"  {dn} B=N={B} d={d}: predicted {sum(pred[r[1]] for r in rows):.1f} s for "
                      f"{len(rows)} backends ({left:.0f} s left before the deadline)", flush=True)
        todo = []
        for b, label, alpha in rows:
            what = f"{label} {dn} B=N={B} d={d}"
            base = {"backend": b, "label": label, "dtype": dn, "B": B, "N": B, "d": d, "alpha": alpha,
                    "logit_scale": args.logit_scale, "symmetric": args.symmetric}
            try:
                fn = make_loss_fn(b, alpha=alpha, scale=args.logit_scale, symmetric=args.symmetric,
                                  deterministic=args.deterministic, d=d)
            except Exception as exc:  # noqa: BLE001
                results.append({**base, "status": "ERROR", "error": f"{type(exc).__name__}: {exc}"})
                prog.done(f"{what}: ERROR {exc}")
                continue
            todo.append((base, what, fn))
        if not todo:
            continue
        free_device_memory(device)
        pairs = C.make_pairs(args.n_inputs, B, d, dtype=dtype, device=device, seed=args.seed + B + d)
        # interleaved: all backends of the group in one rotation; sequential: one at a time,
        # each written as soon as it is done (the slow peers at the largest size go last)
        batches = [[x] for x in todo] if args.sequential else [todo]
        for batch in batches:
            prog.start(f"{dn} B=N={B} d={d}: timing {', '.join(x[0]['label'] for x in batch)}"
                       + (" interleaved" if len(batch) > 1 else ""))
            t0 = time.perf_counter()
            fns = {base["label"]: fn for base, _, fn in batch}
            warm = {base["label"]: warmup_of(base["backend"], args) for base, _, _ in batch}
            reps = {base["label"]: repeats_of(base["backend"], args) for base, _, _ in batch}
            timings = C.time_interleaved(fns, pairs, device=device, warmup=warm, repeats=reps,
                                         budget_s=args.point_budget_s, deadline_at=deadline_at,
                                         memory_from_warmup=True)
            t_time = time.perf_counter() - t0
            for base, what, fn in batch:
                t1 = time.perf_counter()
                rec = dict(base)
                try:
                    rec = finish_record(rec, timings[base["label"]], fn=fn, pairs=pairs, B=B, d=d, dtype=dtype,
                                        dn=dn, args=args, device=device)
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    oom = isinstance(exc, torch.OutOfMemoryError)
                    rec.update(status="OOM" if oom else "ERROR", error=f"{type(exc).__name__}: {exc}",
                               traceback=traceback.format_exc(limit=6))
                free_device_memory(device)
                rec["wall_s_memory"] = time.perf_counter() - t1
                rec["wall_s_timing_group"] = t_time
                results.append(rec)
                if rec["status"] == "ok":
                    m = rec["timing"]["median_ms"]
                    hist[base["label"]] = (B, d, m["fwd_bwd"])
                    prog.done(f"{what}: fwd {m['fwd']:.1f} ms, bwd {m['bwd']:.1f} ms, fwd+bwd {m['fwd_bwd']:.1f} ms, "
                              f"peak {rec['memory']['peak_bytes'] / C.MiB:.1f} MiB "
                              f"({rec['timing']['repeats']} timed runs)")
                else:
                    prog.done(f"{what}: {rec['status']} {rec.get('error', '')}")
            if args.sequential and on_progress is not None:
                on_progress(results)
        del pairs, fns
        free_device_memory(device)
        if on_progress is not None:
            on_progress(results)
    prog.close()
    return results


# --------------------------------------------------------------------------- ratios / report


def ratio_pairs(backends, device):
    pairs = []
    for num in FUSED:
        if num not in backends:
            continue
        for den in BASELINES:
            if den in backends:
                pairs.append((num, den))
    if "inf_cl" in backends:
        fused = alpha0_fused(backends)
        if fused:
            pairs.append((f"{fused}@alpha=0", "inf_cl@alpha=0"))
    return pairs


def compute_ratios(results, backends, device, args) -> list[dict]:
    ok = {(r["label"], r["dtype"], r["B"], r["d"]): r for r in results if r.get("status") == "ok"}
    # with alpha == 0 the fused row is its own alpha=0 row
    if args.alpha == 0:
        for (lab, dn, B, d), r in list(ok.items()):
            if lab in FUSED:
                ok[(f"{lab}@alpha=0", dn, B, d)] = r
    out = []
    for num, den in ratio_pairs(backends, device):
        for dn in args.dtype:
            for d in args.d:
                for B in sorted(args.B):
                    a, b = ok.get((num, dn, B, d)), ok.get((den, dn, B, d))
                    rec = {"numerator": num, "denominator": den, "dtype": dn, "B": B, "d": d}
                    if a is None or b is None:
                        rec["status"] = "n/a (a side FAILED, SKIPPED or errored)"
                    else:
                        ma, mb = a["timing"]["median_ms"], b["timing"]["median_ms"]
                        pa, pb = a["memory"]["peak_bytes"], b["memory"]["peak_bytes"]
                        la, lb = a["memory"].get("peak_live_bytes"), b["memory"].get("peak_live_bytes")
                        rec.update(status="ok",
                                   time_ratio={k: ma[k] / mb[k] for k in ("fwd", "bwd", "fwd_bwd")},
                                   mem_ratio=pa / pb if pb > 0 else None,
                                   live_mem_ratio=la / lb if (la is not None and lb) else None)
                    out.append(rec)
    return out


def print_table(results, device):
    cpu = device.type == "cpu"
    live = cpu and any(r.get("status") == "ok" and "peak_live_bytes" in r["memory"] for r in results)
    cols = ["dtype", "B=N", "d", "backend", "status", "fwd ms", "bwd ms", "fwd+bwd ms", "peak MiB"]
    cols += (["live MiB"] if live else []) + ["model MiB", "TFLOP/s useful", "TFLOP/s achieved"]
    rows = []
    for r in results:
        if r.get("status") == "ok":
            m = r["timing"]["median_ms"]
            mem = r["memory"]
            row = [r["dtype"], str(r["B"]), str(r["d"]), r["label"], "ok",
                   C.fmt(m["fwd"]), C.fmt(m["bwd"]), C.fmt(m["fwd_bwd"]),
                   C.fmt(mem["peak_bytes"] / C.MiB) + ("" if mem.get("baseline_clean", True) else "*")]
            if live:
                lv = mem.get("peak_live_bytes")
                row.append(C.fmt(lv / C.MiB if lv is not None else None)
                           + ("" if mem.get("live", {}).get("baseline_clean", True) else "*"))
            row += [C.fmt(mem["analytic_bytes"] / C.MiB if mem.get("analytic_bytes") else None),
                    C.fmt(r["tflops_useful"]["fwd_bwd"], ".3f"), C.fmt(r["tflops_achieved"]["fwd_bwd"], ".3f")]
        else:
            row = [r["dtype"], str(r["B"]), str(r["d"]), r["label"], r["status"]] + ["-"] * (len(cols) - 5)
        rows.append(row)
    widths = [max(len(c), *(len(row[i]) for row in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    print()
    print(f"Results on {C.device_name(device)}: medians of the timed runs (ms); TFLOP/s from 2*B*N*d per "
          "GEMM-equivalent over the fwd+bwd median (useful: 4 for every backend; achieved: the backend's own count)")
    if cpu:
        print("peak MiB: peak RSS during one fwd+bwd minus the RSS just before it, in a fresh process (glibc defaults)"
              + ("; live MiB: the same with MALLOC_MMAP_THRESHOLD_=65536, so the RSS follows the live tensors" if live else "")
              + "; model MiB: analytic live-tensor estimate")
    else:
        print("peak MiB: torch.cuda.max_memory_allocated during one fwd+bwd minus memory_allocated before it; "
              "model MiB: analytic estimate")
    print(line)
    print("-" * len(line))
    for row in rows:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths)))
    if any(r.get("status") == "ok" and not r["memory"].get("baseline_clean", True) for r in results):
        print("  * peak mark above the RSS before the call even after a reset: that figure is a lower bound")
    for r in results:
        if r.get("status") == "ok" and r["memory"].get("analytic_check") == "CHECK":
            print(f"  note: {r['label']} B={r['B']} d={r['d']}: measured/model memory = "
                  f"{r['memory']['measured_over_analytic']:.2f}, outside [1/3, 3]: the model or the measurement is off")
    for r in results:
        if r.get("status") not in ("ok", "FAILED") and r.get("error"):
            print(f"  {r['label']} B={r['B']} d={r['d']} {r['dtype']}: {r['status']}: {r['error']}")


def print_ratios(ratios):
    if not ratios:
        return
    live = any(r.get("live_mem_ratio") is not None for r in ratios)
    print()
    print("Ratios, measured side by side in this run (time: medians; < 1: the numerator is faster / leaner)")
    hdr = (f"{'dtype':>5}  {'B=N':>6}  {'d':>5}  {'numerator / denominator':<30}  {'fwd':>6}  {'bwd':>6}  "
           f"{'fwd+bwd':>7}  {'peak mem':>8}" + (f"  {'live mem':>8}" if live else ""))
    print(hdr)
    print("-" * len(hdr))
    for r in ratios:
        name = f"{r['numerator']} / {r['denominator']}"
        if r["status"] != "ok":
            print(f"{r['dtype']:>5}  {r['B']:>6}  {r['d']:>5}  {name:<30}  {r['status']}")
            continue
        tr = r["time_ratio"]
        mr = "-" if r["mem_ratio"] is None else f"{r['mem_ratio']:.3f}"
        lr = "-" if r.get("live_mem_ratio") is None else f"{r['live_mem_ratio']:.3f}"
        print(f"{r['dtype']:>5}  {r['B']:>6}  {r['d']:>5}  {name:<30}  {tr['fwd']:6.3f}  {tr['bwd']:6.3f}  "
              f"{tr['fwd_bwd']:7.3f}  {mr:>8}" + (f"  {lr:>8}" if live else ""))


def acceptance(results, args, device) -> dict | None:
    if device.type != "cpu":
        return None

    def find(label):
        return next((r for r in results if r["label"] == label and r["dtype"] == ACCEPT["dtype"]
                     and r["B"] == ACCEPT["B"] and r["d"] == ACCEPT["d"]), None)

    at_config = args.symmetric and args.alpha == 9.0 and args.logit_scale == 50.0
    t, ref = find("torch"), find("reference")
    out = {"point": dict(B=ACCEPT["B"], N=ACCEPT["B"], d=ACCEPT["d"], dtype=ACCEPT["dtype"]),
           "at_acceptance_config": at_config,
           "targets": {"time_ratio_max": ACCEPT["time_ratio_max"], "mem_ratio_max": ACCEPT["mem_ratio_max"]}}
    print()
    print(f"Acceptance (CPU, {ACCEPT['dtype']}, B=N={ACCEPT['B']}, d={ACCEPT['d']}, "
          f"{'symmetric' if args.symmetric else 'one-way'}, alpha={args.alpha:g}, logit_scale={args.logit_scale:g}):")
    if not at_config:
        print("  note: not the acceptance configuration (symmetric, alpha 9, logit_scale 50)")
    if t is None or ref is None or t.get("status") != "ok" or ref.get("status") != "ok":
        why = ("not in this run" if (t is None or ref is None)
               else f"torch {t.get('status')}, reference {ref.get('status')}")
        print(f"  not measured ({why})")
        out["status"] = f"not measured ({why})"
        return out
    tr = t["timing"]["median_ms"]["fwd_bwd"] / ref["timing"]["median_ms"]["fwd_bwd"]
    mr = t["memory"]["peak_bytes"] / ref["memory"]["peak_bytes"]
    tp = tr <= ACCEPT["time_ratio_max"]
    mp = mr <= ACCEPT["mem_ratio_max"]
    print(f"  torch time / reference time (fwd+bwd medians)  = {tr:.3f}  (target <= {ACCEPT['time_ratio_max']})  "
          f"{'PASS' if tp else 'FAIL'}")
    print(f"  torch peak memory / reference peak memory      = {mr:.3f}  (target <= {ACCEPT['mem_ratio_max']})  "
          f"{'PASS' if mp else 'FAIL'}")
    out.update(status="measured", time_ratio=tr, mem_ratio=mr, time_pass=tp, mem_pass=mp)
    lt, lr = t["memory"].get("peak_live_bytes"), ref["memory"].get("peak_live_bytes")
    if lt is not None and lr:
        out["live_mem_ratio"] = lt / lr
        print(f"  (for information: the same memory ratio with RSS following live tensors = {lt / lr:.3f}; "
              f"torch {lt / C.MiB:.1f} MiB of which the two gradients are "
              f"{2 * ACCEPT['B'] * ACCEPT['d'] * 4 / C.MiB:.0f} MiB)")
    return out


def write_plot(results, json_path: Path) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not importable: plot skipped")
        return None
    ok = [r for r in results if r.get("status") == "ok"]
    groups = sorted({(r["dtype"], r["d"]) for r in ok})
    if not groups:
        print("nothing measured: plot skipped")
        return None
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for row, (dn, d) in enumerate(groups):
        for label in sorted({r["label"] for r in ok if r["dtype"] == dn and r["d"] == d}):
            rs = sorted((r for r in ok if r["label"] == label and r["dtype"] == dn and r["d"] == d), key=lambda r: r["B"])
            Bs = [r["B"] for r in rs]
            axes[row][0].plot(Bs, [r["timing"]["median_ms"]["fwd_bwd"] for r in rs], "o-", label=label)
            line, = axes[row][1].plot(Bs, [r["memory"]["peak_bytes"] / C.MiB for r in rs], "o-", label=label)
            if all("peak_live_bytes" in r["memory"] for r in rs):
                axes[row][1].plot(Bs, [r["memory"]["peak_live_bytes"] / C.MiB for r in rs], "s--",
                                  color=line.get_color(), label=f"{label} (live)")
        for col, ylab in enumerate(("fwd+bwd time (ms, median)", "peak extra memory (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("B = N")
            ax.set_ylabel(ylab)
            ax.set_title(f"{dn}, d={d}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend()
    fig.tight_layout()
    png = json_path.with_suffix(".png")
    fig.savefig(png, dpi=110)
    plt.close(fig)
    print(f"plot written to {png}")
    return str(png)


# --------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", choices=ALL_BACKENDS, default=None,
                   help="default: torch torch_chunked reference on CPU; triton triton_cache triton_stream triton_strip torch reference "
                        "compile inf_cl gemm3 "
                        "on CUDA "
                        "(compile also runs on CPU when named; triton and inf_cl need CUDA)")
    p.add_argument("--B", nargs="+", type=int, default=None, help="batch sizes (N = B); default CPU: 2048 4096 8192")
    p.add_argument("--d", nargs="+", type=int, default=None, help="embedding widths; default 1024")
    p.add_argument("--dtype", nargs="+", choices=("fp32", "bf16", "fp16"), default=None,
                   help="default: fp32 on CPU, fp32 bf16 on CUDA")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point; default 3 (CPU), 20 (CUDA)")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs first; default 1 (CPU), 3 (CUDA)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path; default benchmarks/results/<device-slug>/<YYYY-MM-DD>.json")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (smoke test)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--alpha", type=float, default=9.0)
    p.add_argument("--logit-scale", type=float, default=50.0)
    p.add_argument("--one-way", dest="symmetric", action="store_false", help="query->target only (default symmetric)")
    p.add_argument("--deterministic", action="store_true", help="triton backward without atomics")
    p.add_argument("--tf32", action="store_true", help="CUDA: allow TF32 matmuls (default: left as torch has it)")
    p.add_argument("--n-inputs", type=int, default=3, help="input pairs rotated among runs")
    p.add_argument("--no-live-memory", dest="live_memory", action="store_false",
                   help="CPU: skip the second memory worker run with a fixed 64 KiB malloc mmap threshold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--point-budget-s", type=float, default=None,
                   help="about this many seconds of timed runs per (dtype, d, B) group: fewer repeats "
                        "(at least 3) where one run is long")
    p.add_argument("--deadline-s", type=float, default=None,
                   help="start no backend at a (dtype, d, B) size that is predicted to end after this many "
                        "seconds from the start: each backend's median time per timed run at the last size "
                        "it ran, scaled as B^2 d, times its planned runs (warm-ups and compiles excluded "
                        "from the basis); the most expensive backends are dropped first and reported SKIPPED")
    p.add_argument("--repeats-for", nargs="+", default=None, metavar="BACKEND=N",
                   help="timed runs for one backend, e.g. inf_cl=1 (a slow peer at the largest size)")
    p.add_argument("--warmup-for", nargs="+", default=None, metavar="BACKEND=N",
                   help="untimed runs for one backend, e.g. inf_cl=1")
    p.add_argument("--sequential", action="store_true",
                   help="time one backend at a time instead of interleaved, and write the JSON after each "
                        "(for the largest sizes, where one slow backend must not cost the others' figures)")
    p.add_argument("--max-B", nargs="+", default=None, metavar="BACKEND=B",
                   help="largest B for a backend, e.g. reference=65536 compile=16384 (the eager ones "
                        "cannot hold B x N matrices at the top sizes)")
    p.add_argument("--only-B", nargs="+", default=None, metavar="BACKEND=B[,B...]",
                   help="run a backend at these B only, e.g. compile=16384 (torch.compile recompiles per shape)")
    p.add_argument("--alpha0-fused", choices=FUSED, default=None,
                   help="with inf_cl: the fused backend also timed at alpha = 0 (default: the first of "
                        f"{FUSED} that runs)")
    p.add_argument("--no-plot", action="store_true", help="write no PNG beside the JSON")
    p.add_argument("--no-ceilings", action="store_true",
                   help="CUDA: skip measuring the copy and bf16 GEMM ceilings at the start")
    p.add_argument("--_mem-worker", dest="mem_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.max_B is not None:
        caps = {}
        for item in args.max_B:
            name, sep, val = item.partition("=")
            if not sep or name not in ALL_BACKENDS or not val.isdigit():
                p.error(f"--max-B takes BACKEND=B with BACKEND in {ALL_BACKENDS}, got {item!r}")
            caps[name] = int(val)
        args.max_B = caps
    for flag in ("repeats_for", "warmup_for"):
        items = getattr(args, flag)
        if items is None:
            continue
        vals = {}
        for item in items:
            name, sep, val = item.partition("=")
            if not sep or name not in ALL_BACKENDS or not val.isdigit() or (flag == "repeats_for" and int(val) < 1):
                p.error(f"--{flag.replace('_', '-')} takes BACKEND=N with BACKEND in {ALL_BACKENDS} and N an "
                        f"integer (>= 1 for repeats, >= 0 for warm-ups), got {item!r}")
            vals[name] = int(val)
        setattr(args, flag, vals)
    if args.only_B is not None:
        only = {}
        for item in args.only_B:
            name, sep, val = item.partition("=")
            vals = val.split(",")
            if not sep or name not in ALL_BACKENDS or not all(v.isdigit() for v in vals):
                p.error(f"--only-B takes BACKEND=B[,B...] with BACKEND in {ALL_BACKENDS}, got {item!r}")
            only[name] = {int(v) for v in vals}
        args.only_B = only
    return args


def apply_defaults(args, device):
    cpu = device.type == "cpu"
    if args.backends is None:
        args.backends = (["torch", "torch_chunked", "reference"] if cpu
                         else ["triton", "triton_cache", "triton_stream", "triton_strip", "torch", "reference", "compile",
                               "inf_cl", "gemm3"])
    if args.quick:
        args.B = args.B or ([512, 1024] if cpu else [2048, 4096])
        args.d = args.d or ([256] if cpu else [1024])
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
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        if args.tf32:
            torch.backends.cuda.matmul.allow_tf32 = True
    args = apply_defaults(args, device)
    global _ALPHA0_FUSED
    _ALPHA0_FUSED = args.alpha0_fused
    t_begin = args.t_begin = time.perf_counter()

    meta = {"device": C.device_info(device), "versions": C.versions(), "git": C.git_info(), **C.now_stamps(),
            "machine_load_before": C.machine_load()}
    print(f"llave-fast loss benchmark on {meta['device']['name']}; torch {meta['versions']['torch']}, "
          f"triton {meta['versions']['triton']}, python {meta['versions']['python']}; "
          f"commit {str(meta['git']['commit'])[:12]}{' (dirty)' if meta['git'].get('dirty') else ''}")
    print(f"config: backends {args.backends}, B=N {args.B}, d {args.d}, dtype {args.dtype}, "
          f"{'symmetric' if args.symmetric else 'one-way'}, alpha {args.alpha:g}, logit_scale {args.logit_scale:g}, "
          f"warmup {args.warmup}, repeats {args.repeats}, {args.n_inputs} rotating input pairs")

    backends, skipped = [], {}
    for b in args.backends:
        ok, why = backend_available(b, device)
        if ok:
            backends.append(b)
        else:
            skipped[b] = why
            print(f"note: backend {b} skipped: {why}")
    if "inf_cl" in backends:
        from _infcl import inf_cl_head_dim

        bad = [d for d in args.d if inf_cl_head_dim(d) is None]
        if bad:
            print(f"note: inf_cl needs d divisible by 16; d={bad} will error for it")
    if not backends:
        print("no backend can run here")
        return 1

    busy = meta["machine_load_before"].get("busy_fraction_others")
    if busy is not None and busy > 0.1:
        print(f"WARNING: other processes keep {busy:.0%} of the CPUs busy (loadavg "
              f"{meta['machine_load_before'].get('loadavg')}): timings will be noisy and slower")

    out = Path(args.out or C.default_out_path(device))
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
              if k not in ("mem_worker", "t_begin")}
    report, results, interrupted = {}, [], None

    def write_partial(res):
        with open(out, "w") as f:
            json.dump({"schema": 1, "partial": True, "meta": meta, "config": config, "correctness": report,
                       "results": res}, f, indent=1, default=str)

    # SIGINT (gpu_check.sh's timeouts) and SIGTERM (C.start_script) end the measuring, not the
    # run: what was measured is written below, marked "interrupted"
    try:
        if device.type == "cuda" and not args.no_ceilings:
            from gpu_ceilings import measure_ceilings

            meta["ceilings"] = measure_ceilings(device)
            print(f"ceilings measured here: copy {meta['ceilings']['copy']['tb_per_s']:.2f} TB/s (read + write), "
                  f"bf16 mm {meta['ceilings']['mm_bf16']['tflop_per_s']:.0f} TFLOP/s")
        check_all(backends, args, device, report)
        for b in backends:
            if not report[b]["passed"]:
                print(f"backend {b}: FAILED a correctness check: it gets no timing and no ratio")
        C.start_script()  # the checks' objects out of the collector's way too
        write_partial(results)
        run_benchmarks(backends, report, args, device, on_progress=write_partial, results=results)
    except KeyboardInterrupt as exc:
        interrupted = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"\nINTERRUPTED ({interrupted}) after {time.perf_counter() - t_begin:.0f} s: writing the "
              f"{sum(r.get('status') == 'ok' for r in results)} results measured so far", flush=True)
    add_ceiling_fractions(results, meta.get("ceilings"))
    ratios = compute_ratios(results, backends, device, args)
    print_table(results, device)
    print_ratios(ratios)
    acc = acceptance(results, args, device)

    config.update(device_used=str(device), backends_run=backends, backends_skipped=skipped,
                  small_case=SMALL_CASE, tolerances=TOLERANCES, useful_gemms=USEFUL_GEMMS,
                  timing="median of repeats; per run: timestamps before fwd, between fwd and bwd, after bwd "
                         "(perf_counter on CPU, CUDA events + synchronize on GPU); warm-up runs excluded; "
                         f"{args.n_inputs} input pairs rotated")
    meta["machine_load_after"] = C.machine_load()
    la = meta["machine_load_after"].get("busy_fraction_others")
    if la is not None:
        print(f"machine load by other processes: {busy:.0%} before the run, {la:.0%} after "
              "(sampled 1 s each; > 10% means the timings above were disturbed)")
    payload = {"schema": 1, "meta": meta, "config": config, "correctness": report, "results": results,
               "ratios": ratios, "acceptance": acc, "total_wall_s": time.perf_counter() - t_begin}
    if interrupted:
        payload["interrupted"] = interrupted
    with open(out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"\nresults written to {out}")
    png = None if args.no_plot else write_plot(results, out)
    if png:
        payload["plot"] = os.path.basename(str(png))  # beside the JSON; no machine paths in results
        with open(out, "w") as f:
            json.dump(payload, f, indent=1, default=str)
    print(f"total wall time {time.perf_counter() - t_begin:.0f} s")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
