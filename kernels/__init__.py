"""Triton kernels of the hardness-weighted contrastive loss (installed as ``llave_fast.kernels``).

``tile``          shared tile arithmetic: the similarity tile and its masked logits
``hardness_fwd``  one sweep: row and column log-sum-exp partials
``hardness_bwd``  recompute: dq by row owners; dT by relaxed fp32 atomics, or by column owners for determinism
``hardness_ds``   recompute, strip variant: dS of a block of rows (bf16, scaled fp16 or fp32), for two library GEMMs

Importing this package imports triton; nothing here probes CUDA.
"""

from .hardness_bwd import hardness_bwd_kernel
from .hardness_ds import hardness_ds_kernel
from .hardness_fwd import hardness_fwd_kernel

__all__ = ["hardness_fwd_kernel", "hardness_bwd_kernel", "hardness_ds_kernel"]
