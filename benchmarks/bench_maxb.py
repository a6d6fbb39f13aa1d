#!/usr/bin/env python3
"""The largest B = N each backend runs (one forward + backward) without running out of memory.

    python benchmarks/bench_maxb.py --d 1536 --dtype bf16 --out maxb.json

Per backend: an untimed warm-up try at --warmup-B (compiles stay out of the timed tries), then B
doubles from --start until a try runs out of device memory, and --bisect-steps halvings of the
gap (multiples of 1024) narrow it. A try predicted (time ~ B^2) to take longer than --max-try-s
is not made: the answer is then "at least B, stopped by time". Each try: one fwd+bwd on fresh
random inputs, wall time around a synchronize, peak from torch.cuda.max_memory_allocated. The
JSON is rewritten after each backend; SIGINT writes the tries made so far.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import psutil  # noqa: E402
import torch  # noqa: E402

import _common as C  # noqa: E402
from bench_loss import backend_available, make_loss_fn  # noqa: E402

GRAIN = 1024


def one_try(name, B, d, dtype, device, args) -> dict:
    """One fwd+bwd at B = N: {"B", "ok", "oom", "s" (wall seconds), "peak_bytes" (CUDA)}."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rec, q, t, loss = {"B": B}, None, None, None
    try:
        fn = make_loss_fn(name, alpha=0.0 if name == "inf_cl" else args.alpha, scale=args.logit_scale,
                          symmetric=True, deterministic=False, d=d)
        (q, t), = C.make_pairs(1, B, d, dtype=dtype, device=device, seed=B)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        C.sync(device)
        t0 = time.perf_counter()
        loss = fn(q, t)
        loss.backward()
        C.sync(device)
        finite = bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(q.grad).all())
        rec.update(s=time.perf_counter() - t0, ok=finite, oom=False, loss=float(loss.detach()))
        if not finite:
            rec["error"] = "non-finite loss or gradient"
        if device.type == "cuda":
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    except Exception as exc:  # noqa: BLE001 - out of memory is the expected end of a search; others reported
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
        rec.update(ok=False, oom=oom, error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    del q, t, loss
    free_memory(device)
    return rec


def free_memory(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def search(name, d, dtype, device, args, t_start, out: dict | None = None) -> dict:
    """The doubling / bisection search for one backend, recorded into ``out`` as it goes."""
    out = {} if out is None else out
    out.update(backend=name, tries=[])
    if args.warmup_B:
        w = out["warmup"] = one_try(name, min(args.warmup_B, args.start), d, dtype, device, args)
        if not w["ok"]:
            out.update(largest_ok_B=None, smallest_oom_B=None, limited_by=f"warm-up failed: {w.get('error')}")
            print(f"  {name}: warm-up at B={w['B']} failed: {w.get('error')}", flush=True)
            return out
    ok_B, bad_B, B, last_s, steps = None, None, args.start, None, 0
    while B is not None and B <= args.B_max and (bad_B is None or bad_B - ok_B > GRAIN):
        if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
            out["stopped"] = "deadline"
            break
        if bad_B is None and last_s is not None and last_s * (B / ok_B) ** 2 > args.max_try_s:
            out["stopped"] = (f"time: a try at B={B} would take ~{last_s * (B / ok_B) ** 2:.0f} s "
                              f"(> --max-try-s {args.max_try_s:g})")
            break
        steps += bad_B is not None  # a bisection step
        r = one_try(name, B, d, dtype, device, args)
        out["tries"].append(r)
        print(f"  {name} B=N={B}: " + (f"ok {r['s']:.2f} s, peak {r.get('peak_bytes', 0) / C.GiB:.1f} GiB" if r["ok"]
                                      else ("OOM" if r["oom"] else f"ERROR {r.get('error')}")), flush=True)
        if not (r["ok"] or r["oom"]):
            out["stopped"] = f"error at B={B}"
            break
        if r["ok"]:
            ok_B, last_s = B, r["s"]
        else:
            bad_B = B
        if bad_B is None:
            B *= 2
        elif ok_B is None or steps >= args.bisect_steps:
            B = None  # the first size ran out of memory, or the bisection steps are used up
        else:
            B = (ok_B + bad_B) // 2 // GRAIN * GRAIN
    out.update(largest_ok_B=ok_B, smallest_oom_B=bad_B,
               limited_by="memory" if bad_B is not None else out.get("stopped", f"--B-max {args.B_max}"))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["triton", "triton_strip", "torch", "reference", "inf_cl"])
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--B-max", type=int, default=1 << 21)
    p.add_argument("--bisect-steps", type=int, default=2)
    p.add_argument("--warmup-B", type=int, default=4096, help="an untimed try at this B first (0: none)")
    p.add_argument("--max-try-s", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=9.0)
    p.add_argument("--logit-scale", type=float, default=50.0)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: a dry run with small sizes")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    C.start_script()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_maxb.py: no CUDA device (dry run: use --device cpu with small sizes)")
        return 0
    device = torch.device("cpu") if args.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    dtype, t_start = C.DTYPES[args.dtype], time.perf_counter()
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else psutil.virtual_memory().available
    res = {"meta": {**C.run_meta(device), "free_bytes_at_start": free}, "backends": [],
           "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    print(f"largest B = N at d={args.d} {args.dtype} on {res['meta']['device']['name']} ({free / C.GiB:.1f} GiB free)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.backends:
            ok, why = backend_available(name, device)
            if not ok:
                res["backends"].append({"backend": name, "status": "SKIPPED", "why": why})
                print(f"{name}: skipped ({why})")
                continue
            print(f"{name}:")
            res["backends"].append({})  # filled as the search goes: an interrupted search keeps its tries
            search(name, args.d, dtype, device, args, t_start, out=res["backends"][-1])
            args.out.write_text(json.dumps(res, indent=1, default=str))
    except KeyboardInterrupt as exc:
        res["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"INTERRUPTED ({res['interrupted']}): writing the tries made so far", flush=True)
        for r in res["backends"]:
            if r.get("status") != "SKIPPED" and "limited_by" not in r:
                ok_tries = [t["B"] for t in r.get("tries", []) if t.get("ok")]
                r.update(largest_ok_B=max(ok_tries, default=None), smallest_oom_B=None, limited_by="interrupted")
    res["total_wall_s"] = time.perf_counter() - t_start
    args.out.write_text(json.dumps(res, indent=1, default=str))
    from report import maxb_table

    print("\n".join(maxb_table(res)) + f"\nwritten to {args.out}")
    return 130 if "interrupted" in res else 0


if __name__ == "__main__":
    sys.exit(main())
