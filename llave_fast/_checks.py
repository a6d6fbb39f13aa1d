"""Input validation: every bad argument raises, naming the argument and what it got."""

from __future__ import annotations

import math
import numbers

import torch
from .errors import InvalidArgument, InvalidArgumentType

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch", "reference")


def _desc(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # a numpy (or other) array: its kind, not its values
        return f"a {type(x).__module__.split('.')[0]}.{type(x).__name__} of dtype {x.dtype} and shape {tuple(x.shape)}"
    text = repr(x)
    return f"{type(x).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def check_embeddings(name: str, x, *, like: torch.Tensor | None = None, like_name: str = "query",
                     allow_empty: bool = False) -> None:
    """``allow_empty``: zero rows are accepted (a rank with an empty batch across ranks)."""
    if not isinstance(x, torch.Tensor):
        raise InvalidArgumentType(f"{name} must be a torch.Tensor of embeddings, got {_desc(x)}")
    if x.dtype not in FLOAT_DTYPES:
        raise InvalidArgumentType(
            f"{name} must be a floating tensor (bfloat16, float16, float32 or float64), got dtype {x.dtype}"
        )
    if x.dim() != 2:
        raise InvalidArgument(f"{name} must be 2-D (rows x embedding width), got shape {tuple(x.shape)}")
    if x.shape[1] == 0:
        raise InvalidArgument(f"{name} has embedding width 0 (shape {tuple(x.shape)})")
    if like is None:
        if x.shape[0] == 0 and not allow_empty:
            raise InvalidArgument(f"{name} is an empty batch (shape {tuple(x.shape)}): the loss needs at least one pair")
        return
    if x.shape[1] != like.shape[1]:
        raise InvalidArgument(
            f"{name} has embedding width {x.shape[1]} (shape {tuple(x.shape)}) but {like_name} has "
            f"width {like.shape[1]} (shape {tuple(like.shape)})"
        )
    if x.dtype != like.dtype:
        raise InvalidArgumentType(
            f"{name} has dtype {x.dtype} but {like_name} has dtype {like.dtype}: cast both to one dtype"
        )
    if x.device != like.device:
        raise InvalidArgument(f"{name} is on {x.device} but {like_name} is on {like.device}: move both to one device")


