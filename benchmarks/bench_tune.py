#!/usr/bin/env python3
"""Tuning sweep of the Triton kernels at one problem size (CUDA; benchmarks/README.md, "Tuning").

    python benchmarks/bench_tune.py --B 16384 --d 1536 --dtype bf16 --out tune.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

import _common as C  # noqa: E402
from llave_fast.backends import launch  # noqa: E402
from llave_fast.backends import triton_backend as tb  # noqa: E402
from llave_fast.backends.common import StripIds  # noqa: E402

# beyond the library's candidate lists: grid caps of the forward, strip sizes of the backward
EXTRA_FWD = [dict(GR_MAX=8, GC_MAX=66), dict(GR_MAX=32, GC_MAX=17),
             dict(BM=128, BN=128, BK=64, num_warps=8, num_stages=4)]
EXTRA_BWD = [  # several strips instead of one (DS_MIN_ROWS off: the bytes decide); fp32 dS for 16-bit inputs
    dict(DS_ONE_STRIP_BYTES=0, DS_MIN_ROWS=0, DS_STRIP_BYTES=64 << 20),
    dict(DS_ONE_STRIP_BYTES=0, DS_MIN_ROWS=0, DS_STRIP_BYTES=256 << 20),
    dict(DS_LOWP=False),
]


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
    p.add_argument("--dry-run-cpu", action="store_true", help="the interpreter's candidates on the CPU (logic only)")
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
    dtype, B, d = C.DTYPES[args.dtype], args.B, args.d
    q, t = (x.detach() for x in C.make_pairs(1, B, d, dtype=dtype, device=dev, seed=11)[0])
    kw = dict(n_col=B, offset=0, scale=args.logit_scale, alpha=args.alpha, ids=StripIds())
    meta = C.run_meta(dev)
    print(f"tuning on {meta['device']['name']}: B=N={B} d={d} {args.dtype}, torch {meta['versions']['torch']}, "
          f"triton {meta['versions']['triton']}")
    one = 2.0 * B * B * d
    out = {"meta": meta, "config": vars(args),  # write_json writes the Path as a string
           "default": asdict(tb.launch_config(dev, dtype)), "gpu_default": asdict(tb.gpu_config(dtype, sms)),
           "fwd": [], "bwd": []}

    def write():
        out["total_wall_s"] = time.perf_counter() - t_begin
        C.write_json(args.out, out)

    def fwd():
        return tb.strip_forward(q, t, need_col=True, need_e=False, **kw)

    # reference outputs: the default configuration
    stats = fwd()
    gen = torch.Generator(device=dev).manual_seed(5)
    g_row, g_col = (torch.rand(B, device=dev, generator=gen) / B for _ in range(2))
    bkw = dict(kw, row_lse=stats.row_lse, col_lse=stats.col_lse, g_row=g_row, g_col=g_col,
               pos_coef=(g_row + g_col) * args.logit_scale)  # the positive's coefficient, as the loss passes it
    grads = tb.strip_backward(q, t, deterministic=True, **bkw)
    # a candidate is right when it agrees with the default by the library autotuner's own rule
    # (launch.disagreement <= 1: log-sum-exps in nats, gradients element-wise)
    ref = {"fwd": stats, "bwd": grads}

    def candidate(kind, cand, det=False):
        rec = {"config": cand} if kind == "fwd" else {"config": cand, "deterministic": det}
        if args.deadline_s is not None and time.perf_counter() - t_begin > args.deadline_s:
            out[kind].append({**rec, "status": "SKIPPED (deadline)"})
            return
        fn = fwd if kind == "fwd" else (lambda: tb.strip_backward(q, t, deterministic=det, **bkw))
        flops = one if kind == "fwd" else 3 * one  # backward: S again (in dS), dq, dT
        try:
            with tb.kernel_config(**cand):
                err = launch.disagreement(fn(), ref[kind])
                ms = C.bench_ms(fn, dev, args.repeats)
            rec.update(status="ok" if err <= 1.0 else "WRONG", disagreement=err, ms=ms, tflops=flops / ms / 1e9)
            if kind == "bwd":
                rec["tflops_useful"] = 2 * one / ms / 1e9  # the floor's two backward GEMMs
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or fit: reported, the sweep goes on
            rec.update(status="ERROR", error=f"{type(exc).__name__}: {str(exc)[:300]}")
        out[kind].append(rec)
        write()
        print(f"{kind} {cand or 'default'}{' deterministic' if det else ''}: {rec['status']} "
              + (f"{rec['ms']:.3f} ms, {rec['tflops']:.0f} TFLOP/s, disagreement {rec['disagreement']:.2g}" if "ms" in rec
                 else rec.get("error", "")), flush=True)

    # the default forward, every backward (which backward is the decision that matters most), then
    # the other forwards: a deadline cuts the least useful
    try:
        candidate("fwd", {})
        for cand, det in [({}, False), ({}, True)] + [(c, False) for c in bwd_list]:
            candidate("bwd", cand, det)
        for cand in fwd_list:
            candidate("fwd", cand)
        if B * B <= (1 << 30):  # the floor, same inputs: S = q T^T, dS T, dS^T q (cuBLAS)
            dS = (torch.randn(B, B, device=dev, generator=gen) * 1e-3).to(dtype)
            s_ms = C.bench_ms(lambda: torch.mm(q, t.t()), dev, args.repeats)
            b_ms = C.bench_ms(lambda: (torch.mm(dS, t), torch.mm(dS.t(), q)), dev, args.repeats)
            out["floor"] = {"S_ms": s_ms, "dq_dT_ms": b_ms, "three_gemms_ms": s_ms + b_ms}
    except KeyboardInterrupt as exc:
        out["interrupted"] = str(exc) or "KeyboardInterrupt (SIGINT)"
        print(f"INTERRUPTED ({out['interrupted']}): summarising the candidates timed so far", flush=True)
    summarise(out)
    write()
    print(f"tuning results written to {args.out} ({time.perf_counter() - t_begin:.0f} s)")
    return 130 if "interrupted" in out else 0


def summarise(out):
    ok_f, ok_b = ([r for r in out[kind] if r.get("status") == "ok"] for kind in ("fwd", "bwd"))
    if not (ok_f and ok_b):
        print("no summary: no forward or no backward candidate was timed")
        return
    bf, bb = min(ok_f, key=lambda r: r["ms"]), min(ok_b, key=lambda r: r["ms"])
    s = out["summary"] = {
        "best_fwd": bf, "best_bwd": bb, "best_bwd_deterministic": bb,  # the strip backward uses no atomics
        "default_fwd_bwd_ms": out["fwd"][0].get("ms", float("nan")) + out["bwd"][0].get("ms", float("nan")),
        "best_fwd_bwd_ms": bf["ms"] + bb["ms"]}
    print(f"\ndefault fwd+bwd {s['default_fwd_bwd_ms']:.3f} ms; best {s['best_fwd_bwd_ms']:.3f} ms "
          f"(fwd {bf['config'] or 'default'}, bwd {bb['config'] or 'default'}"
          f"{' deterministic' if bb['deterministic'] else ''})")
    if "floor" in out:
        floor = out["floor"]["three_gemms_ms"]
        s.update(best_over_floor=s["best_fwd_bwd_ms"] / floor, default_over_floor=s["default_fwd_bwd_ms"] / floor)
        print(f"three cuBLAS GEMMs {floor:.3f} ms: best / floor = {s['best_over_floor']:.2f} "
              f"(target <= 1.6), default / floor = {s['default_over_floor']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
