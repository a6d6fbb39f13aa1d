"""Backend dispatch: "auto", "triton" (fused kernels), "torch" (chunked), "reference" (eager).

Public here: ``resolve_backend`` and ``get_backend_function`` (what ``llave_fast.loss`` calls),
``kernel_config`` (the launch-configuration override, a context manager) and ``KernelConfig``
(its fields). Everything else lives in the submodules and may change.
"""

from __future__ import annotations

import torch

from ..errors import InvalidArgument, InvalidArgumentType
from .launch import KernelConfig
from .triton_backend import kernel_config

__all__ = ["KernelConfig", "get_backend_function", "kernel_config", "resolve_backend"]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The concrete backend for ``name`` on ``device``; raises if it cannot run there."""
    if name == "auto":
        if device.type == "cuda" and dtype != torch.float64:
            from .triton_backend import available_on

            if available_on(device)[0]:
                return "triton"
        return "torch"
    if name == "triton":
        from .triton_backend import available_on

        ok, why = available_on(device)
        if not ok:
            raise InvalidArgument(f"backend='triton' cannot run here: {why}")
        if dtype == torch.float64:
            raise InvalidArgumentType("backend='triton' takes bfloat16, float16 or float32 embeddings, got torch.float64; "
                            "use backend='torch' or 'reference' for float64")
    return name


def get_backend_function(name: str):
    """The autograd.Function of a fused backend."""
    if name == "triton":
        from .triton_backend import TritonHardnessLoss

        return TritonHardnessLoss
    if name == "torch":
        from .torch_backend import TorchHardnessLoss

        return TorchHardnessLoss
    raise InvalidArgument(f"no fused autograd function for backend {name!r}")
