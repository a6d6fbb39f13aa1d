#!/usr/bin/env python3
"""Distributed benchmark: the cross-rank loss (strip algorithm) and GradCache, ranks on one machine.

    python benchmarks/bench_distributed.py              # defaults (CPU: gloo, 2 ranks)
    python benchmarks/bench_distributed.py --quick      # smoke run at tiny sizes (< 60 s on 2 cores)
    python benchmarks/bench_distributed.py --world 2 --N 2048 8192 --d 512 --skip-gradcache

Two sweeps, each on ``--world`` processes joined by ``llave_fast.testing.spawn_ranks`` (gloo on
CPU; NCCL on GPUs when there is one GPU per rank):

1. Loss. LLaVE's per-rank local loss over the global batch (N = world x B), three ways:
   ``strip``     hardness_weighted_loss(q, t, distributed=True) with a fused backend: one
                 row strip per rank, both directions from it (1 + 3 GEMM-equivalents);
   ``two-strip`` the same fused backend run as two one-way strips, q->T and t->Q, averaged
                 (LLaVE's two-strip structure without a B x N tensor; 2 x (1 + 3) GEMMs);
   ``eager``     backend="reference": LLaVE's eager path, gather with grad and two
                 materialised B x N strips (2 + 4 GEMMs).
   Correctness first (float64, small case, against a one-process float64 truth of the
   per-rank loss and gradients); then step time (max over ranks) and peak memory per rank.
2. GradCache. An MLP encoder under DistributedDataParallel with FusedHardnessLoss(local_loss=True,
   gather_with_grad=True): a plain step (full-batch forward + backward) against a GradCache step,
   as the global batch grows. Gradients are checked equal first.

Peak memory: every (variant, size) runs in fresh processes; CPU: the kernel's peak-RSS mark is
reset (/proc/self/clear_refs) right before the call and the figure is VmHWM after minus VmRSS
before; CUDA: torch.cuda.max_memory_allocated delta. See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import _common as C  # noqa: E402
from llave_fast import FusedHardnessLoss, GradCache, hardness_weighted_loss  # noqa: E402
from llave_fast.reference import reference_loss  # noqa: E402
from llave_fast.testing import spawn_ranks  # noqa: E402

LOSS_VARIANTS = ("strip", "two-strip", "eager")
GC_VARIANTS = ("plain", "gradcache")
# GEMM-equivalents (2 * B * N * d FLOPs each) per rank and step: (forward, backward)
LOSS_GEMMS = {"strip": (1, 3), "two-strip": (2, 6), "eager": (2, 4)}

STRIP_VS_TWO_STRIP_MAX = 0.8  # expected strip / two-strip time at the largest N (CPU)
GC_VS_PLAIN_MAX = 1.5  # expected gradcache / plain step time (it fits in memory)
LOSS_CHECK = dict(B=48, d=64, tol=1e-10)  # per-rank rows, width, float64 tolerance
GC_CHECK_TOL = 1e-4
RSS_TOL_KIB = 1024  # VmHWM - VmRSS right after the reset above this: the baseline is not clean


# --------------------------------------------------------------------------- rank helpers


def _rank_device(rank, spec) -> torch.device:
    torch.set_num_threads(spec["threads"])
    if spec["comm"] == "nccl":
        return torch.device("cuda", rank)
    return torch.device("cpu")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _comm_device(device):
    return device if device.type == "cuda" else torch.device("cpu")


def _all_max(values, device) -> list[float]:
    x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(device))
    dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x.cpu().tolist()


def _all_gather_vals(values, device) -> list[list[float]]:
    """[rank][i] of every rank's ``values`` (same length everywhere)."""
    x = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device(device))
    out = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(out, x)
    return [o.cpu().tolist() for o in out]