def check_ids(name: str, ids, lengths: tuple[int, ...], device: torch.device, what: str):
    """Ids are integer, 1-D, one per row (``lengths`` lists the accepted lengths)."""
    if ids is None:
        return None
    if not isinstance(ids, torch.Tensor):
        raise InvalidArgumentType(f"{name} must be an int64 tensor with one id per row, got {_desc(ids)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise InvalidArgumentType(f"{name} must be an integer (int64) tensor, got dtype {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] not in lengths:
        want = " or ".join(str(n) for n in lengths)
        raise InvalidArgument(f"{name} must be 1-D with {want} entries ({what}), got shape {tuple(ids.shape)}")
    if ids.device != device:
        raise InvalidArgument(f"{name} is on {ids.device} but the embeddings are on {device}")
    # always a private copy: the backward rebuilds its masks from the ids, so a caller who refills
    # the buffer between forward and backward must not change the gradients
    return ids.to(torch.int64, memory_format=torch.contiguous_format, copy=True)


def ids_cover_negatives(target_ids, B: int, M: int) -> bool:
    """Whether ``target_ids`` (checked by :func:`check_ids`) holds one id per hard negative too,
    after the B ids of the target rows: the one place this is decided (a candidate with the
    positive's id is masked; negatives given without ids are never masked)."""
    return target_ids is not None and M > 0 and target_ids.shape[0] == B + M


def check_scale(logit_scale, device: torch.device | None = None):
    """Returns (value as float or None, tensor or None). A tensor scale may require grad.

    ``device``: the embeddings' device; a scale tensor that requires grad must live there.
    A Python number or a CPU tensor is read and checked (finite, > 0) here. A tensor on any
    other device (a learnable CUDA scale) is checked for shape, dtype and device only, with no
    host sync: its value is None, and a caller that needs the number reads it with
    :func:`read_scale` (the fused kernels take the scale as an argument; the reference
    computes with the tensor itself).
    """
    if isinstance(logit_scale, bool) or logit_scale is None:
        raise InvalidArgumentType(
            f"logit_scale must be a positive float or a 0-d tensor, got {_desc(logit_scale)} "
            "(LLaVE's WeightedClipLoss options such as local_loss must be passed by keyword, or use "
            "llave_fast.llave_compat.WeightedClipLoss)"
        )
    if isinstance(logit_scale, torch.Tensor):
        if logit_scale.numel() != 1 or logit_scale.dim() > 1:
            raise InvalidArgument(f"logit_scale must be a 0-d (or 1-element) tensor, got shape {tuple(logit_scale.shape)}")
        if not logit_scale.dtype.is_floating_point:
            raise InvalidArgumentType(f"logit_scale must be a floating tensor, got dtype {logit_scale.dtype}")
        if device is not None and logit_scale.device != device and (
            logit_scale.requires_grad or logit_scale.device.type == "meta"
        ):
            raise InvalidArgument(f"logit_scale is on {logit_scale.device} but the embeddings are on {device}")
        if logit_scale.device.type != "cpu":
            return None, logit_scale
        return read_scale(logit_scale), logit_scale
    if isinstance(logit_scale, numbers.Real):
        return _positive_scale(float(logit_scale)), None
    raise InvalidArgumentType(f"logit_scale must be a positive float or a 0-d tensor, got {_desc(logit_scale)}")


def read_scale(logit_scale: torch.Tensor) -> float:
    """The value of a scale tensor (already checked by :func:`check_scale`), checked finite and
    > 0. On a device other than the CPU this is a host sync: call it only where the number is
    needed. A meta scale (beside meta embeddings: shapes only, nothing is computed) has no value
    to read or check; the kernels get 1.0, which no output depends on."""
    if logit_scale.device.type == "meta":
        return 1.0
    return _positive_scale(float(logit_scale.detach().reshape(()).item()))


def _positive_scale(value: float) -> float:
    if not math.isfinite(value) or value <= 0.0:
        raise InvalidArgument(f"logit_scale must be finite and > 0, got {value}")
    return value


def check_alpha(alpha) -> float:
    """alpha as a float. The hardness weight exp(alpha * S) is detached by definition (LLaVE),
    so alpha gets no gradient: a tensor that requires grad is refused rather than silently
    turned into a constant."""
    if isinstance(alpha, bool) or not isinstance(alpha, (numbers.Real, torch.Tensor)):
        raise InvalidArgumentType(f"alpha must be a finite float, got {_desc(alpha)}")
    if isinstance(alpha, torch.Tensor):
        if alpha.numel() != 1 or alpha.dim() > 1:
            raise InvalidArgument(f"alpha must be a 0-d (or 1-element) tensor, got shape {tuple(alpha.shape)}")
        if alpha.dtype == torch.bool or alpha.dtype.is_complex:
            raise InvalidArgumentType(f"alpha must be a real number, got a tensor of dtype {alpha.dtype}")
        if alpha.device.type == "meta":
            raise InvalidArgument("alpha is a meta tensor, which has no value; pass a float (alpha sets the "
                                  "hardness weight exp(alpha * S) and is read as a number)")
        if alpha.requires_grad:
            raise InvalidArgument(
                "alpha is a tensor that requires grad, but the hardness weight exp(alpha * S) is detached by "
                "definition (LLaVE), so alpha would get no gradient; pass a float or alpha.detach()"
            )
        alpha = alpha.item()
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise InvalidArgument(f"alpha must be finite, got {alpha}")
    return alpha


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise InvalidArgument(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value
