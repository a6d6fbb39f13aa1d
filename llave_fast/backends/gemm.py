"""The library GEMMs of the strip backward (``dq = dS @ T``, ``dT += dS^T @ q``): operands padded
with exact zeros to aligned shapes (:data:`GEMM_K_ALIGN`, :data:`GEMM_LD_ALIGN`), and a 16-bit
product added into an fp32 accumulator in the fastest form this torch offers (probed once per
device and dtype: :func:`acc_mm_form`)."""

from __future__ import annotations

import torch

from .common import round_up

__all__ = ["GEMM_K_ALIGN", "GEMM_LD_ALIGN", "acc_mm_form", "gemm_k", "gemm_operand", "mm_into"]

# The library GEMMs of the strip backward get their inner dimension (K: NT for dq, the strip's rows
# for dT) padded with exact zeros to a multiple of GEMM_K_ALIGN (of GEMM_LD_ALIGN when K < 64), and
# every leading dimension to a multiple of GEMM_LD_ALIGN: cuBLAS was 2-6x slower with an odd K
# (H200, NT = 16383; NOTES.md).
GEMM_K_ALIGN = 64
GEMM_LD_ALIGN = 8


def gemm_k(n: int) -> int:
    """An inner dimension of ``n`` as the library GEMMs get it: a multiple of GEMM_K_ALIGN, or of
    GEMM_LD_ALIGN below that (a thin strip would otherwise take several times its own memory)."""
    return round_up(n, GEMM_K_ALIGN if n >= GEMM_K_ALIGN else GEMM_LD_ALIGN)


def gemm_operand(x: torch.Tensor, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a ``rows`` x ``cols`` GEMM operand of ``dtype``: zero rows below and zero columns to
    the right (they add exact zeros to every product), or ``x`` itself (cast) when it has that shape."""
    r, c = x.shape
    if (r, c) == (rows, cols):
        return x if x.dtype == dtype else x.to(dtype)
    out = torch.zeros((rows, cols), dtype=dtype, device=x.device)
    out[:r, :c] = x
    return out


# How to add a 16-bit GEMM into an fp32 accumulator on this torch: decided on first use, per
# (device type, device index, dtype)
_ACC_MM: dict = {}


def acc_mm_form(device: torch.device, dtype: torch.dtype) -> str:
    """``_probe_acc_mm``'s answer for ``device`` and ``dtype``, probed once per pair."""
    key = (device.type, device.index, dtype)
    if key not in _ACC_MM:
        _ACC_MM[key] = _probe_acc_mm(device, dtype)
    return _ACC_MM[key]


def _probe_acc_mm(device: torch.device, dtype: torch.dtype) -> str:
    """The fastest form this torch accepts: "addmm" (cuBLAS C = A B + beta C with fp32 C in one
    pass, torch >= 2.8 on CUDA), "mm" (fp32 product, then added), or "cast" (16-bit product,
    cast, added). Checked numerically on 16 x 16 operands as they are used: a transposed first
    operand, beta = 1 accumulating, and beta = 0 over a NaN-filled output (which must not be
    read)."""
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(16, 16, generator=g, device=device).to(dtype)
    b = torch.randn(16, 16, generator=g, device=device).to(dtype)
    want = a.t().double() @ b.double()

    def close(x, ref):
        return x.dtype == torch.float32 and bool(torch.allclose(x.double(), ref, rtol=1e-3, atol=1e-3))

    try:
        c = torch.ones(16, 16, device=device)
        torch.addmm(c, a.t(), b, beta=1, out_dtype=torch.float32, out=c)
        z = torch.full((16, 16), float("nan"), device=device)
        torch.addmm(z, a.t(), b, beta=0, out_dtype=torch.float32, out=z)
        if close(c, want + 1) and close(z, want):
            return "addmm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    try:
        if close(torch.mm(a.t(), b, out_dtype=torch.float32), want):
            return "mm"
    except (TypeError, RuntimeError, NotImplementedError):
        pass
    return "cast"


def mm_into(dst: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, accumulate: bool) -> None:
    """dst = a @ b  or  dst += a @ b, with 16-bit operands kept on the tensor cores and the
    product never rounded to 16 bits where torch allows (see ``_probe_acc_mm``). dst is
    fp32, or (``accumulate=False``) of the operands' dtype: one GEMM, rounded once."""
    if a.dtype == dst.dtype:
        if accumulate:
            dst.addmm_(a, b)
        else:
            torch.mm(a, b, out=dst)
        return
    form = acc_mm_form(a.device, a.dtype)
    if form == "addmm":
        torch.addmm(dst, a, b, beta=1 if accumulate else 0, out_dtype=torch.float32, out=dst)
        return
    if form == "mm":
        prod = torch.mm(a, b, out_dtype=torch.float32)
    elif a.dtype == torch.float16:
        # no fp32-output GEMM on this torch/device (the CPU, torch < 2.8): an fp16 product
        # of the scaled strip could overflow fp16 (a row of dS sums to more than its max),
        # so multiply in fp32 (exact products, fp32 sums: what the tensor cores do)
        prod = torch.mm(a.float(), b.float())
    else:
        prod = torch.mm(a, b).float()
    if accumulate:
        dst += prod
    else:
        dst.copy_(prod)
