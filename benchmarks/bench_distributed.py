#!/usr/bin/env python3
"""Distributed benchmark: the cross-rank loss (strip algorithm) and GradCache, ranks on one machine.

    python benchmarks/bench_distributed.py [--quick] [--world 2 --N 2048 8192 --d 512 --skip-gradcache]

Each sweep is checked (float64 or parameter gradients) before it is timed: benchmarks/README.md, "Distributed sweep".
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from llave_fast import FusedHardnessLoss, GradCache, hardness_weighted_loss  # noqa: E402
from llave_fast.reference import reference_loss  # noqa: E402
from llave_fast.testing import spawn_ranks  # noqa: E402

VARIANTS = {"loss": ("strip", "two-strip", "eager"), "gradcache": ("plain", "gradcache")}
LOSS_GEMMS = {"strip": (1, 3), "two-strip": (2, 6), "eager": (2, 4)}  # (fwd, bwd) 2 B N d GEMMs per rank
STRIP_VS_TWO_STRIP_MAX = 0.8  # expected strip / two-strip time at the largest N (CPU)
GC_VS_PLAIN_MAX = 1.5  # expected gradcache / plain step time (where the plain step fits in memory)
LOSS_CHECK = dict(B=48, d=64, tol=1e-10)  # per-rank rows, width, float64 tolerance
GC_CHECK_TOL = 1e-4
POSITIVE = ("d", "chunk", "repeats", "threads", "hidden", "in_dim", "emb_dim")  # options that must be >= 1


# --------------------------------------------------------------------------- inside the ranks
def _all(x) -> list:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, x)
    return out


def _max_over_ranks(values) -> list[float]:
    return [max(col) for col in zip(*_all([float(v) for v in values]))]


def _say(msg: str) -> None:
    if dist.get_rank() == 0:
        print(msg, flush=True)


def _write(path: str, obj) -> None:
    if dist.get_rank() == 0:
        C.write_json(path, obj, indent=None)


def rank_sizes(total: int, world: int) -> list[int]:
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def check_tolerance(variant: str, fused: str) -> tuple[torch.dtype, str, float, float]:
    """The float64 check's input dtype, tolerance kind and (loss, gradient) tolerances of a loss variant: float64
    inputs and LOSS_CHECK's tolerance, except the triton variants (16/32-bit inputs): bench_loss's rule, fp32,
    or TF32 where torch allows TF32 matmuls (the kernels' dots follow that setting)."""
    if variant == "eager" or fused != "triton":
        return torch.float64, "fp64", LOSS_CHECK["tol"], LOSS_CHECK["tol"]
    kind = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return torch.float32, kind, *C.TOLERANCES[kind]


def loss_fns(spec: dict) -> dict:
    def one(a, b, symmetric, backend):
        return hardness_weighted_loss(a, b, logit_scale=spec["scale"], alpha=spec["alpha"], symmetric=symmetric,
                                      backend=backend, distributed=True, local_loss=True)

    fused = spec["fused"]
    return {"strip": lambda q, t: one(q, t, True, fused),
            "two-strip": lambda q, t: (one(q, t, False, fused) + one(t, q, False, fused)) / 2,
            "eager": lambda q, t: one(q, t, True, "reference")}


class MLPEncoder(nn.Module):
    def __init__(self, d_in=256, hidden=2048, d_emb=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_emb))

    def forward(self, x):
        return nn.functional.normalize(self.net(x), dim=-1)