def _rank_sizes(total: int, world: int) -> list[int]:
    return [total // world + (1 if r < total % world else 0) for r in range(world)]


def _write(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, default=str)
    os.replace(tmp, path)


def _say(rank, msg):
    if rank == 0:
        print(msg, flush=True)


def _timed(fwd, bwd, device):
    """One step: barrier, then fwd() (-> loss) and bwd(loss) timed with perf_counter (after a
    CUDA synchronize). Returns (fwd ms, bwd ms, total ms, loss value) of this rank."""
    gc.collect()
    _sync(device)
    dist.barrier()
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        loss = fwd()
        if bwd is not None:
            _sync(device)
            t1 = time.perf_counter()
            bwd(loss)
        _sync(device)
        t2 = time.perf_counter()
        if bwd is None:
            t1 = t2
    finally:
        if gc_was:
            gc.enable()
    value = float(loss.detach())
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, (t2 - t0) * 1e3, value


def _interleaved(labels, steps, device, *, warmup, repeats, rank, tag):
    """Warm-up per label, then ``repeats`` interleaved rounds (ABBA order). ``steps[label]()``
    returns (fwd, bwd) callables for one call. Per call the step time is the max over ranks."""
    out = {lab: {"step_ms": [], "per_rank_ms": [], "per_rank_fwd_ms": [], "per_rank_bwd_ms": [],
                 "warmup_step_ms": [], "losses": []} for lab in labels}

    def one(lab, warm):
        f, b, tot, v = _timed(*steps[lab](), device)
        (step,) = _all_max([tot], device)
        per = _all_gather_vals([f, b, tot, v], device)
        rec = out[lab]
        if warm:
            rec["warmup_step_ms"].append(step)
            return step
        rec["step_ms"].append(step)
        rec["per_rank_fwd_ms"].append([p[0] for p in per])
        rec["per_rank_bwd_ms"].append([p[1] for p in per])
        rec["per_rank_ms"].append([p[2] for p in per])
        rec["losses"].append([p[3] for p in per])
        return step

    for lab in labels:
        for _ in range(warmup):
            ms = one(lab, True)
            _say(rank, f"    {tag} {lab}: warm-up {ms:.1f} ms")
    for it in range(repeats):
        order = list(labels) if it % 2 == 0 else list(labels)[::-1]
        for lab in order:
            ms = one(lab, False)
            _say(rank, f"    {tag} {lab}: run {it + 1}/{repeats} {ms:.1f} ms")
    for lab in labels:
        rec = out[lab]
        rec["median_step_ms"] = C.median(rec["step_ms"])
        rec["min_step_ms"] = min(rec["step_ms"]) if rec["step_ms"] else None
        rec["max_step_ms"] = max(rec["step_ms"]) if rec["step_ms"] else None
        rec["finite"] = all(math.isfinite(v) for row in rec["losses"] for v in row)
    return out


def _measure_memory(fwd, bwd, device) -> dict:
    """Peak memory of one fwd + bwd on this rank (see the module docstring)."""
    gc.collect()
    _sync(device)
    dist.barrier()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        loss = fwd()
        _sync(device)
        peak_fwd = torch.cuda.max_memory_allocated(device) - base
        if bwd is not None:
            bwd(loss)
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        value = float(loss.detach())
        del loss
        return {"method": "torch.cuda.max_memory_allocated - memory_allocated before", "baseline_clean": True,
                "peak_bytes": peak, "peak_fwd_bytes": peak_fwd if bwd is not None else None, "loss": value,
                "base_allocated_bytes": base}
    reset_ok = C.reset_rss_peak()
    before = C.proc_status_kib()
    gap = before["VmHWM"] - before["VmRSS"]
    loss = fwd()
    after_fwd = C.proc_status_kib()
    if bwd is not None:
        bwd(loss)
    after = C.proc_status_kib()
    value = float(loss.detach())
    del loss
    gc.collect()
    end = C.proc_status_kib()
    base = before["VmRSS"]
    return {
        "method": "VmHWM after - VmRSS before (/proc/self/status), fresh processes, peak mark reset "
                  "(clear_refs 5) right before the call",
        "peak_mark_reset": reset_ok,
        "hwm_minus_rss_before_kib": gap,
        "hwm_equals_rss_before": gap == 0,
        "baseline_clean": bool(reset_ok and gap <= RSS_TOL_KIB),
        "rss_before_kib": base,
        "peak_bytes": (after["VmHWM"] - base) * 1024,
        "peak_fwd_bytes": (after_fwd["VmHWM"] - base) * 1024 if bwd is not None else None,
        "retained_after_bytes": (end["VmRSS"] - base) * 1024,
        "loss": value,
        "raw_kib": {"before": before, "after_fwd": after_fwd, "after": after, "end": end},
    }


def _gather_memory(rec, rank) -> list | None:
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, rec)
    return out if rank == 0 else None


# --------------------------------------------------------------------------- the loss variants


def loss_fn_of(variant: str, fused: str, alpha: float, scale: float):
    def one(a, b, symmetric, backend):
        return hardness_weighted_loss(a, b, logit_scale=scale, alpha=alpha, symmetric=symmetric,
                                      backend=backend, distributed=True)

    if variant == "strip":
        return lambda q, t: one(q, t, True, fused)
    if variant == "two-strip":
        return lambda q, t: (one(q, t, False, fused) + one(t, q, False, fused)) / 2
    if variant == "eager":
        return lambda q, t: one(q, t, True, "reference")
    raise ValueError(variant)


def _loss_pairs(n, B, d, *, device, seed):
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        q = C.normalized_rows(B, d, dtype=torch.float32, device=device, generator=g)
        t = C.normalized_rows(B, d, dtype=torch.float32, device=device, generator=g, like=q, noise=1.0)
        pairs.append((q.requires_grad_(), t.requires_grad_()))
    return pairs


def _forced_chunk(rows, n_cols):
    """Force the torch backend's chunk to ``rows`` rows (its module global, read at call time)."""
    from llave_fast.backends import torch_backend as tb

    old = tb._CHUNK_ELEMS
    tb._CHUNK_ELEMS = rows * n_cols

    class _Ctx:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            tb._CHUNK_ELEMS = old

    return _Ctx()


