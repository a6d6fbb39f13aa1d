#!/usr/bin/env python3
"""The largest B = N each backend runs (one forward + backward) without running out of memory.

    python benchmarks/bench_maxb.py --d 1536 --dtype bf16 --out maxb.json

Per backend: B doubles from --start until a try runs out of device memory, then
--bisect-steps halvings of the gap (multiples of 1024) narrow it. A try that would take
longer than --max-try-s (predicted from the last try, time growing as B^2) is not made: the
answer is then "at least B, stopped by time, not memory", with the analytic memory model's
estimate of where memory would run out. Each try is one fwd+bwd on fresh random inputs
(never zeros), wall time around a synchronize, peak memory from torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from bench_loss import analytic_peak_bytes, backend_available, make_loss_fn  # noqa: E402

GRAIN = 1024


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def one_try(name, B, d, dtype, device, args) -> dict:
    """One fwd+bwd at B = N; {"ok": bool, "oom": bool, "s": wall seconds, "peak_bytes"}."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    rec = {"B": B}
    q = t = loss = None
    try:
        alpha = 0.0 if name == "inf_cl" else args.alpha
        fn = make_loss_fn(name, alpha=alpha, scale=args.logit_scale, symmetric=True, deterministic=False, d=d)
        g = torch.Generator(device=device).manual_seed(B)
        q = torch.nn.functional.normalize(torch.randn(B, d, device=device, generator=g), dim=1).to(dtype)
        t = torch.nn.functional.normalize(q.float() + torch.randn(B, d, device=device, generator=g), dim=1)
        t = t.to(dtype)
        q.requires_grad_(True)
        t.requires_grad_(True)
        base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        C.sync(device)
        t0 = time.perf_counter()
        loss = fn(q, t)
        loss.backward()
        C.sync(device)
        rec["s"] = time.perf_counter() - t0
        finite = bool(torch.isfinite(loss.detach())) and bool(torch.isfinite(q.grad).all())
        rec.update(ok=finite, oom=False, loss=float(loss.detach()))
        if not finite:
            rec["error"] = "non-finite loss or gradient"
        if device.type == "cuda":
            rec["peak_bytes"] = torch.cuda.max_memory_allocated(device) - base
    except Exception as exc:  # noqa: BLE001 - OOM is the expected way a try ends; others are reported
        rec.update(ok=False, oom=is_oom(exc), error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
    finally:
        del q, t, loss
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rec


def model_max_B(name, d, dtype, device, free_bytes) -> int | None:
    """Largest B (multiple of GRAIN) whose analytic peak plus inputs and gradients fits in free memory."""
    es = torch.empty((), dtype=dtype).element_size()

    def need(B):
        m = analytic_peak_bytes(name, B, B, d, dtype, True, device)
        return None if m is None else m + 4 * B * d * es

    if need(GRAIN) is None:
        return None
    lo, hi = GRAIN, GRAIN
    while need(hi) <= free_bytes and hi < (1 << 26):
        lo, hi = hi, hi * 2
    while hi - lo > GRAIN:
        mid = (lo + hi) // 2 // GRAIN * GRAIN
        lo, hi = (mid, hi) if need(mid) <= free_bytes else (lo, mid)
    return lo


def search(name, d, dtype, device, args, t_start, out: dict | None = None) -> dict:
    """The doubling / bisection search for one backend, recorded into ``out`` as it goes (the
    caller keeps the tries made so far if the search is interrupted)."""
    out = {} if out is None else out
    out.update(backend=name, tries=[])
    if args.warmup_B:
        # compile / autotune / library start-up stay out of the timed tries (the time cap uses them)
        w = one_try(name, min(args.warmup_B, args.start), d, dtype, device, args)
        out["warmup"] = w
        if not w["ok"]:
            out.update(largest_ok_B=None, smallest_oom_B=None, limited_by=f"warm-up failed: {w.get('error')}")
            print(f"  {name}: warm-up at B={w['B']} failed: {w.get('error')}", flush=True)
            return out
    ok_B, bad_B, B, last_s = None, None, args.start, None
    while B <= args.B_max:
        if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
            out["stopped"] = "deadline"
            break
        if last_s is not None and ok_B and last_s * (B / ok_B) ** 2 > args.max_try_s:
            out["stopped"] = (f"time: a try at B={B} would take ~{last_s * (B / ok_B) ** 2:.0f} s "
                              f"(> --max-try-s {args.max_try_s:g})")
            break
        r = one_try(name, B, d, dtype, device, args)
        out["tries"].append(r)
        print(f"  {name} B=N={B}: " + (f"ok {r['s']:.2f} s, peak {r.get('peak_bytes', 0) / C.GiB:.1f} GiB" if r["ok"]
                                      else ("OOM" if r["oom"] else f"ERROR {r.get('error')}")), flush=True)
        if r["ok"]:
            ok_B, last_s = B, r["s"]
            if bad_B is None:
                B *= 2
            else:
                break
        elif r["oom"]:
            bad_B = B
            break
        else:
            out["stopped"] = f"error at B={B}"
            break
    # narrow the gap between the last success and the first OOM
    steps = 0
    while ok_B is not None and bad_B is not None and steps < args.bisect_steps and bad_B - ok_B > GRAIN:
        if args.deadline_s is not None and time.perf_counter() - t_start > args.deadline_s:
            out["stopped"] = "deadline"
            break
        mid = (ok_B + bad_B) // 2 // GRAIN * GRAIN
        r = one_try(name, mid, d, dtype, device, args)
        out["tries"].append(r)
        print(f"  {name} B=N={mid}: " + (f"ok {r['s']:.2f} s" if r["ok"] else ("OOM" if r["oom"] else "ERROR")),
              flush=True)
        if r["ok"]:
            ok_B = mid
        elif r["oom"]:
            bad_B = mid
        else:
            break
        steps += 1
    out["largest_ok_B"] = ok_B
    out["smallest_oom_B"] = bad_B
    out["limited_by"] = "memory" if bad_B is not None else out.get("stopped", f"--B-max {args.B_max}")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backends", nargs="+", default=["triton_strip", "triton_tiles", "torch", "reference", "inf_cl"])
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--start", type=int, default=16384)
    p.add_argument("--B-max", type=int, default=1 << 21)
    p.add_argument("--bisect-steps", type=int, default=2)
    p.add_argument("--warmup-B", type=int, default=4096,
                   help="an untimed try at this B first (0: none), so that compiling is not timed")
    p.add_argument("--max-try-s", type=float, default=20.0)
    p.add_argument("--alpha", type=float, default=9.0)
    p.add_argument("--logit-scale", type=float, default=50.0)
    p.add_argument("--deadline-s", type=float, default=None)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: a dry run of the search logic with small --start/--B-max")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    C.start_script()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_maxb.py: no CUDA device (dry run: use --device cpu with small sizes)")
        return 0
    device = torch.device(args.device) if args.device == "cpu" else torch.device("cuda", torch.cuda.current_device())
    dtype = C.DTYPES[args.dtype]
    t_start = time.perf_counter()
    meta = {"device": C.device_info(device), "versions": C.versions(), "git": C.git_info(), **C.now_stamps()}
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else (C.mem_available_bytes() or 0)
    meta["free_bytes_at_start"] = free
    print(f"largest B = N at d={args.d} {args.dtype} on {meta['device']['name']} "
          f"({free / C.GiB:.1f} GiB free at start)")
    res = {"meta": meta, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "backends": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        for name in args.backends:
            ok, why = backend_available(name, device)
            if not ok:
                res["backends"].append({"backend": name, "status": "SKIPPED", "why": why})
                print(f"{name}: skipped ({why})")
                continue
            print(f"{name}:")
            r = {"model_max_B": model_max_B(name, args.d, dtype, device, free)}
            res["backends"].append(r)
            search(name, args.d, dtype, device, args, t_start, out=r)
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1, default=str)
    except KeyboardInterrupt as exc:
        res["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"INTERRUPTED ({res['interrupted']}): writing the tries made so far", flush=True)
        for r in res["backends"]:
            if r.get("status") != "SKIPPED" and "limited_by" not in r:
                ok_tries = [t["B"] for t in r.get("tries", []) if t.get("ok")]
                r.update(largest_ok_B=max(ok_tries) if ok_tries else None, smallest_oom_B=None,
                         limited_by="interrupted")
    print()
    print(f"{'backend':<14} {'largest ok B':>13} {'first OOM B':>12} {'model max B':>12}  limited by")
    for r in res["backends"]:
        if r.get("status") == "SKIPPED":
            print(f"{r['backend']:<14} {'-':>13} {'-':>12} {'-':>12}  skipped: {r['why']}")
            continue
        print(f"{r['backend']:<14} {str(r['largest_ok_B']):>13} {str(r['smallest_oom_B']):>12} "
              f"{str(r['model_max_B']):>12}  {r['limited_by']}")
    res["total_wall_s"] = time.perf_counter() - t_start
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1, default=str)
    print(f"written to {args.out}")
    return 130 if "interrupted" in res else 0


if __name__ == "__main__":
    sys.exit(main())
