"""Kernel probe of the S-cache path (stage B0; NOTES.md, Prediction 13): its parts timed alone.

P1 the S GEMM (16-bit and fp32 output), dq and dT at N and N - 1, the copy bandwidth; P2 the stats
and dS passes against it; P5 the fused forward. ``--dry``: tiny sizes on the CPU (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402
from _common import bench_ms  # noqa: E402


def unit_rows(n: int, d: int, dtype, device, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1).to(device=device, dtype=dtype)


def p1_gemms(B: int, d: int, dtype, device, repeats: int) -> dict:
    from llave_fast.backends.common import sim_operand_dtype, similarity_into
    from llave_fast.backends.triton_backend import gemm_k, gemm_operand, round_up

    out = {}
    n_copy = (1 << 30) if device.type == "cuda" else (1 << 22)
    src = torch.empty(n_copy // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), device, repeats)
    out["copy"] = {"bytes_moved": 2 * n_copy, "ms": ms, "tb_per_s": 2 * n_copy / ms / 1e9}
    del src, dst
    for N in (B, B - 1):
        q, T = unit_rows(B, d, dtype, device, 1), unit_rows(N, d, dtype, device, 2)
        flop = 2 * B * N * d
        row = {"B": B, "N": N, "d": d}
        row["S_16bit_out_ms"] = bench_ms(lambda: torch.mm(q, T.t()), device, repeats)
        S = torch.empty((B, N), device=device)
        T_op = T.to(sim_operand_dtype(q))
        row["S_fp32_out_ms"] = bench_ms(lambda: similarity_into(S, q, T_op), device, repeats)
        row["S_fp32_out_tflop_per_s"] = flop / row["S_fp32_out_ms"] / 1e9
        del S
        dS = (torch.rand((B, N), device=device) * 1e-3).to(dtype)
        row["dq_ms"] = bench_ms(lambda: dS @ T, device, repeats)
        row["dT_ms"] = bench_ms(lambda: dS.t() @ q, device, repeats)
        if N % 64:
            K = gemm_k(N)
            dSp = torch.zeros((B, round_up(N, 64)), device=device, dtype=dtype)
            dSp[:, :N] = dS
            Tp = gemm_operand(T, K, d, dtype)
            qp = gemm_operand(q, gemm_k(B), d, dtype)
            dSr = torch.zeros((gemm_k(B), dSp.shape[1]), device=device, dtype=dtype)
            dSr[:B] = dSp
            row["dq_padded_ms"] = bench_ms(lambda: dSp @ Tp, device, repeats)
            row["dT_padded_ms"] = bench_ms(lambda: dSr.t() @ qp, device, repeats)
            del dSp, Tp, qp, dSr
        del dS, q, T, T_op
        out[f"N={N}"] = row
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def p2_passes(B: int, d: int, dtype, device, repeats: int, copy_tb_s: float | None) -> dict:
    """The two memory-bound passes alone, on a real fp32 S (bytes each must move / time)."""
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.common import StripIds, plan_s, s_row_stride

    q, T = unit_rows(B, d, dtype, device, 3), unit_rows(B, d, dtype, device, 4)
    ids = StripIds()
    out = {"B": B, "N": B, "d": d}
    plan = plan_s(B, B, keep=True, mode="cache", budget=0)
    cfg = tb.launch_config(device, dtype)
    kw = dict(n_col=B, offset=0, scale=50.0, alpha=9.0, ids=ids, need_col=True, need_e=False)
    stride = s_row_stride(B)
    # the whole cached forward, then the statistics pass alone on its S
    fwd_ms = bench_ms(lambda: tb._strip_forward_s(q, T, cfg, plan, **kw), device, repeats)
    stats = tb._strip_forward_s(q, T, cfg, plan, **kw)
    S = stats.s_cache
    from llave_fast.backends.common import sim_operand_dtype, similarity_into

    T_op = tb.gemm_operand(T, stride, d, sim_operand_dtype(q))
    gemm_ms = bench_ms(lambda: similarity_into(S, q, T_op), device, repeats)
    out["cached_forward_ms"] = fwd_ms
    out["S_gemm_ms"] = gemm_ms
    out["stats_pass_ms"] = max(fwd_ms - gemm_ms, 0.0)
    out["stats_pass_bytes"] = B * stride * 4
    g_row = torch.full((B,), 0.5 / B, device=device)
    pos = (g_row * 2 * 50.0).contiguous()
    bwd_kw = dict(n_col=B, offset=0, scale=50.0, alpha=9.0, ids=ids, row_lse=stats.row_lse, col_lse=stats.col_lse,
                  g_row=g_row, g_col=g_row, pos_coef=pos)
    bwd_ms = bench_ms(lambda: tb._strip_backward_ds(q, T, cfg, **bwd_kw, s_cache=S, s_plan=plan), device, repeats)
    # the dS pass alone: the backward minus its two GEMMs, timed on the same shapes
    dsd = tb.ds_dtype(cfg, dtype, device)
    dS = torch.zeros((B, stride), device=device, dtype=dsd)
    T_g = tb.gemm_operand(T, stride, d, dsd)
    two_gemms = bench_ms(lambda: (dS @ T_g, dS.t() @ q.to(dsd)), device, repeats)
    out["cached_backward_ms"] = bwd_ms
    out["two_gemms_ms"] = two_gemms
    out["ds_pass_ms"] = max(bwd_ms - two_gemms, 0.0)
    out["ds_pass_bytes"] = B * stride * (4 + dS.element_size())
    if copy_tb_s:
        for k in ("stats_pass", "ds_pass"):
            ms = out[f"{k}_ms"]
            out[f"{k}_of_copy_bandwidth"] = (out[f"{k}_bytes"] / ms / 1e9) / copy_tb_s if ms > 0 else None
    return out


def p5_fused_forward(B: int, ds: list[int], dtype, device, repeats: int) -> dict:
    from llave_fast.backends import triton_backend as tb
    from llave_fast.backends.common import StripIds

    out = {}
    for d in ds:
        q, T = unit_rows(B, d, dtype, device, 5), unit_rows(B, d, dtype, device, 6)
        row = {}
        # column statistics off; on, read-modified-written per program group (the default); on,
        # written once per row tile; on, from a second row-only sweep over S^T (FWD_COL "tile" and
        # "transpose", NOTES.md Prediction 15)
        for key, need_col, fwd_col in (("col=off_ms", False, "program"), ("col=on_ms", True, "program"),
                                       ("col=on_tile_ms", True, "tile"), ("col=on_transpose_ms", True, "transpose")):
            with tb.kernel_config(S_MODE="fused", FWD_COL=fwd_col):
                row[key] = bench_ms(
                    lambda: tb.strip_forward(q, T, n_col=B, offset=0, scale=50.0, alpha=9.0, ids=StripIds(),
                                             need_col=need_col, need_e=False), device, repeats)
        out[f"d={d}"] = row
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--B", type=int, default=16384)
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--steps", nargs="+", default=["P1", "P2", "P5"], choices=["P1", "P2", "P5"])
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU (needs TRITON_INTERPRET=1)")
    args = p.parse_args(argv)
    C.start_script()
    if args.dry and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--dry runs the kernels under the Triton interpreter: set TRITON_INTERPRET=1")
    if not args.dry and not torch.cuda.is_available():
        raise SystemExit("probe_scache.py needs CUDA (or --dry on the CPU)")
    device, dtype, B, d, ds_p5, reps = ((torch.device("cpu"), torch.float16, 96, 16, [16, 32], 2) if args.dry else
                                        (torch.device("cuda"), torch.bfloat16, args.B, args.d, [256, 1536], args.repeats))
    report = {"script": "probe_scache.py", **C.run_meta(device), "dtype": str(dtype), "steps": {}}
    out = C.write_json(args.out, report)
    for step in args.steps:  # the JSON rewritten after each step; a failed step is reported, the next runs
        t0 = time.perf_counter()
        try:
            if step == "P1":
                res = p1_gemms(B, d, dtype, device, reps)
            elif step == "P2":
                res = p2_passes(B, d, dtype, device, reps, report["steps"].get("P1", {}).get("copy", {}).get("tb_per_s"))
            else:
                res = p5_fused_forward(B, ds_p5, dtype, device, reps)
            res["status"] = "ok"
        except KeyboardInterrupt:
            res = {"status": "stopped (SIGINT: the step's limit)"}
            raise
        except Exception as exc:  # noqa: BLE001
            res = {"status": f"error: {type(exc).__name__}: {str(exc)[:500]}"}
        finally:
            report["steps"][step] = {**res, "wall_s": time.perf_counter() - t0}
            C.write_json(out, report)
        print(f"{step}: {json.dumps(res, default=str)[:1500]}", flush=True)
    print(f"results written to {out}")


if __name__ == "__main__":
    main()
