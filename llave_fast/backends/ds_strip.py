"""The dS strip of the Triton strip backward: its row stride, how many rows a strip holds, its
precision (bf16 / fp16 scaled by sigma / fp32) and the fp16 strip's power-of-two scale sigma."""

from __future__ import annotations

import torch

from .common import s_row_stride
from .launch import KernelConfig

__all__ = ["SIGMA_MAX_EXP", "ds_dtype", "ds_row_stride", "ds_scale", "strip_rows"]


def ds_row_stride(NT: int) -> int:
    """Elements between consecutive rows of the dS strip buffer: NT rounded up to a multiple
    of common.ROW_ALIGN (64). Every row then starts 128-byte aligned (16-bit), so the kernel's
    stores vectorise and the library GEMMs get an aligned leading dimension for any NT
    (hard negatives, uneven ranks); they read the ``[:rows, :stride]`` view (the kernel writes
    exact zeros past NT), so their K is a multiple of 64 too. The kept / streamed fp32 S has the
    same stride (``common.s_row_stride``)."""
    return s_row_stride(NT)


def strip_rows(cfg: KernelConfig, B: int, NT: int, ds_bytes: int) -> int:
    """Rows per dS strip (each row takes ``ds_row_stride(NT) * ds_bytes`` bytes):

    * DS_STRIP_ROWS if set;
    * else all B rows (one strip) when the whole padded B x NT dS fits DS_ONE_STRIP_BYTES;
    * else as many as DS_STRIP_BYTES holds, a multiple of the row tile, but at least one
      tile and DS_MIN_ROWS rows (each strip re-reads and re-writes the fp32 dT: very thin
      strips at huge N would spend more time there than in the GEMMs);

    never more than B."""
    if cfg.DS_STRIP_ROWS is not None:
        return min(B, cfg.DS_STRIP_ROWS)
    row_bytes = ds_row_stride(NT) * ds_bytes
    if B * row_bytes <= cfg.DS_ONE_STRIP_BYTES:
        return B
    bm = cfg.DS_BM
    r = cfg.DS_STRIP_BYTES // row_bytes
    r = max(bm, cfg.DS_MIN_ROWS, (r // bm) * bm)
    return min(B, r)


def ds_dtype(cfg: KernelConfig, dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dS strip's precision: the inputs' 16-bit type (fp16 scaled by sigma, see
    ``hardness_ds``), fp32 for fp32 inputs. DS_LOWP True/False forces a 16-bit/fp32 strip.

    Under the interpreter (CPU) the default for bf16 is an fp32 strip: the interpreter
    rounds fp32 to bf16 by truncation, not to nearest as the GPU does, so a bf16 strip there
    would not test the GPU's numerics (tests force it with DS_LOWP=True to cover the path).
    fp16 conversion and fp16 values are exact under the interpreter: fp16 runs its real path."""
    lowp = cfg.DS_LOWP
    if dtype == torch.float32 or lowp is False:
        return torch.float32
    if lowp is None and dtype == torch.bfloat16 and device.type != "cuda":
        return torch.float32
    return dtype


# fp16 strip: sigma * max|dS| in [2^14, 2^15); sigma clamped to 2^+-SIGMA_MAX_EXP (1/sigma stays a
# normal fp32 and s * sigma finite for any s < 2^27)
SIGMA_MAX_EXP = 100


def ds_scale(g_row: torch.Tensor, g_col: torch.Tensor | None, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma, 1/sigma) of the fp16 strip as one-element fp32 tensors, computed on the device
    (no host sync). |dS_ij| <= M = |s| (max|g_row| + max|g_col|) (``hardness_ds``); with
    M = m 2^e, m in [0.5, 1): sigma = 2^(15 - e), so sigma * M in [2^14, 2^15). Both are
    built from their exponent bits: exact powers of two. M = 0 (g all zero) gives e = 0; a
    NaN/inf in g gives e = 0 too, and the kernel's own arithmetic carries the NaN/inf."""
    m = g_row.abs().amax()
    if g_col is not None:
        m = m + g_col.abs().amax()
    m = (m * abs(float(scale))).reshape(1)
    _, e = torch.frexp(m)
    e = torch.clamp(15 - e.to(torch.int32), -SIGMA_MAX_EXP, SIGMA_MAX_EXP)
    sigma = torch.bitwise_left_shift(e + 127, 23).view(torch.float32)
    inv_sigma = torch.bitwise_left_shift(127 - e, 23).view(torch.float32)
    return sigma, inv_sigma
