"""The two hardware ceilings the kernel numbers are quoted against, measured on this GPU:
a large device-to-device copy (TB/s, bytes read plus written) and a large bf16 ``torch.mm``
(cuBLAS, TFLOP/s). Timed with ``triton.testing.do_bench`` (medians); needs CUDA."""

from __future__ import annotations

import torch

from _common import bench_ms


def measure_ceilings(dev, copy_bytes: int = 1 << 30, mm: int = 8192) -> dict:
    src = torch.empty(copy_bytes // 2, dtype=torch.bfloat16, device=dev).normal_()
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), dev, 20)
    del src, dst
    a, b = (torch.randn(mm, mm, dtype=torch.bfloat16, device=dev) for _ in range(2))
    mm_ms = bench_ms(lambda: torch.mm(a, b), dev, 20)
    return {"device": torch.cuda.get_device_name(dev),
            "copy": {"bytes_moved": 2 * copy_bytes, "median_ms": copy_ms, "tb_per_s": 2 * copy_bytes / copy_ms / 1e9},
            "mm_bf16": {"shape": [mm] * 3, "median_ms": mm_ms, "tflop_per_s": 2 * mm ** 3 / mm_ms / 1e9}}
