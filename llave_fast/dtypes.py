"""Names of the weights' precisions: one map and one parser for the model loader, export and evaluation.

The short names (``bf16``, ``fp16``, ``fp32``) are what the commands' ``--dtype`` offers; the
long ones (``bfloat16``, ``float16``, ``half``, ``float32``, also written ``torch.bfloat16``)
are what transformers' ``torch_dtype`` and saved configs say, and are accepted everywhere.
"""

from __future__ import annotations

import torch

from .errors import InvalidArgument, InvalidArgumentType

__all__ = ["DTYPES", "DTYPE_ALIASES", "dtype_name", "parse_dtype", "dtype_label"]

#: the short name of each precision -> its torch dtype
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
#: other spellings -> the short name
DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32"}


def dtype_name(value, *, name: str = "dtype", choices: tuple[str, ...] = tuple(DTYPES)) -> str:
    """The short name (``bf16`` / ``fp16`` / ``fp32``) of any spelling of a precision among
    ``choices``, or ``value`` itself when it is one of the other ``choices`` (a command's own,
    e.g. ``auto``). Otherwise an :class:`~llave_fast.errors.InvalidArgument` naming ``name``,
    the value and the valid choices."""
    if not isinstance(value, str):
        raise InvalidArgumentType(f"{name} must be a str, one of {list(choices)}, got {type(value).__name__}")
    if value in choices:
        return value
    key = value[len("torch."):] if value.startswith("torch.") else value
    key = DTYPE_ALIASES.get(key, key)
    if key not in DTYPES or key not in choices:
        raise InvalidArgument(f"{name} must be one of {list(choices)}, got {value!r}{_aliases(choices)}")
    return key


def parse_dtype(value, *, name: str = "dtype") -> torch.dtype:
    """The torch dtype of a precision given as a torch dtype (bf16 / fp16 / fp32) or any of its names."""
    if isinstance(value, torch.dtype):
        if value not in DTYPES.values():
            raise InvalidArgument(f"{name} must be one of {list(DTYPES.values())}, got {value}")
        return value
    return DTYPES[dtype_name(value, name=name)]


def dtype_label(dtype: torch.dtype) -> str:
    """The torch spelling without its module (``bfloat16``), as results and configs write it."""
    return str(dtype).replace("torch.", "")


def _aliases(choices: tuple[str, ...]) -> str:
    other = [f"{alias} ({short})" for alias, short in DTYPE_ALIASES.items() if short in choices]
    return f" (also accepted: {', '.join(other)})" if other else ""
