"""The GEMM floor of the loss: the three cuBLAS products any implementation must do.

forward  S  = q @ T^T          (B x N, K = d)
backward dq = dS @ T           (B x d, K = N)
         dT = dS^T @ q         (N x d, K = B)

``gemm3_fn()`` returns a callable ``(q, t) -> scalar`` with an autograd backward, so the
benchmark times it exactly like a loss (fwd, bwd, fwd+bwd columns). It is not a loss: dS
is a fixed random matrix made once per shape, and the value returned is one element of S.
When B x N is larger than ``MAX_ELEMS`` the products run in row blocks of ``gemm3_rows``
rows (same FLOPs; dT is then accumulated block by block, which adds a read and a write of
dT per block), so the floor exists at sizes where a B x N matrix does not fit.
"""

from __future__ import annotations

import torch

MAX_ELEMS = 1 << 28  # one S or dS block: 512 MiB in bf16


def gemm3_rows(B: int, N: int) -> int:
    return max(1, min(B, MAX_ELEMS // max(1, N)))


class _Gemm3(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, t, dS):
        B, N = q.shape[0], t.shape[0]
        R = dS.shape[0]
        S = torch.empty((R, N), dtype=q.dtype, device=q.device)
        first = None
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            torch.mm(q[r0:r1], t.t(), out=S[: r1 - r0])
            if first is None:
                first = S[0, 0].float().clone()
        ctx.save_for_backward(q, t, dS)
        return first

    @staticmethod
    def backward(ctx, g):
        q, t, dS = ctx.saved_tensors
        B, R = q.shape[0], dS.shape[0]
        dq = torch.empty_like(q)
        dT = torch.zeros_like(t)
        for r0 in range(0, B, R):
            r1 = min(B, r0 + R)
            blk = dS[: r1 - r0]
            torch.mm(blk, t, out=dq[r0:r1])
            dT.addmm_(blk.t(), q[r0:r1])
        return dq, dT, None


def gemm3_fn():
    """A fresh floor callable; it keeps one dS block per shape it has seen."""
    cache: dict = {}

    def fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B, N = q.shape[0], t.shape[0]
        key = (gemm3_rows(B, N), N, q.dtype, q.device)
        if key not in cache:
            cache.clear()
            g = torch.Generator(device=q.device).manual_seed(1234)
            cache[key] = (torch.randn(key[0], N, generator=g, device=q.device, dtype=torch.float32) * 1e-3).to(q.dtype)
        return _Gemm3.apply(q, t, cache[key])

    return fn
