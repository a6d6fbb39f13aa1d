"""The GEMM floor of the loss: S = q T^T, dq = dS T and dT = dS^T q with cuBLAS, timed like a loss
(padded as the fused loss pads its GEMMs; row blocks beyond ``MAX_ELEMS``). benchmarks/README.md."""

from __future__ import annotations

import torch

from llave_fast.backends.triton_backend import GEMM_K_ALIGN, GEMM_LD_ALIGN, gemm_k, gemm_operand, round_up

MAX_ELEMS = 1 << 28  # one S or dS block: 512 MiB in bf16


def gemm3_rows(B: int, N: int) -> int:
    return max(1, min(B, MAX_ELEMS // max(1, N)))


class _Gemm3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, t, dS, R):
        (B, D), N = q.shape, t.shape[0]
        Dp = round_up(D, GEMM_LD_ALIGN)
        Np = dS.shape[1]  # dS: blocks of R rows (allocated padded to GEMM_K_ALIGN), N padded to it
        # K = d padded; S is Np wide (zero rows of t: an aligned leading dimension for any N)
        qp, tp = gemm_operand(q, B, Dp, q.dtype), gemm_operand(t, Np, Dp, t.dtype)
        S = torch.empty((R, Np), dtype=q.dtype, device=q.device)
        first = None
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            torch.mm(qp[r0:r1], tp.t(), out=S[: r1 - r0])
            if first is None:
                first = S[0, 0].float().clone()
        ctx.save_for_backward(q, t, dS)
        ctx.R = R
        return first

    @staticmethod
    def backward(ctx, g):
        q, t, dS = ctx.saved_tensors
        (B, D), N = q.shape, t.shape[0]
        R, Np = ctx.R, dS.shape[1]
        Dp = round_up(D, GEMM_LD_ALIGN)
        tp = gemm_operand(t, Np, Dp, t.dtype)  # K = N for dq, padded with zero rows
        dq = torch.empty((B, Dp), dtype=q.dtype, device=q.device)
        dT = torch.zeros((Np, Dp), dtype=t.dtype, device=t.device)
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            Kr = gemm_k(r1 - r0)
            torch.mm(dS[: r1 - r0], tp, out=dq[r0:r1])
            dT.addmm_(dS[:Kr].t(), gemm_operand(q[r0:r1], Kr, Dp, q.dtype))  # K = the block's rows, padded
        return dq[:, :D], dT[:N, :D], None, None


def gemm3_fn():
    """A fresh floor callable; it keeps one dS block per shape it has seen."""
    cache: dict = {}

    def fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, N = q.shape[0], t.shape[0]
        R = gemm3_rows(B, N)
        key = (gemm_k(R), round_up(N, GEMM_K_ALIGN), q.dtype, q.device)
        if key not in cache:
            cache.clear()
            g = torch.Generator(device=q.device).manual_seed(1234)
            cache[key] = (torch.randn(key[0], key[1], generator=g, device=q.device, dtype=torch.float32)
                          * 1e-3).to(q.dtype)
        return _Gemm3.apply(q, t, cache[key], R)

    return fn
