"""The two hardware ceilings the kernel numbers are quoted against, measured on this GPU.

* copy: a large device-to-device copy, TB/s counting bytes read plus written;
* GEMM: a large bf16 torch.mm (cuBLAS), TFLOP/s;
* and the time of the three cuBLAS GEMMs the loss needs (S, dQ, dT) at a given B, N, d.

Median of CUDA-event timings; writes JSON to --out. Needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


def _time_ms(fn, repeats=20, warmup=3):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out), out


def _copy(dev, n=1 << 30):
    """n bytes of bf16 copied: 2n bytes moved."""
    src = torch.empty(n // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    ms, raw = _time_ms(lambda: dst.copy_(src))
    return {"bytes_moved": 2 * n, "median_ms": ms, "tb_per_s": 2 * n / ms / 1e9, "raw_ms": raw}


def _mm(dev, m=8192, k=8192, n=8192):
    a = torch.randn(m, k, dtype=torch.bfloat16, device=dev)
    b = torch.randn(k, n, dtype=torch.bfloat16, device=dev)
    ms, raw = _time_ms(lambda: torch.mm(a, b))
    return {"shape": [m, k, n], "median_ms": ms, "tflop_per_s": 2 * m * k * n / ms / 1e9, "raw_ms": raw}


def measure_ceilings(dev) -> dict:
    """The copy and bf16 GEMM ceilings of ``dev`` (as ``main`` writes them)."""
    return {"device": torch.cuda.get_device_name(dev), "copy": _copy(dev), "mm_bf16": _mm(dev)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True)
    p.add_argument("--gemm", nargs=3, type=int, default=[16384, 16384, 1536], metavar=("B", "N", "d"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("gpu_ceilings.py needs CUDA")
    dev = torch.device("cuda")
    res = {"torch": torch.__version__, **measure_ceilings(dev)}
    B, N, d = args.gemm
    q = torch.randn(B, d, dtype=torch.bfloat16, device=dev)
    T = torch.randn(N, d, dtype=torch.bfloat16, device=dev)
    dS = torch.randn(B, N, dtype=torch.bfloat16, device=dev)

    def three():
        torch.mm(q, T.t())  # S
        torch.mm(dS, T)  # dQ
        torch.mm(dS.t(), q)  # dT

    ms, raw = _time_ms(three)
    res["three_gemms"] = {"B": B, "N": N, "d": d, "median_ms": ms, "raw_ms": raw,
                          "tflop_per_s": 3 * 2 * B * N * d / ms / 1e9}
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"{res['device']}: copy {res['copy']['tb_per_s']:.2f} TB/s, bf16 mm {res['mm_bf16']['tflop_per_s']:.0f} "
          f"TFLOP/s, three GEMMs of B={B} N={N} d={d}: {ms:.2f} ms")


if __name__ == "__main__":
    main()
