"""Inf-CL (PyPI ``inf-cl`` 1.2.1, import name ``inf_cl``) as a loss benchmark backend.

Inf-CL computes plain InfoNCE (no hardness weights), so it is compared with
``reference_loss(q, t, logit_scale=scale, alpha=0.0, ...)``; bench_loss checks it against the
float64 truth like every backend before timing it. What 1.2.1 computes (its ``ring.py`` and
``flash.py``):

* ``cal_inf_loss(q, k, scale=s, head_dim=h)`` is the mean over rows of
  ``logsumexp_j(<s*q_i, k_j>) - <s*q_i, k_i>``: one-way q->k InfoNCE, positives on the diagonal.
  The symmetric loss is the mean of the q->k and k->q calls, as its own ``ring.py`` does.
* Without a ``torch.distributed`` group it runs its single-GPU path (``FlashProb``: one forward
  kernel for the row logsumexp, two backward kernels that each recompute the logits); with a
  group it would run the ring path, so this adapter refuses to run under one.
* Inputs are viewed ``(B, -1, head_dim)`` and computed in fp32 with TF32 matmuls; ``head_dim``
  must be a power of two in [16, 256] dividing d. CUDA only (``assert q.is_cuda``, inline PTX).
* Its dK kernel masks the dLSE loads with ``offs_m < seqlen_q`` instead of
  ``start_m + offs_m < seqlen_q``: for B not a multiple of 64 it reads past dLSE, so bench_loss
  uses multiples of 64 (a warning is issued otherwise).
"""

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
