#!/usr/bin/env python3
"""Tuning sweep of the Triton kernels at one problem size (CUDA).

    python benchmarks/bench_tune.py --B 16384 --d 1536 --dtype bf16 --out tune.json

Times the forward kernel under every forward candidate and the backward under every
backward candidate (the tile backward, its deterministic pair, and the strip backward,
each with several block sizes / warps / stages), all at the same inputs, and the GEMM
floor (``gemm3``: the three cuBLAS products) in the same run. Every candidate's outputs
are compared with the default configuration's before its time counts: a fast wrong
config is reported WRONG, not chosen. Medians of CUDA-event timings, inputs rotated
between two pairs so that repeats do not time the L2 cache.

Prints a table and the best forward + best backward against the default and the floor;
writes everything to --out (JSON). Predictions and outcomes go to benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from llave_fast.backends import triton_backend as tb  # noqa: E402
from llave_fast.backends.common import StripIds  # noqa: E402

# beyond the autotuner's lists: grid caps of the forward and strip sizes of the strip backward
EXTRA_FWD = [
    dict(GR_MAX=8, GC_MAX=66),
    dict(GR_MAX=32, GC_MAX=17),
    dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4),
]
EXTRA_BWD = [
    # strips instead of the default one strip (the whole dS fits DS_ONE_STRIP_BYTES at the
    # acceptance point): 64 MiB and 256 MiB strips, DS_MIN_ROWS off so that the bytes decide
    dict(BWD="strip", DS_ONE_STRIP_BYTES=0, DS_MIN_ROWS=0, DS_STRIP_BYTES=64 << 20),
    dict(BWD="strip", DS_ONE_STRIP_BYTES=0, DS_MIN_ROWS=0, DS_STRIP_BYTES=256 << 20),
    # an fp32 strip and fp32 GEMMs for 16-bit inputs (the fp16 path before its scaled fp16 strip)
    dict(BWD="strip", DS_LOWP=False),
    dict(BWD="tiles", BWD_BM=32, BWD_BN=64, BK=64, num_warps=4, num_stages=3),
]


def time_ms(fn, repeats: int, warmup: int = 1, device: torch.device = torch.device("cuda")):
    """(median ms, raw ms) of fn(i) for i = 1..repeats after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn(0)
    C.sync(device)
    raw = []
    for i in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn(i + 1)
            b.record()
            b.synchronize()
            raw.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn(i + 1)
            raw.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(raw), raw


def rel(x: torch.Tensor, ref: torch.Tensor) -> float:
    return C.rel_err(x.float(), ref.float())