def _loss_check(rank, world, spec, device) -> dict:
    """Float64, small: each variant's per-rank loss and gradients against a one-process truth
    (sum over ranks of their local losses, differentiated: LLaVE's gather-with-grad semantics)."""
    B, d, tol = LOSS_CHECK["B"], LOSS_CHECK["d"], LOSS_CHECK["tol"]
    sizes = [B + r for r in range(world)]  # unequal batches, as ranks may hold
    N, lo = sum(sizes), sum(sizes[:rank])
    Bl = sizes[rank]
    g = torch.Generator().manual_seed(spec["seed"] + 4242)
    Q0 = C.normalized_rows(N, d, dtype=torch.float32, device="cpu", generator=g).double()
    T0 = C.normalized_rows(N, d, dtype=torch.float32, device="cpu", generator=g, like=Q0, noise=1.0).double()
    Qt, Tt = Q0.clone().requires_grad_(), T0.clone().requires_grad_()
    total, per_rank, o = 0.0, [], 0
    for b in sizes:
        loss = reference_loss(Qt[o:o + b], Tt[o:o + b], logit_scale=spec["scale"], alpha=spec["alpha"],
                              all_queries=Qt, all_targets=Tt, offset=o)
        per_rank.append(loss.detach())
        total = total + loss
        o += b
    total.backward()
    truth = {"loss": per_rank[rank], "dq": Qt.grad[lo:lo + Bl], "dt": Tt.grad[lo:lo + Bl]}
    runs = []
    for v in LOSS_VARIANTS:
        runs.append((v, None))
        if v != "eager" and spec["fused"] == "torch":
            runs.append((v, 7))  # 7-row chunks: the multi-chunk path, last chunk partial
    results, outputs = {}, {}
    for v, chunk in runs:
        label = v + (" [7-row chunks]" if chunk else "")
        dtype = torch.float64
        if v != "eager" and spec["fused"] == "triton":
            dtype = torch.float32  # triton takes 16/32-bit inputs
        q = Q0[lo:lo + Bl].to(device, dtype).clone().requires_grad_()
        t = T0[lo:lo + Bl].to(device, dtype).clone().requires_grad_()
        err = None
        try:
            fn = loss_fn_of(v, spec["fused"], spec["alpha"], spec["scale"])
            if chunk:
                with _forced_chunk(chunk, N):
                    loss = fn(q, t)
                    loss.backward()
            else:
                loss = fn(q, t)
                loss.backward()
            errs = [C.rel_err(loss, truth["loss"]), C.rel_err(q.grad, truth["dq"]), C.rel_err(t.grad, truth["dt"])]
            outputs[label] = (loss.detach().cpu().double(), q.grad.cpu().double(), t.grad.cpu().double())
        except Exception as exc:  # noqa: BLE001 - recorded; the ranks stay in step when both raise
            err = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            errs = [float("inf")] * 3
        errs = _all_max(errs + [1.0 if err else 0.0], device)
        # float64: LOSS_CHECK's tolerance; triton (fp32 inputs, TF32 dots): bench_loss's TF32 ones
        this_tol = tol if dtype == torch.float64 else 5e-2
        ok = not errs[3] and all(e <= this_tol for e in errs[:3])
        results[label] = {"variant": v, "chunk_rows": chunk, "dtype": str(dtype).replace("torch.", ""),
                          "errors_max_over_ranks": {"loss": errs[0], "dq": errs[1], "dt": errs[2]},
                          "tol": this_tol, "passed": bool(ok), "error": err}
        msg = "ok" if ok else "FAILED"
        _say(rank, f"    {label:<28} {msg}: loss {errs[0]:.1e}, dq {errs[1]:.1e}, dt {errs[2]:.1e} "
                   f"(tol {this_tol:.0e})" + (f"  [{err}]" if err else ""))
    # the variants against each other (same per-rank loss and gradients)
    labels = list(outputs)
    pair_err = 0.0
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = outputs[labels[i]], outputs[labels[j]]
            pair_err = max(pair_err, *(C.rel_err(x, y) for x, y in zip(a, b)))
    (pair_err,) = _all_max([pair_err], device)
    verdict = {v: all(r["passed"] for r in results.values() if r["variant"] == v) for v in LOSS_VARIANTS}
    return {"case": {"per_rank_B": sizes, "N": N, "d": d, "dtype": "float64", "scale": spec["scale"],
                     "alpha": spec["alpha"], "symmetric": True,
                     "truth": "one process, float64: d(sum over ranks of reference_loss of rank r)/d(inputs)"},
            "checks": results, "pairwise_max_rel_err": pair_err, "passed": verdict}


def _loss_steps(fns, pairs):
    """{variant: step()} where step() returns (fwd, bwd) of one call on the next input pair."""
    count = dict.fromkeys(fns, 0)

    def make(v):
        def step():
            q, t = pairs[count[v] % len(pairs)]
            count[v] += 1
            q.grad = t.grad = None
            return (lambda: fns[v](q, t)), (lambda loss: loss.backward())
        return step
    return {v: make(v) for v in fns}


def loss_sweep_rank(rank, world, spec, out_path):
    """Correctness, then interleaved timing of the variants at every N (one process group)."""
    device = _rank_device(rank, spec)
    payload = {"correctness": None, "timing": {}}
    _say(rank, f"  correctness ({world} ranks, float64, per-rank B {LOSS_CHECK['B']}.."
               f"{LOSS_CHECK['B'] + world - 1}, d {LOSS_CHECK['d']}, vs one-process float64 truth):")
    check = _loss_check(rank, world, spec, device)
    payload["correctness"] = check
    if rank == 0:
        _write(out_path, payload)
    _say(rank, f"    variants agree with each other to {check['pairwise_max_rel_err']:.1e} (max rel. error)")
    ok = [v for v in LOSS_VARIANTS if check["passed"][v]]
    for v in LOSS_VARIANTS:
        if v not in ok:
            _say(rank, f"    {v}: FAILED correctness: no timing")
    for N in spec["N"]:
        sizes = _rank_sizes(N, world)
        B = sizes[rank]
        pairs = _loss_pairs(2, B, spec["d"], device=device, seed=spec["seed"] + N + 7919 * rank)
        fns = {v: loss_fn_of(v, spec["fused"], spec["alpha"], spec["scale"]) for v in ok}
        _say(rank, f"  timing N={N} (per rank {sizes}), d={spec['d']}: {', '.join(ok)} interleaved")
        res = _interleaved(ok, _loss_steps(fns, pairs), device, warmup=spec["warmup"],
                           repeats=spec["repeats"], rank=rank, tag=f"N={N}")
        payload["timing"][str(N)] = {"per_rank_B": sizes, "variants": res}
        pairs.clear()
        gc.collect()
        if rank == 0:
            _write(out_path, payload)


def loss_memory_rank(rank, world, spec, out_path):
    """One fwd + bwd of one variant at one N in these fresh processes; peak memory per rank."""
    device = _rank_device(rank, spec)
    fn = loss_fn_of(spec["variant"], spec["fused"], spec["alpha"], spec["scale"])
    # warm-up at a small size: libraries, autograd and the collectives are loaded before the baseline
    for q, t in _loss_pairs(2, 128, min(spec["d"], 128), device=device, seed=1 + rank):
        fn(q, t).backward()
    del q, t
    sizes = _rank_sizes(spec["N"], world)
    ((q, t),) = _loss_pairs(1, sizes[rank], spec["d"], device=device, seed=spec["seed"] + spec["N"] + 13 * rank)
    rec = _measure_memory(lambda: fn(q, t), lambda loss: loss.backward(), device)
    allr = _gather_memory(rec, rank)
    if rank == 0:
        _write(out_path, {"per_rank": allr, "per_rank_B": sizes})


# --------------------------------------------------------------------------- GradCache


class MLPEncoder(nn.Module):
    """Linear(in, hidden) + GELU + Linear(hidden, hidden) + GELU + Linear(hidden, emb), L2-normalised."""

    def __init__(self, d_in=256, hidden=2048, d_emb=256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, d_emb))

    def forward(self, x):
        return F.normalize(self.net(x), dim=-1)


