"""Inf-CL (``inf-cl`` 1.2.1) as a bench_loss backend: plain InfoNCE (alpha = 0), CUDA only, its
single-GPU path; what it computes and its B % 64 caveat: benchmarks/README.md, "Inf-CL"."""

from __future__ import annotations

import warnings

import torch

HEAD_DIMS = (256, 128, 64, 32, 16)  # powers of two the kernels handle; the largest dividing d is used
INF_CL_ALIGN = 64  # BLOCK_M = BLOCK_N of its kernels


def inf_cl_available(device: torch.device | str | None = None) -> tuple[bool, str]:
    """(True, version) when Inf-CL can run on ``device`` (default: cuda), else (False, why)."""
    device = torch.device("cuda" if device is None else device)
    try:
        from inf_cl import cal_inf_loss  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not available"
        return False, (f"inf_cl is not importable ({type(exc).__name__}: {exc}); install the wheel "
                       "(bash benchmarks/fetch_wheels.sh, then carry .whl)")
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"Inf-CL runs on CUDA only (its kernels assert q.is_cuda and use inline PTX); device is {device}"
    from importlib.metadata import version

    return True, f"inf-cl {version('inf-cl')}"


def inf_cl_head_dim(d: int) -> int | None:
    """The head_dim passed for embedding width d (the largest of 256..16 dividing d)."""
    return next((h for h in HEAD_DIMS if d % h == 0), None)


def make_inf_cl_loss(*, scale: float, symmetric: bool, d: int):
    """A callable ``(q, t) -> scalar`` equal to ``reference_loss(q, t, logit_scale=scale, alpha=0.0,
    symmetric=symmetric, reduction="mean")``, differentiable in q and t (not in the scale)."""
    scale = float(scale)
    head_dim = inf_cl_head_dim(d)
    if head_dim is None:
        raise ValueError(f"d={d} is not supported by Inf-CL: it needs d divisible by a head_dim in {HEAD_DIMS}")
    import torch.distributed as dist
    from inf_cl import cal_inf_loss

    def loss_fn(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized():
            raise RuntimeError("a process group is initialised, so cal_inf_loss would run its ring path")
        if q.shape[0] % INF_CL_ALIGN:
            warnings.warn(f"B={q.shape[0]} is not a multiple of {INF_CL_ALIGN}: Inf-CL's dK kernel reads past "
                          "the end of dLSE for the last row block", stacklevel=2)
        q, t = q.contiguous(), t.contiguous()
        loss = cal_inf_loss(q, t, scale=scale, head_dim=head_dim)
        return (loss + cal_inf_loss(t, q, scale=scale, head_dim=head_dim)) / 2 if symmetric else loss

    loss_fn.head_dim = head_dim
    return loss_fn