def try_candidate(dest: list, rec: dict, cand: dict, body, what: str, err_name: str) -> None:
    """Run ``body()`` under ``kernel_config(**cand)``; record its figures, or the error of a
    config that does not compile or fit; print one line."""
    try:
        with tb.kernel_config(**cand):
            rec.update(body())
    except Exception as exc:  # noqa: BLE001 - reported, the sweep goes on
        rec.update(status="ERROR", error=f"{type(exc).__name__}: {str(exc)[:300]}")
    dest.append(rec)
    print(f"{what}: {rec['status']} "
          + (f"{rec['ms']:.3f} ms, {rec['tflops']:.0f} TFLOP/s, {err_name} {rec['err']:.1e}"
             if "ms" in rec else rec.get("error", "")), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--B", type=int, default=16384, help="B = N (default 16384)")
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default="bf16")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--alpha", type=float, default=9.0)
    p.add_argument("--logit-scale", type=float, default=50.0)
    p.add_argument("--deadline-s", type=float, default=None, help="stop starting new candidates after this")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--dry-run-cpu", action="store_true",
                   help="exercise the script on CPU tensors under TRITON_INTERPRET=1 with the interpreter's "
                        "small candidate lists (checks the logic, measures nothing useful)")
    args = p.parse_args(argv)
    C.start_script()
    cpu = args.dry_run_cpu
    if cpu and not tb.interpreter_active():
        raise SystemExit("--dry-run-cpu needs TRITON_INTERPRET=1 in the environment")
    if not cpu and not torch.cuda.is_available():
        print("bench_tune.py needs CUDA: nothing to tune here (use --dry-run-cpu to check the script)")
        return 0
    t_begin = time.perf_counter()
    dev = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    fwd_list = tb.FWD_CANDIDATES_CPU if cpu else tb.FWD_CANDIDATES_GPU + EXTRA_FWD
    bwd_list = tb.BWD_CANDIDATES_CPU if cpu else tb.BWD_CANDIDATES_GPU + EXTRA_BWD
    sms = 1 if cpu else torch.cuda.get_device_properties(dev).multi_processor_count
    dtype = C.DTYPES[args.dtype]
    B, d = args.B, args.d
    pairs = C.make_pairs(2, B, d, dtype=dtype, device=dev, seed=11)
    pairs = [(q.detach(), t.detach()) for q, t in pairs]
    ids = StripIds()
    kw = dict(n_col=B, offset=0, scale=args.logit_scale, alpha=args.alpha, ids=ids)
    meta = {"device": C.device_info(dev), "versions": C.versions(), "git": C.git_info(), **C.now_stamps()}
    print(f"tuning on {meta['device']['name']}: B=N={B} d={d} {args.dtype}, torch {meta['versions']['torch']}, "
          f"triton {meta['versions']['triton']}")
    one = 2.0 * B * B * d
    out = {"meta": meta, "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
           "default": tb.launch_config(dev, d, dtype), "gpu_default": tb.gpu_config(dtype, sms, D=d),
           "fwd": [], "bwd": []}

    def write():
        out["total_wall_s"] = time.perf_counter() - t_begin
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1, default=str)

    def late() -> bool:
        return args.deadline_s is not None and time.perf_counter() - t_begin > args.deadline_s

    # ---- reference outputs: the default configuration
    stats = [tb.strip_forward(q, t, need_col=True, need_e=False, **kw) for q, t in pairs]
    gen = torch.Generator(device=dev).manual_seed(5)
    g_row = torch.rand(B, device=dev, generator=gen) / B
    g_col = torch.rand(B, device=dev, generator=gen) / B
    pos = (g_row + g_col) * args.logit_scale  # the positive's coefficient, as the loss passes it
    bkw = [dict(kw, row_lse=s.row_lse, col_lse=s.col_lse, g_row=g_row, g_col=g_col, pos_coef=pos) for s in stats]
    dq_ref, dt_ref = tb.strip_backward(*pairs[0], deterministic=True, **bkw[0])

    # the default forward first, then every backward candidate (which backward is the decision
    # that matters most), then the other forward candidates: a deadline cuts the least useful
    fwd_first, fwd_rest = [dict()], fwd_list
    try:
        tune_candidates(out, fwd_first, fwd_rest, bwd_list, pairs, kw, bkw, stats, dq_ref, dt_ref, one, args,
                        dev, late, write)
    except KeyboardInterrupt as exc:
        out["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"INTERRUPTED ({out['interrupted']}): summarising the candidates timed so far", flush=True)
    if "interrupted" not in out:
        try:
            measure_floor(out, pairs, B, dtype, dev, gen, args)
        except KeyboardInterrupt as exc:
            out["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
    summarise(out)
    write()
    print(f"tuning results written to {args.out} ({time.perf_counter() - t_begin:.0f} s)")
    return 130 if "interrupted" in out else 0


def tune_candidates(out, fwd_first, fwd_rest, bwd_list, pairs, kw, bkw, stats, dq_ref, dt_ref, one, args, dev,
                    late, write):
    """Times the candidates in order: ``fwd_first``, every backward candidate, ``fwd_rest``.
    Each is checked against the default configuration's outputs first; results are written
    after each one."""

    def run_fwd(cand):
        if late():
            out["fwd"].append({"config": cand, "status": "SKIPPED (deadline)"})
            return

        def fwd_body():
            s0 = tb.strip_forward(*pairs[0], need_col=True, need_e=False, **kw)
            err = max(float((s0.row_lse - stats[0].row_lse).abs().max()),
                      float((s0.col_lse - stats[0].col_lse).abs().max()))
            ms, raw = time_ms(lambda i: tb.strip_forward(*pairs[i % 2], need_col=True, need_e=False, **kw),
                              args.repeats, device=dev)
            return dict(status="ok" if err < 5e-2 else "WRONG", err=err, ms=ms, raw_ms=raw, tflops=one / ms / 1e9)

        try_candidate(out["fwd"], {"config": cand}, cand, fwd_body, f"fwd {cand or 'default'}", "lse diff")
        write()

    def run_bwd(cand, det):
        if late():
            out["bwd"].append({"config": cand, "deterministic": det, "status": "SKIPPED (deadline)"})
            return

        def bwd_body():
            dq, dt = tb.strip_backward(*pairs[0], deterministic=det, **bkw[0])
            err = max(rel(dq, dq_ref), rel(dt, dt_ref))
            ms, raw = time_ms(lambda i: tb.strip_backward(*pairs[i % 2], deterministic=det, **bkw[i % 2]),
                              args.repeats, device=dev)
            variant = cand.get("BWD", out["default"]["BWD"])
            gemms = 3 if variant == "strip" or not det else 4
            return dict(status="ok" if err < 2e-2 else "WRONG", err=err, ms=ms, raw_ms=raw, variant=variant,
                        tflops=gemms * one / ms / 1e9, tflops_useful=2 * one / ms / 1e9)

        try_candidate(out["bwd"], {"config": cand, "deterministic": det}, cand, bwd_body,
                      f"bwd {cand or 'default'}{' deterministic' if det else ''}", "rel err vs default")
        write()

    for cand in fwd_first:
        run_fwd(cand)
    # backward candidates (non-deterministic and deterministic requests)
    bwd_cands = [(dict(), False), (dict(), True)] + [(c, False) for c in bwd_list]
    bwd_cands += [(dict(c), True) for c in bwd_list if c["BWD"] == "tiles"][:1]
    for cand, det in bwd_cands:
        run_bwd(cand, det)
    for cand in fwd_rest:
        run_fwd(cand)


def measure_floor(out, pairs, B, dtype, dev, gen, args):
    """The floor, same inputs: S = q T^T, dS T, dS^T q (cuBLAS)."""
    dS = (torch.randn(B, B, device=dev, generator=gen) * 1e-3).to(dtype) if B * B <= (1 << 30) else None
    if dS is None:
        return
    ms_s, _ = time_ms(lambda i: torch.mm(pairs[i % 2][0], pairs[i % 2][1].t()), args.repeats, device=dev)
    ms_b, _ = time_ms(lambda i: (torch.mm(dS, pairs[i % 2][1]), torch.mm(dS.t(), pairs[i % 2][0])),
                      args.repeats, device=dev)
    out["floor"] = {"S_ms": ms_s, "dq_dT_ms": ms_b, "three_gemms_ms": ms_s + ms_b}


def summarise(out):
    """Best forward and backward against the default and the floor (printed and in ``out``)."""
    ok_f = [r for r in out["fwd"] if r.get("status") == "ok"]
    ok_b = [r for r in out["bwd"] if r.get("status") == "ok"]
    if not (ok_f and ok_b):
        print("no summary: no forward or no backward candidate was timed")
        return
    bf = min(ok_f, key=lambda r: r["ms"])
    bb = min(ok_b, key=lambda r: r["ms"])
    bbd = min((r for r in ok_b if r["deterministic"] or r.get("variant") == "strip"), key=lambda r: r["ms"],
              default=None)
    df, db = out["fwd"][0], out["bwd"][0]
    summary = {"best_fwd": bf, "best_bwd": bb, "best_bwd_deterministic": bbd,
               "default_fwd_bwd_ms": df.get("ms", float("nan")) + db.get("ms", float("nan")),
               "best_fwd_bwd_ms": bf["ms"] + bb["ms"]}
    if "floor" in out:
        summary["best_over_floor"] = summary["best_fwd_bwd_ms"] / out["floor"]["three_gemms_ms"]
        summary["default_over_floor"] = summary["default_fwd_bwd_ms"] / out["floor"]["three_gemms_ms"]
    out["summary"] = summary
    print()
    print(f"default fwd+bwd {summary['default_fwd_bwd_ms']:.3f} ms; best {summary['best_fwd_bwd_ms']:.3f} ms "
          f"(fwd {bf['config'] or 'default'}, bwd {bb['config'] or 'default'}"
          f"{' deterministic' if bb['deterministic'] else ''})")
    if "floor" in out:
        print(f"three cuBLAS GEMMs {out['floor']['three_gemms_ms']:.3f} ms: best / floor = "
              f"{summary['best_over_floor']:.2f} (target <= 1.6), default / floor = "
              f"{summary['default_over_floor']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