def _gc_setup(rank, world, spec, device):
    torch.manual_seed(spec["seed"])
    base = MLPEncoder(spec["in_dim"], spec["hidden"], spec["emb_dim"]).to(device)
    model = nn.parallel.DistributedDataParallel(base, device_ids=[rank] if device.type == "cuda" else None)
    loss_fn = FusedHardnessLoss(logit_scale=spec["scale"], alpha=spec["alpha"], local_loss=True,
                                gather_with_grad=True, rank=rank, world_size=world, backend=spec["fused"])
    return model, loss_fn


def _gc_inputs(n, d_in, *, seed, device):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(n, d_in, generator=g)
    t = q + 0.5 * torch.randn(n, d_in, generator=g)
    return q.to(device), t.to(device)


def _gc_step_fns(variant, model, loss_fn, chunk):
    """(fwd, bwd) of one training step's gradient computation (gradients zeroed beforehand)."""
    if variant == "plain":
        def fwd_plain(q, t):
            return loss_fn(model(q), model(t))

        return fwd_plain, (lambda loss: loss.backward())
    gcache = GradCache(model, loss_fn, chunk)
    return (lambda q, t: gcache(q, t)), None


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _gc_check(rank, world, spec, device, per_rank_sizes) -> dict:
    model, loss_fn = _gc_setup(rank, world, spec, device)
    n = per_rank_sizes[rank]
    q, t = _gc_inputs(n, spec["in_dim"], seed=spec["seed"] + 99 + rank, device=device)
    chunks = [spec["chunk"]]
    small = max(1, min(per_rank_sizes) // 4)
    if small < spec["chunk"]:
        chunks.append(small)  # several chunks per rank: no_sync on all but the last
    model.zero_grad(set_to_none=True)
    fwd, bwd = _gc_step_fns("plain", model, loss_fn, spec["chunk"])
    loss = fwd(q, t)
    bwd(loss)
    ref, ref_loss = _grads(model), float(loss.detach())
    out = {"per_rank_batch": per_rank_sizes, "plain_loss_rank0": None, "runs": []}
    for ch in chunks:
        model.zero_grad(set_to_none=True)
        gl = float(_gc_step_fns("gradcache", model, loss_fn, ch)[0](q, t))
        got = _grads(model)
        missing = sorted(set(ref) ^ set(got))
        per_param = {k: C.rel_err(got[k], ref[k]) for k in ref if k in got}
        worst = max(per_param.values()) if per_param and not missing else float("inf")
        worst, lerr = _all_max([worst, abs(gl - ref_loss) / max(abs(ref_loss), 1e-30)], device)
        ok = worst < GC_CHECK_TOL and lerr < GC_CHECK_TOL
        out["runs"].append({"chunk": ch, "chunks_per_rank": math.ceil(n / ch),
                            "max_param_grad_rel_err_max_over_ranks": worst, "loss_rel_err": lerr,
                            "per_param_rel_err_rank0": per_param if rank == 0 else None,
                            "missing_grads": missing, "passed": bool(ok)})
        _say(rank, f"    chunk {ch} ({math.ceil(n / ch)} per rank): max parameter-gradient rel. error {worst:.1e}, "
                   f"loss rel. error {lerr:.1e} (tol {GC_CHECK_TOL:.0e}): {'ok' if ok else 'FAILED'}")
    out["plain_loss_rank0"] = ref_loss
    out["tol"] = GC_CHECK_TOL
    out["error_measure"] = "per parameter max|g_gc - g_plain| / max|g_plain| (DDP-reduced grads), max over params and ranks"
    out["passed"] = all(r["passed"] for r in out["runs"])
    return out


def _gc_steps(fns, inputs, model):
    """{variant: step()}: gradients set to None (untimed), then (fwd, bwd) on the next input set."""
    count = dict.fromkeys(fns, 0)

    def make(v):
        def step():
            q, t = inputs[count[v] % len(inputs)]
            count[v] += 1
            model.zero_grad(set_to_none=True)
            fwd, bwd = fns[v]
            return (lambda: fwd(q, t)), bwd
        return step
    return {v: make(v) for v in fns}


def gc_sweep_rank(rank, world, spec, out_path):
    device = _rank_device(rank, spec)
    payload = {"correctness": None, "timing": {}}
    first = _rank_sizes(spec["batches"][0], world)
    _say(rank, f"  correctness: plain vs GradCache parameter gradients under DDP, global batch {spec['batches'][0]}:")
    try:
        check = _gc_check(rank, world, spec, device, first)
    except Exception as exc:  # noqa: BLE001
        check = {"passed": False, "error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc(limit=6)}
        _say(rank, f"    FAILED: {check['error']}")
    payload["correctness"] = check
    if rank == 0:
        _write(out_path, payload)
    if not check["passed"]:
        _say(rank, "    GradCache FAILED the gradient check: no timing")
        return
    model, loss_fn = _gc_setup(rank, world, spec, device)
    fns = {v: _gc_step_fns(v, model, loss_fn, spec["chunk"]) for v in GC_VARIANTS}
    for gb in spec["batches"]:
        sizes = _rank_sizes(gb, world)
        inputs = [_gc_inputs(sizes[rank], spec["in_dim"], seed=spec["seed"] + gb + 31 * rank + 1000 * k, device=device)
                  for k in range(2)]
        _say(rank, f"  timing global batch {gb} (per rank {sizes}, chunk {spec['chunk']}): plain, gradcache interleaved")
        res = _interleaved(GC_VARIANTS, _gc_steps(fns, inputs, model), device,
                           warmup=spec["warmup"], repeats=spec["repeats"], rank=rank, tag=f"batch={gb}")
        payload["timing"][str(gb)] = {"per_rank_batch": sizes, "variants": res}
        inputs.clear()
        model.zero_grad(set_to_none=True)
        gc.collect()
        if rank == 0:
            _write(out_path, payload)


def gc_memory_rank(rank, world, spec, out_path):
    device = _rank_device(rank, spec)
    model, loss_fn = _gc_setup(rank, world, spec, device)
    fwd, bwd = _gc_step_fns(spec["variant"], model, loss_fn, spec["chunk"])
    # warm-up: one step at one chunk per rank (libraries, DDP's first-iteration work)
    wq, wt = _gc_inputs(min(spec["chunk"], 64), spec["in_dim"], seed=5 + rank, device=device)
    loss = fwd(wq, wt)
    if bwd is not None:
        bwd(loss)
    del loss, wq, wt
    model.zero_grad(set_to_none=True)
    sizes = _rank_sizes(spec["batch"], world)
    q, t = _gc_inputs(sizes[rank], spec["in_dim"], seed=spec["seed"] + spec["batch"] + 31 * rank, device=device)
    rec = _measure_memory(lambda: fwd(q, t), bwd, device)
    rec["includes"] = "activations, embeddings, loss temporaries, gathers, and the parameter gradients (set to None before)"
    allr = _gather_memory(rec, rank)
    if rank == 0:
        _write(out_path, {"per_rank": allr, "per_rank_batch": sizes})


# --------------------------------------------------------------------------- parent side


def run_ranks(fn, world, spec, comm, *, read_partial=True):
    """spawn_ranks(fn, world, spec, out) in fresh processes; returns (rank 0's JSON or None, error)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        err = None
        try:
            spawn_ranks(fn, world, spec, out, backend=comm)
        except Exception as exc:  # noqa: BLE001 - recorded, the sweep goes on
            msg = str(exc).strip().splitlines()
            tail = [m for m in msg if m.strip()][-3:]
            err = f"{type(exc).__name__}: {' | '.join(tail)}"
        payload = None
        if os.path.exists(out) and (err is None or read_partial):
            with open(out) as f:
                payload = json.load(f)
    return payload, err


def memory_summary(payload, err) -> dict:
    if payload is None:
        return {"status": "ERROR", "error": err or "no result"}
    per = payload["per_rank"]
    peak = max(r["peak_bytes"] for r in per)
    return {"status": "ok" if err is None else "ERROR", "error": err,
            "peak_bytes_max_over_ranks": peak,
            "peak_bytes_per_rank": [r["peak_bytes"] for r in per],
            "baseline_clean_all_ranks": all(r.get("baseline_clean", True) for r in per),
            "per_rank": per}


def loss_sweep(args, comm, threads, fused, device) -> dict:
    spec = dict(comm=comm, threads=threads, fused=fused, alpha=args.alpha, scale=args.logit_scale, d=args.d,
                N=sorted(args.N), repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    print(f"\n[loss] {args.world} ranks ({comm}, {threads} thread(s) each), fp32, d={args.d}, "
          f"global N {spec['N']}, symmetric, alpha {args.alpha:g}, logit_scale {args.logit_scale:g}; "
          f"fused backend {fused!r}", flush=True)
    t0 = time.perf_counter()
    payload, err = run_ranks(loss_sweep_rank, args.world, spec, comm)
    out = {"spec": spec, "error": err, "correctness": None, "timing": {}, "memory": {},
           "wall_s_timing": time.perf_counter() - t0}
    if err:
        print(f"  ERROR in the check/timing processes: {err}", flush=True)
    if payload is None:
        return out
    out["correctness"] = payload["correctness"]
    out["timing"] = payload["timing"]
    passed = (payload["correctness"] or {}).get("passed", {})
    _memory_sweep(out, args.world, comm, spec, "N", spec["N"], LOSS_VARIANTS, lambda v: passed.get(v),
                  loss_memory_rank)
    return out


def _memory_sweep(out, world, comm, spec, key, sizes, variants, ok, rank_fn) -> None:
    """Peak memory of every (size, variant) in fresh processes; a variant that failed its check gets none."""
    t1 = time.perf_counter()
    for size in sizes:
        for v in variants:
            if not ok(v):
                out["memory"].setdefault(str(size), {})[v] = {"status": "FAILED"}
                continue
            print(f"  memory {key}={size} {v}: fresh processes ...", end="", flush=True)
            mp, merr = run_ranks(rank_fn, world, dict(spec, **{key: size}, variant=v), comm, read_partial=False)
            rec = memory_summary(mp, merr)
            out["memory"].setdefault(str(size), {})[v] = rec
            if rec["status"] == "ok":
                print(f" peak {rec['peak_bytes_max_over_ranks'] / C.MiB:.1f} MiB (max over ranks; per rank "
                      f"{', '.join(f'{b / C.MiB:.1f}' for b in rec['peak_bytes_per_rank'])})"
                      + ("" if rec["baseline_clean_all_ranks"] else " [baseline not clean]"), flush=True)
            else:
                print(f" ERROR {rec['error']}", flush=True)
    out["wall_s_memory"] = time.perf_counter() - t1


def gc_sweep(args, comm, threads, fused, device) -> dict:
    spec = dict(comm=comm, threads=threads, fused=fused, alpha=args.alpha, scale=args.logit_scale,
                batches=sorted(args.batches), chunk=args.chunk, in_dim=args.in_dim, hidden=args.hidden,
                emb_dim=args.emb_dim, repeats=args.repeats, warmup=args.warmup, seed=args.seed)
    n_params = sum(p.numel() for p in MLPEncoder(args.in_dim, args.hidden, args.emb_dim).parameters())
    print(f"\n[gradcache] {args.world} ranks ({comm}, {threads} thread(s) each), DDP MLP encoder "
          f"{args.in_dim}-{args.hidden}-{args.hidden}-{args.emb_dim} ({n_params / 1e6:.2f} M parameters), "
          f"global batch {spec['batches']}, chunk {args.chunk}, FusedHardnessLoss(local_loss=True, "
          f"gather_with_grad=True, backend={fused!r})", flush=True)
    t0 = time.perf_counter()
    payload, err = run_ranks(gc_sweep_rank, args.world, spec, comm)
    out = {"spec": spec, "n_params": n_params, "error": err, "correctness": None, "timing": {}, "memory": {},
           "wall_s_timing": time.perf_counter() - t0}
    if err:
        print(f"  ERROR in the check/timing processes: {err}", flush=True)
    if payload is None:
        return out
    out["correctness"] = payload["correctness"]
    out["timing"] = payload["timing"]
    ok = bool((payload["correctness"] or {}).get("passed"))
    _memory_sweep(out, args.world, comm, spec, "batch", spec["batches"], GC_VARIANTS, lambda v: ok, gc_memory_rank)
    return out


# --------------------------------------------------------------------------- report


def _cell(res, key, v):
    """(status, median step ms, min, max, peak bytes, clean) of one variant at one size."""
    tm = res["timing"].get(str(key), {}).get("variants", {}).get(v)
    mem = res["memory"].get(str(key), {}).get(v, {})
    passed = True
    if "N" in res["spec"]:
        passed = bool(((res.get("correctness") or {}).get("passed") or {}).get(v))
    else:
        passed = bool((res.get("correctness") or {}).get("passed"))
    if not passed:
        return {"status": "FAILED"}
    if tm is None or tm.get("median_step_ms") is None:
        return {"status": "ERROR" if res.get("error") else "n/a"}
    status = "ok" if tm["finite"] else "NONFINITE"
    peak = mem.get("peak_bytes_max_over_ranks") if mem.get("status") == "ok" else None
    return {"status": status, "ms": tm["median_step_ms"], "min": tm["min_step_ms"], "max": tm["max_step_ms"],
            "peak": peak, "clean": mem.get("baseline_clean_all_ranks", True), "mem_status": mem.get("status")}


def _ratio(a, b):
    return a / b if (a is not None and b) else None


def _print_rows(cols, rows):
    widths = [max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(cols)]
    line = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    print(line)
    print("-" * len(line))
    for r in rows:
        print("  ".join(x.rjust(w) for x, w in zip(r, widths)))


def _mib(b, clean=True):
    return "-" if b is None else C.fmt(b / C.MiB) + ("" if clean else "*")


def report_loss(res, args, comm, threads) -> dict:
    spec = res["spec"]
    print(f"\nLoss across {args.world} ranks ({comm}, {threads} thread(s)/rank), fp32, d={spec['d']}, symmetric, "
          f"alpha {spec['alpha']:g}, logit_scale {spec['scale']:g}; step = forward+backward, time = max over ranks "
          f"per call, median of {spec['repeats']} interleaved runs; peak = max over ranks of one call's peak memory "
          f"in fresh processes")
    print("  strip: fused strip algorithm (1+3 GEMM-equivalents/rank); two-strip: fused, two one-way strips "
          "averaged (2x(1+3)); eager: backend='reference', LLaVE's gather-with-grad path (2+4)")
    cols = ["N", "B/rank", "variant", "status", "step ms", "min..max ms", "peak MiB"]
    rows = []
    table = {}
    for N in spec["N"]:
        sizes = _rank_sizes(N, args.world)
        for v in LOSS_VARIANTS:
            c = _cell(res, N, v)
            table[(N, v)] = c
            if c["status"] == "ok":
                rows.append([str(N), "/".join(map(str, sorted(set(sizes)))), v, "ok", C.fmt(c["ms"]),
                             f"{C.fmt(c['min'])}..{C.fmt(c['max'])}", _mib(c["peak"], c["clean"])])
            else:
                rows.append([str(N), "/".join(map(str, sorted(set(sizes)))), v, c["status"], "-", "-", "-"])
    _print_rows(cols, rows)
    if any(c.get("clean") is False for c in table.values()):
        print("  * the peak mark was above the RSS right after the reset: that figure may be off")
    ratios = []
    print("\nRatios (same run; < 1: the strip algorithm is faster / leaner)")
    cols = ["N", "strip/two-strip time", "strip/two-strip mem", "strip/eager time", "strip/eager mem"]
    rows = []
    for N in spec["N"]:
        s, t2, e = table[(N, "strip")], table[(N, "two-strip")], table[(N, "eager")]
        r = {"N": N,
             "strip_over_two_strip_time": _ratio(s.get("ms"), t2.get("ms")),
             "strip_over_two_strip_mem": _ratio(s.get("peak"), t2.get("peak")),
             "strip_over_eager_time": _ratio(s.get("ms"), e.get("ms")),
             "strip_over_eager_mem": _ratio(s.get("peak"), e.get("peak")),
             "two_strip_over_eager_time": _ratio(t2.get("ms"), e.get("ms")),
             "two_strip_over_eager_mem": _ratio(t2.get("peak"), e.get("peak"))}
        ratios.append(r)
        rows.append([str(N)] + [C.fmt(r[k], ".3f") for k in ("strip_over_two_strip_time", "strip_over_two_strip_mem",
                                                             "strip_over_eager_time", "strip_over_eager_mem")])
    _print_rows(cols, rows)
    Nmax = max(spec["N"])
    x = ratios[-1]["strip_over_two_strip_time"]
    check = {"N": Nmax, "ratio": x, "expected_max": STRIP_VS_TWO_STRIP_MAX,
             "pass": None if x is None else bool(x <= STRIP_VS_TWO_STRIP_MAX)}
    if x is None:
        print(f"\nstrip / two-strip time at N={Nmax} = n/a (a side FAILED or errored) (expected <= "
              f"{STRIP_VS_TWO_STRIP_MAX}) FAIL")
    else:
        print(f"\nstrip / two-strip time = {x:.3f} (expected <= {STRIP_VS_TWO_STRIP_MAX}) "
              f"{'PASS' if check['pass'] else 'FAIL'}   [N={Nmax}]")
    return {"table": {f"{N}/{v}": c for (N, v), c in table.items()}, "ratios": ratios, "expected_check": check}


def report_gc(res, args, comm, threads) -> dict:
    spec = res["spec"]
    print(f"\nGradCache vs plain step across {args.world} ranks ({comm}, {threads} thread(s)/rank), DDP MLP "
          f"{spec['in_dim']}-{spec['hidden']}-{spec['hidden']}-{spec['emb_dim']}, chunk {spec['chunk']}; step = "
          f"forward + loss + backward incl. DDP's gradient all-reduce (no optimizer); time = max over ranks, median "
          f"of {spec['repeats']}; peak = max over ranks, fresh processes (parameter gradients included)")
    cols = ["global batch", "per rank", "chunks/rank", "variant", "status", "step ms", "min..max ms", "peak MiB"]
    rows, table = [], {}
    for gb in spec["batches"]:
        sizes = _rank_sizes(gb, args.world)
        for v in GC_VARIANTS:
            c = _cell(res, gb, v)
            table[(gb, v)] = c
            nch = str(math.ceil(max(sizes) / spec["chunk"])) if v == "gradcache" else "-"
            per = "/".join(map(str, sorted(set(sizes))))
            if c["status"] == "ok":
                rows.append([str(gb), per, nch, v, "ok", C.fmt(c["ms"]), f"{C.fmt(c['min'])}..{C.fmt(c['max'])}",
                             _mib(c["peak"], c["clean"])])
            else:
                rows.append([str(gb), per, nch, v, c["status"], "-", "-", "-"])
    _print_rows(cols, rows)
    if any(c.get("clean") is False for c in table.values()):
        print("  * the peak mark was above the RSS right after the reset: that figure may be off")
    print(f"\nRatios gradcache / plain (same run; expected time <= {GC_VS_PLAIN_MAX} where the plain step fits in memory)")
    cols = ["global batch", "time ratio", "memory ratio", f"time <= {GC_VS_PLAIN_MAX}"]
    rows, ratios = [], []
    for gb in spec["batches"]:
        g, p = table[(gb, "gradcache")], table[(gb, "plain")]
        r = {"batch": gb, "gradcache_over_plain_time": _ratio(g.get("ms"), p.get("ms")),
             "gradcache_over_plain_mem": _ratio(g.get("peak"), p.get("peak"))}
        r["time_pass"] = None if r["gradcache_over_plain_time"] is None else bool(
            r["gradcache_over_plain_time"] <= GC_VS_PLAIN_MAX)
        ratios.append(r)
        rows.append([str(gb), C.fmt(r["gradcache_over_plain_time"], ".3f"), C.fmt(r["gradcache_over_plain_mem"], ".3f"),
                     "-" if r["time_pass"] is None else ("PASS" if r["time_pass"] else "FAIL")])
    _print_rows(cols, rows)
    lo, hi = min(spec["batches"]), max(spec["batches"])
    growth = {}
    if lo != hi:
        print(f"\nMemory growth from global batch {lo} to {hi} (batch x{hi / lo:g}):")
        for v in GC_VARIANTS:
            a, b = table[(lo, v)].get("peak"), table[(hi, v)].get("peak")
            gf = _ratio(b, a)
            growth[v] = {"from": lo, "to": hi, "batch_factor": hi / lo, "peak_from_bytes": a, "peak_to_bytes": b,
                         "growth_factor": gf}
            print(f"  {v:<9} {_mib(a)} MiB -> {_mib(b)} MiB: x{C.fmt(gf, '.2f')}")
        gfg, gfp = growth["gradcache"]["growth_factor"], growth["plain"]["growth_factor"]
        if gfg is not None and gfp is not None:
            flat = gfg <= 1.5
            print(f"  gradcache's peak memory {'stays nearly flat' if flat else 'does NOT stay flat'} "
                  f"(x{gfg:.2f} for x{hi / lo:g} the batch) while the plain step's grows x{gfp:.2f}")
            growth["gradcache_nearly_flat"] = bool(flat)
    timed = [r["time_pass"] for r in ratios if r["time_pass"] is not None]
    summary = {"expected_max": GC_VS_PLAIN_MAX, "all_pass": (all(timed) if timed else None),
               "max_ratio": max((r["gradcache_over_plain_time"] for r in ratios
                                 if r["gradcache_over_plain_time"] is not None), default=None)}
    if timed:
        print(f"gradcache / plain time <= {GC_VS_PLAIN_MAX} at every batch: "
              f"{'PASS' if summary['all_pass'] else 'FAIL'} (max {summary['max_ratio']:.3f})")
    return {"table": {f"{gb}/{v}": c for (gb, v), c in table.items()}, "ratios": ratios, "memory_growth": growth,
            "expected_check": summary}


# --------------------------------------------------------------------------- main


def default_out(device: torch.device) -> Path:
    """benchmarks/results/<device-slug>/<YYYY-MM-DD>-distributed.json (then _2, _3 ...)."""
    folder = C.REPO_ROOT / "benchmarks" / "results" / C.slugify(C.device_name(device))
    date = C.now_stamps()["date"]
    path = folder / f"{date}-distributed.json"
    n = 2
    while path.exists():
        path = folder / f"{date}-distributed_{n}.json"
        n += 1
    return path


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=int, default=2, help="ranks (processes on this machine); default 2")
    p.add_argument("--N", nargs="+", type=int, default=None,
                   help="global loss batch sizes (each rank B = N / world); default CPU 2048 4096 8192")
    p.add_argument("--d", type=int, default=None, help="loss embedding width; default 512")
    p.add_argument("--batches", nargs="+", type=int, default=None,
                   help="global GradCache batch sizes; default CPU 512 2048 8192")
    p.add_argument("--chunk", type=int, default=None, help="GradCache chunk size; default 256")
    p.add_argument("--repeats", type=int, default=None, help="timed runs per point (median); default 3")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant first; default 1")
    p.add_argument("--quick", action="store_true", help="tiny sizes, a smoke test (< 60 s on 2 cores)")
    p.add_argument("--out", type=Path, default=None,
                   help="JSON path; default benchmarks/results/<device-slug>/<date>-distributed.json")
    p.add_argument("--skip-loss", action="store_true", help="skip the loss sweep")
    p.add_argument("--skip-gradcache", action="store_true", help="skip the GradCache sweep")
    p.add_argument("--comm", choices=("auto", "gloo", "nccl"), default="auto",
                   help="auto: NCCL when CUDA has a GPU per rank, else gloo on CPU")
    p.add_argument("--threads", type=int, default=None, help="torch threads per rank; default max(1, cores // world)")
    p.add_argument("--in-dim", type=int, default=256, help="MLP input width")
    p.add_argument("--hidden", type=int, default=None, help="MLP hidden width; default 2048")
    p.add_argument("--emb-dim", type=int, default=256, help="MLP output (embedding) width")
    p.add_argument("--alpha", type=float, default=9.0)
    p.add_argument("--logit-scale", type=float, default=50.0)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.world < 1:
        raise SystemExit("--world must be >= 1")
    comm = args.comm
    if comm == "auto":
        comm = "nccl" if (torch.cuda.is_available() and torch.cuda.device_count() >= args.world) else "gloo"
    if comm == "nccl" and not (torch.cuda.is_available() and torch.cuda.device_count() >= args.world):
        raise SystemExit(f"--comm nccl needs one GPU per rank: {args.world} ranks, "
                         f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s)")
    cuda = comm == "nccl"
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    fused = "triton" if cuda else "torch"
    cores = C.usable_cores()
    threads = args.threads or max(1, cores // args.world)
    if args.quick:
        # one loss size: every (variant, size) memory figure costs a fresh process group
        args.N = args.N or ([1024] if not cuda else [8192])
        args.d = args.d or (64 if not cuda else 512)
        args.batches = args.batches or [64, 128]
        args.chunk = args.chunk or 32
        args.hidden = args.hidden or 128
        args.repeats = args.repeats or 2
    args.N = args.N or ([2048, 4096, 8192] if not cuda else [8192, 16384, 32768])
    args.d = args.d or 512
    args.batches = args.batches or ([512, 2048, 8192] if not cuda else [2048, 8192, 32768])
    args.chunk = args.chunk or 256
    args.hidden = args.hidden or 2048
    args.repeats = args.repeats or (3 if not cuda else 10)
    if min(args.N) < args.world or min(args.batches) < args.world:
        raise SystemExit("every N and batch must give each rank at least one row")
    if args.repeats < 1 or args.warmup < 0 or args.chunk < 1:
        raise SystemExit("--repeats and --chunk must be >= 1, --warmup >= 0")
    if comm == "gloo" and torch.cuda.is_available():
        print(f"note: {torch.cuda.device_count()} GPU(s) for {args.world} ranks: NCCL needs one per rank, "
              "so this run uses gloo on the CPU")

    t_begin = time.perf_counter()
    meta = {"device": C.device_info(device), "versions": C.versions(), "git": C.git_info(), **C.now_stamps(),
            "world": args.world, "comm_backend": comm, "threads_per_rank": threads, "usable_cores": cores,
            "machine_load_before": C.machine_load()}
    print(f"llave-fast distributed benchmark on {meta['device']['name']}: {args.world} ranks, {comm}, "
          f"{threads} thread(s)/rank; torch {meta['versions']['torch']}, python {meta['versions']['python']}; "
          f"commit {str(meta['git']['commit'])[:12]}{' (dirty)' if meta['git'].get('dirty') else ''}")
    busy = meta["machine_load_before"].get("busy_fraction_others")
    if busy is not None and busy > 0.1:
        print(f"WARNING: other processes keep {busy:.0%} of the CPUs busy (loadavg "
              f"{meta['machine_load_before'].get('loadavg')}): timings will be noisy and slower")

    loss_res = gc_res = loss_rep = gc_rep = None
    if not args.skip_loss:
        loss_res = loss_sweep(args, comm, threads, fused, device)
        loss_rep = report_loss(loss_res, args, comm, threads)
    if not args.skip_gradcache:
        gc_res = gc_sweep(args, comm, threads, fused, device)
        gc_rep = report_gc(gc_res, args, comm, threads)

    meta["machine_load_after"] = C.machine_load()
    la = meta["machine_load_after"].get("busy_fraction_others")
    if la is not None and busy is not None:
        print(f"\nmachine load by other processes: {busy:.0%} before the run, {la:.0%} after "
              "(sampled 1 s each; > 10% means the timings above were disturbed)")
    out = Path(args.out) if args.out else default_out(device)
    out.parent.mkdir(parents=True, exist_ok=True)
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config.update(comm_resolved=comm, fused_backend=fused, threads_per_rank=threads, loss_gemms=LOSS_GEMMS,
                  loss_check_case=LOSS_CHECK, gradcache_check_tol=GC_CHECK_TOL,
                  timing="per call: dist.barrier, then time.perf_counter around forward+backward (CUDA: synchronize); "
                         "step time = all_reduce MAX over ranks; median over repeats; warm-up excluded; variants "
                         "interleaved (ABBA); 2 input sets rotated",
                  memory="each (variant, size) in fresh spawn_ranks processes after a small warm-up; CPU: "
                         "reset_rss_peak() right before the call, VmHWM after - VmRSS before, max over ranks; "
                         "CUDA: max_memory_allocated - memory_allocated before")
    payload = {"schema": 1, "kind": "distributed", "meta": meta, "config": config,
               "correctness": {"loss": loss_res and loss_res.get("correctness"),
                               "gradcache": gc_res and gc_res.get("correctness")},
               "loss": loss_res, "gradcache": gc_res,
               "ratios": {"loss": loss_rep and loss_rep["ratios"], "gradcache": gc_rep and gc_rep["ratios"],
                          "gradcache_memory_growth": gc_rep and gc_rep["memory_growth"]},
               "expected_checks": {"strip_over_two_strip_time": loss_rep and loss_rep["expected_check"],
                                   "gradcache_over_plain_time": gc_rep and gc_rep["expected_check"]},
               "total_wall_s": time.perf_counter() - t_begin}
    with open(out, "w") as f:
        json.dump(payload, f, indent=1, default=str)
    print(f"\nresults written to {out}")
    print(f"total wall time {time.perf_counter() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