class Sweep:
    """One sweep inside a rank: ``fns`` {variant: fn(q, t) -> loss}, its inputs, checks and timed steps."""

    def __init__(self, rank: int, world: int, spec: dict):
        torch.set_num_threads(spec["threads"])
        self.rank, self.world, self.spec, self.model = rank, world, spec, None
        self.device = torch.device("cuda", rank) if spec["comm"] == "nccl" else torch.device("cpu")
        if spec["kind"] == "loss":
            self.fns = loss_fns(spec)
            return
        torch.manual_seed(spec["seed"])
        base = MLPEncoder(spec["in_dim"], spec["hidden"], spec["emb_dim"]).to(self.device)
        ids = [rank] if self.device.type == "cuda" else None
        self.model = nn.parallel.DistributedDataParallel(base, device_ids=ids)
        self.loss_fn = FusedHardnessLoss(logit_scale=spec["scale"], alpha=spec["alpha"], local_loss=True,
                                         distributed=True, backend=spec["fused"])
        cache = GradCache(self.model, self.loss_fn, spec["chunk"])
        # GradCache runs its backward itself: the loss it returns is made a leaf, so .backward() is a no-op
        self.fns = {"plain": lambda q, t: self.loss_fn(self.model(q), self.model(t)),
                    "gradcache": lambda q, t: cache(q, t).detach().requires_grad_()}

    def reset(self, q, t) -> None:
        q.grad = t.grad = None
        if self.model is not None:
            self.model.zero_grad(set_to_none=True)

    def inputs(self, size: int, k: int = 0):
        n, s = rank_sizes(size, self.world)[self.rank], self.spec
        g = torch.Generator().manual_seed(s["seed"] + size + 7919 * self.rank + 1000 * k)
        if s["kind"] == "loss":
            q = C.normalized_rows(n, s["d"], dtype=torch.float32, device=self.device, generator=g)
            t = C.normalized_rows(n, s["d"], dtype=torch.float32, device=self.device, generator=g, like=q)
            return q.requires_grad_(), t.requires_grad_()
        q = torch.randn(n, s["in_dim"], generator=g)
        return q.to(self.device), (q + 0.5 * torch.randn(n, s["in_dim"], generator=g)).to(self.device)

    def check_loss(self) -> dict:
        spec, d = self.spec, LOSS_CHECK["d"]
        sizes = [LOSS_CHECK["B"] + r for r in range(self.world)]
        starts = [sum(sizes[:r]) for r in range(self.world)]
        lo, n = starts[self.rank], sizes[self.rank]
        g = torch.Generator().manual_seed(spec["seed"] + 4242)
        Q = C.normalized_rows(sum(sizes), d, dtype=torch.float32, device="cpu", generator=g).double()
        T = C.normalized_rows(sum(sizes), d, dtype=torch.float32, device="cpu", generator=g, like=Q).double()
        Qt, Tt = Q.clone().requires_grad_(), T.clone().requires_grad_()
        losses = [reference_loss(Qt[o:o + b], Tt[o:o + b], logit_scale=spec["scale"], alpha=spec["alpha"],
                                 all_queries=Qt, all_targets=Tt, offset=o) for o, b in zip(starts, sizes)]
        sum(losses).backward()
        truth = (losses[self.rank].detach(), Qt.grad[lo:lo + n], Tt.grad[lo:lo + n])
        checks = {}
        for v, fn in self.fns.items():
            dtype, kind, tol_loss, tol_grad = check_tolerance(v, spec["fused"])
            q, t = (x[lo:lo + n].to(self.device, dtype).clone().requires_grad_() for x in (Q, T))
            err = None
            try:
                loss = fn(q, t)
                loss.backward()
                errs = [C.rel_err(a, b) for a, b in zip((loss, q.grad, t.grad), truth)]
            except Exception as exc:  # noqa: BLE001 - recorded; the ranks stay in step when all raise
                err, errs = f"{type(exc).__name__}: {exc}".splitlines()[0], [math.inf] * 3
            *errs, failed = _max_over_ranks(errs + [err is not None])
            ok = not failed and errs[0] <= tol_loss and max(errs[1:]) <= tol_grad
            checks[v] = {"dtype": str(dtype)[6:], "errors_max_over_ranks": dict(zip(("loss", "dq", "dt"), errs)),
                         "tolerance_kind": kind, "tol_loss": tol_loss, "tol_grad": tol_grad, "passed": ok, "error": err}
            _say(f"    {v:<10} {'ok' if ok else 'FAILED'}: loss {errs[0]:.1e}, dq {errs[1]:.1e}, dt {errs[2]:.1e} "
                 f"(tol {tol_loss:.0e}/{tol_grad:.0e})" + (f"  [{err}]" if err else ""))
        return {"case": {"per_rank_B": sizes, "d": d, "dtype": "float64", "truth": "one process, float64"},
                "checks": checks, "passed": {v: c["passed"] for v, c in checks.items()}}

    def check_gradcache(self) -> dict:
        model, chunk = self.model, self.spec["chunk"]
        sizes = rank_sizes(self.spec["sizes"][0], self.world)
        q, t = self.inputs(self.spec["sizes"][0], 99)

        def grads():
            return {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.grad is not None}

        model.zero_grad(set_to_none=True)
        loss = self.fns["plain"](q, t)
        loss.backward()
        ref, ref_loss = grads(), float(loss.detach())
        runs = []
        for ch in sorted({chunk, min(chunk, max(1, min(sizes) // 4))}, reverse=True):
            model.zero_grad(set_to_none=True)
            got_loss = float(GradCache(model, self.loss_fn, ch)(q, t))
            got = grads()
            worst = max(C.rel_err(got[k], ref[k]) for k in ref) if set(got) == set(ref) else math.inf
            worst, lerr = _max_over_ranks([worst, abs(got_loss - ref_loss) / max(abs(ref_loss), 1e-30)])
            ok = worst < GC_CHECK_TOL and lerr < GC_CHECK_TOL
            runs.append({"chunk": ch, "chunks_per_rank": math.ceil(sizes[self.rank] / ch), "loss_rel_err": lerr,
                         "max_param_grad_rel_err_max_over_ranks": worst, "passed": ok})
            _say(f"    chunk {ch}: max parameter-gradient rel. error {worst:.1e}, loss {lerr:.1e} "
                 f"(tol {GC_CHECK_TOL:.0e}): {'ok' if ok else 'FAILED'}")
        return {"per_rank_batch": sizes, "runs": runs, "tol": GC_CHECK_TOL, "passed": all(r["passed"] for r in runs)}

    def timed_step(self, variant: str, q, t) -> tuple[float, float]:
        self.reset(q, t)
        gc.collect()
        C.sync(self.device)
        dist.barrier()
        gc.disable()  # an exception here ends the rank (and the run)
        t0 = time.perf_counter()
        loss = self.fns[variant](q, t)
        loss.backward()
        C.sync(self.device)
        ms = (time.perf_counter() - t0) * 1e3
        gc.enable()
        return ms, float(loss.detach())


def passed(check: dict | None, variant: str) -> bool:
    p = (check or {}).get("passed")
    return bool(p.get(variant) if isinstance(p, dict) else p)


def sweep_rank(rank: int, world: int, spec: dict, out_path: str) -> None:
    sw = Sweep(rank, world, spec)
    _say(f"  correctness ({spec['kind']}):")
    try:
        check = sw.check_loss() if spec["kind"] == "loss" else sw.check_gradcache()
    except Exception as exc:  # noqa: BLE001 - recorded: no timing
        check = {"passed": False, "error": f"{type(exc).__name__}: {exc}"}
        _say(f"    FAILED: {check['error']}")
    payload = {"correctness": check, "timing": {}}
    _write(out_path, payload)
    variants = [v for v in sw.fns if passed(check, v)]
    for size in spec["sizes"]:
        inputs = [sw.inputs(size, k) for k in range(2)]
        rec = {v: {"step_ms": [], "per_rank_ms": [], "losses": [], "warmup_step_ms": []} for v in variants}
        calls = [(v, True) for v in variants for _ in range(spec["warmup"])]
        calls += [(v, False) for i in range(spec["repeats"]) for v in (variants if i % 2 == 0 else variants[::-1])]
        for n, (v, warm) in enumerate(calls):
            ms, losses = map(list, zip(*_all(sw.timed_step(v, *inputs[n % 2]))))  # per rank
            rec[v]["warmup_step_ms" if warm else "step_ms"].append(max(ms))
            if not warm:
                rec[v]["per_rank_ms"].append(ms)
                rec[v]["losses"].append(losses)
            _say(f"    {spec['kind']} {size} {v}: {'warm-up' if warm else 'run'} {max(ms):.1f} ms")
        for r in rec.values():
            r.update(median_step_ms=C.median(r["step_ms"]), min_step_ms=min(r["step_ms"], default=None),
                     max_step_ms=max(r["step_ms"], default=None),
                     finite=all(math.isfinite(x) for row in r["losses"] for x in row))
        payload["timing"][str(size)] = {"per_rank": rank_sizes(size, world), "variants": rec}
        del inputs
        _write(out_path, payload)


def memory_rank(rank: int, world: int, spec: dict, out_path: str) -> None:
    sw = Sweep(rank, world, spec)
    fn = sw.fns[spec["variant"]]
    q, t = sw.inputs(min(spec["size"], 64 * world), 5)  # warm-up: libraries, autograd, collectives, DDP
    fn(q, t).backward()
    del q, t
    q, t = sw.inputs(spec["size"])
    sw.reset(q, t)
    dist.barrier()
    cuda = sw.device.type == "cuda"
    rec = C.cuda_peak_of_call(fn, q, t, sw.device) if cuda else C.cpu_peak_rss_of_call(fn, q, t)
    _write(out_path, {"per_rank": _all(rec)})


# --------------------------------------------------------------------------- the parent
def run_ranks(fn, world: int, spec: dict, kept: dict | None = None) -> tuple[dict | None, str | None]:
    """``fn(rank, world, spec, path)`` on ``world`` fresh ranks: (what rank 0 wrote to path or None, error). Stopped
    (KeyboardInterrupt: SIGINT, SIGTERM), the ranks are ended, what rank 0 had written goes into ``kept``, and it
    is raised on."""
    with tempfile.TemporaryDirectory() as tmp:
        out, err = Path(tmp) / "result.json", None
        try:
            spawn_ranks(fn, world, spec, str(out), backend=spec["comm"])
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # the ranks: else the exit would wait for them
                child.terminate()
                child.join(10)
            if kept is not None and out.exists():
                kept.update(json.loads(out.read_text()))
            raise
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            err = f"{type(exc).__name__}: {' | '.join([m for m in str(exc).splitlines() if m.strip()][-3:])}"
        return (json.loads(out.read_text()), err) if out.exists() else (None, err or "no result")


def sweep(spec: dict, world: int, out: dict | None = None, on_progress=None) -> dict:
    """The checks and timings of ``spec`` on ``world`` ranks, then each (size, variant)'s memory, filled into ``out``
    as they come; ``on_progress()`` after the timings and after each memory figure. Stopped, ``out`` keeps what
    was measured (the timings rank 0 had written included) and KeyboardInterrupt is raised on."""
    out = {} if out is None else out
    progress, t0, kept = on_progress or (lambda: None), time.perf_counter(), {}
    out.update(spec=spec, error=None, correctness=None, timing={}, memory={})
    try:
        payload, err = run_ranks(sweep_rank, world, spec, kept)
    except KeyboardInterrupt:
        out.update(correctness=kept.get("correctness"), timing=kept.get("timing", {}),
                   wall_s_timing=time.perf_counter() - t0)
        raise
    if err:
        print(f"  ERROR in the check/timing processes: {err}", flush=True)
    out.update(error=err, correctness=(payload or {}).get("correctness"), timing=(payload or {}).get("timing", {}),
               wall_s_timing=time.perf_counter() - t0)
    progress()
    if payload is None:
        return out
    for size in spec["sizes"]:
        mem = out["memory"][str(size)] = {}
        for v in VARIANTS[spec["kind"]]:
            if not passed(out["correctness"], v):
                mem[v] = {"status": "FAILED"}
                continue
            mp, merr = run_ranks(memory_rank, world, dict(spec, size=size, variant=v))
            if mp is None or merr is not None:
                mem[v] = {"status": "ERROR", "error": merr}
                print(f"  memory {size} {v}: ERROR {merr}", flush=True)
            else:
                peaks = [r["peak_bytes"] for r in mp["per_rank"]]
                mem[v] = {"status": "ok", "peak_bytes_max_over_ranks": max(peaks), "peak_bytes_per_rank": peaks,
                          "baseline_clean_all_ranks": all(r.get("baseline_clean", True) for r in mp["per_rank"]),
                          "per_rank": mp["per_rank"]}
                print(f"  memory {size} {v}: peak {max(peaks) / C.MiB:.1f} MiB (max over ranks)", flush=True)
            progress()
    out["wall_s_memory"] = time.perf_counter() - t0 - out["wall_s_timing"]
    return out


def _ratio(a, b):
    return a / b if a is not None and b else None


def _pass_word(ok) -> str:
    return "n/a (not measured)" if ok is None else "PASS" if ok else "FAIL"


def report(res: dict, world: int) -> dict:
    spec, kind = res["spec"], res["spec"]["kind"]
    ms, peak = {}, {}  # median step ms and peak bytes (max over ranks) of each (size, variant)
    # the ratios' peaks: a CPU peak below the RSS readings' noise gives no ratio (CUDA's counters are exact)
    trusted = {}
    print(f"\n{'size':>8} {'per rank':>10} {'variant':>10} {'status':>9} {'step ms':>9} {'min..max ms':>17} "
          f"{'peak MiB':>9}")
    for size in spec["sizes"]:
        per = "/".join(map(str, sorted(set(rank_sizes(size, world)))))
        for v in VARIANTS[kind]:
            tm = res["timing"].get(str(size), {}).get("variants", {}).get(v) or {}
            mem = res["memory"].get(str(size), {}).get(v, {})
            ms[size, v], peak[size, v] = tm.get("median_step_ms"), mem.get("peak_bytes_max_over_ranks")
            p = peak[size, v]
            trusted[size, v] = p if p is None or spec["comm"] == "nccl" or p >= C.RSS_NOISE_BYTES else None
            status = ("n/a" if res["correctness"] is None else "FAILED" if not passed(res["correctness"], v)
                      else "n/a" if ms[size, v] is None else "ok" if tm["finite"] else "NONFINITE")
            clean = mem.get("baseline_clean_all_ranks", True)
            mib = "-" if peak[size, v] is None else C.fmt(peak[size, v] / C.MiB) + ("" if clean else "*")
            span = C.fmt(tm.get("min_step_ms")) + ".." + C.fmt(tm.get("max_step_ms"))
            print(f"{size:>8} {per:>10} {v:>10} {status:>9} {C.fmt(ms[size, v]):>9} {span:>17} {mib:>9}")
    pairs = ([("strip", "two-strip"), ("strip", "eager"), ("two-strip", "eager")] if kind == "loss"
             else [("gradcache", "plain")])
    ratios = []
    for size in spec["sizes"]:
        r = {"N" if kind == "loss" else "batch": size}
        for a, b in pairs:
            for what, of in (("time", ms), ("mem", trusted)):
                r[f"{a}_over_{b}_{what}".replace("-", "_")] = _ratio(of[size, a], of[size, b])
        ratios.append(r)
        print(f"  {size}: " + ", ".join(f"{k} {C.fmt(v, '.3f')}" for k, v in r.items() if k not in ("N", "batch")))
    if kind == "loss":
        x, top = ratios[-1]["strip_over_two_strip_time"], STRIP_VS_TWO_STRIP_MAX
        check = {"N": spec["sizes"][-1], "ratio": x, "expected_max": top, "pass": None if x is None else x <= top}
        print(f"strip / two-strip time at N={spec['sizes'][-1]}: {C.fmt(x, '.3f')} (expected <= {top}) "
              f"{_pass_word(check['pass'])}")
        return {"ratios": ratios, "expected_check": check}
    for r in ratios:
        x = r["gradcache_over_plain_time"]
        r["time_pass"] = None if x is None else x <= GC_VS_PLAIN_MAX
    x = max((r["gradcache_over_plain_time"] for r in ratios if r["time_pass"] is not None), default=None)
    check = {"expected_max": GC_VS_PLAIN_MAX, "max_ratio": x, "all_pass": None if x is None else x <= GC_VS_PLAIN_MAX}
    print(f"gradcache / plain time <= {GC_VS_PLAIN_MAX} at every batch: "
          f"{_pass_word(check['all_pass'])} (max {C.fmt(x, '.3f')})")
    lo, hi = spec["sizes"][0], spec["sizes"][-1]
    growth = {v: {"from": lo, "to": hi, "batch_factor": hi / lo, "peak_from_bytes": peak[lo, v],
                  "peak_to_bytes": peak[hi, v], "growth_factor": _ratio(trusted[hi, v], trusted[lo, v])}
              for v in VARIANTS[kind]} if lo != hi else {}
    for v, gr in growth.items():
        print(f"  peak memory of {v}, batch {lo} -> {hi}: x{C.fmt(gr['growth_factor'], '.2f')}")
    if (g := growth.get("gradcache", {}).get("growth_factor")) is not None:
        growth["gradcache_nearly_flat"] = g <= 1.5  # at most 1.5x the peak for the larger batch
    return {"ratios": ratios, "expected_check": check, "memory_growth": growth}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = p.add_argument
    add("--world", type=int, default=2, help="ranks (processes on this machine); default 2")
    add("--N", nargs="+", type=int, help="global loss batch sizes; default CPU 2048 4096 8192")
    add("--d", type=int, help="loss embedding width; default 512")
    add("--batches", nargs="+", type=int, help="global GradCache batch sizes; default CPU 512 2048 8192")
    add("--chunk", type=int, help="GradCache chunk size; default 256")
    add("--repeats", type=int, help="timed runs per point (median); default 3")
    add("--warmup", type=int, default=1, help="untimed runs per variant first (>= 0); default 1")
    add("--quick", action="store_true", help="tiny sizes, a smoke test (< 60 s on 2 cores)")
    add("--out", type=Path, help="JSON path; default benchmarks/results/<device>/<date>-distributed.json")
    add("--skip-loss", action="store_true")
    add("--skip-gradcache", action="store_true")
    add("--comm", choices=("auto", "gloo", "nccl"), default="auto", help="auto: NCCL with a GPU per rank, else gloo")
    add("--threads", type=int, help="torch threads per rank; default max(1, cores // world)")
    add("--in-dim", type=int, default=256, help="MLP input width")
    add("--hidden", type=int, help="MLP hidden width; default 2048")
    add("--emb-dim", type=int, default=256, help="MLP output (embedding) width")
    add("--alpha", type=float, default=9.0)
    add("--logit-scale", type=float, default=50.0)
    add("--seed", type=int, default=0)
    args = p.parse_args(argv)
    # before the defaults: a value given is never replaced (a 0 used to become the default)
    for flag in ("world", *POSITIVE):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("N", "batches"):
        if any(x < args.world for x in getattr(args, flag) or ()):
            p.error(f"--{flag} must give each of the {args.world} ranks at least one row, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    C.start_script()
    gpus = torch.cuda.device_count()
    comm = args.comm if args.comm != "auto" else ("nccl" if gpus >= args.world else "gloo")
    if comm == "nccl" and gpus < args.world:
        p.error(f"--comm nccl needs a GPU per rank ({args.world} ranks, {gpus} GPUs)")
    cuda = comm == "nccl"
    quick = dict(N=[8192 if cuda else 1024], d=512 if cuda else 64, batches=[64, 128], chunk=32, hidden=128, repeats=2)
    full = dict(N=[8192, 16384, 32768] if cuda else [2048, 4096, 8192], d=512,
                batches=[2048, 8192, 32768] if cuda else [512, 2048, 8192], chunk=256, hidden=2048,
                repeats=10 if cuda else 3)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    threads = args.threads or max(1, C.usable_cores() // args.world)
    t_begin = time.perf_counter()
    meta = dict(C.run_meta(device), world=args.world, comm_backend=comm, threads_per_rank=threads,
                machine_load_before=C.machine_load())
    print(f"llave-fast distributed benchmark on {meta['device']['name']}: {args.world} ranks, {comm}, {threads} "
          f"thread(s)/rank; torch {meta['versions']['torch']}; load before {meta['machine_load_before']}")
    common = dict(comm=comm, threads=threads, fused="triton" if cuda else "torch", alpha=args.alpha,
                  scale=args.logit_scale, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    specs = {"loss": dict(common, kind="loss", sizes=sorted(args.N), d=args.d),
             "gradcache": dict(common, kind="gradcache", sizes=sorted(args.batches), chunk=args.chunk,
                               in_dim=args.in_dim, hidden=args.hidden, emb_dim=args.emb_dim)}
    out = C.result_path(device, args.out, "-distributed")
    res, rep = {}, {}
    payload = {"schema": 2, "kind": "distributed", "partial": True, "meta": meta,  # --out: written as a string
               "config": dict(vars(args), comm_resolved=comm, threads_per_rank=threads, loss_gemms=LOSS_GEMMS,
                              loss_check_case=LOSS_CHECK, gradcache_check_tol=GC_CHECK_TOL)}

    def write():  # after every timing sweep and memory figure, "partial": true until the run ends
        C.write_json(out, {**payload, "correctness": {k: r.get("correctness") for k, r in res.items()}, **res})

    # SIGINT or SIGTERM end the measuring, not the run: what was measured is written, marked "interrupted"
    try:
        for kind, spec in specs.items():
            if getattr(args, f"skip_{kind}"):
                continue
            if kind == "loss":
                print(f"\n[loss] fp32, d={args.d}, global N {spec['sizes']}, symmetric, alpha {args.alpha:g}, "
                      f"logit_scale {args.logit_scale:g}, fused backend {spec['fused']!r}; GEMMs (fwd, bwd) "
                      f"{LOSS_GEMMS}")
            else:
                n_params = sum(p.numel() for p in MLPEncoder(args.in_dim, args.hidden, args.emb_dim).parameters())
                print(f"\n[gradcache] DDP MLP {args.in_dim}-{args.hidden}-{args.hidden}-{args.emb_dim} "
                      f"({n_params / 1e6:.2f} M parameters), global batch {spec['sizes']}, chunk {args.chunk}, "
                      f"FusedHardnessLoss(local_loss=True, distributed=True, backend={spec['fused']!r})")
            sweep(spec, args.world, res.setdefault(kind, {}), on_progress=write)
            rep[kind] = report(res[kind], args.world)
    except KeyboardInterrupt as exc:
        payload["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"\nINTERRUPTED ({payload['interrupted']}) after {time.perf_counter() - t_begin:.0f} s: writing what "
              "was measured so far", flush=True)
        rep.update({k: report(r, args.world) for k, r in res.items() if k not in rep})
    meta["machine_load_after"] = C.machine_load()
    del payload["partial"]
    payload.update(ratios={k: r["ratios"] for k, r in rep.items()},
                   expected_checks={k: r["expected_check"] for k, r in rep.items()},
                   total_wall_s=time.perf_counter() - t_begin)
    if "gradcache" in rep:
        payload["ratios"]["gradcache_memory_growth"] = rep["gradcache"]["memory_growth"]
    write()
    print(f"\nresults written to {out}; total wall time {payload['total_wall_s']:.0f} s; load after "
          f"{meta['machine_load_after']}")
    return 130 if "interrupted" in payload else 0


if __name__ == "__main__":
    sys.exit(main())
