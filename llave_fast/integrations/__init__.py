"""Integrations with training frameworks (optional extras).

* ``llave_fast.integrations.sentence_transformers`` (``pip install "llave-fast[st]"``):
  ``FusedMultipleNegativesRankingLoss`` and ``FusedCachedMultipleNegativesRankingLoss``, drop-in
  replacements for sentence-transformers' ``MultipleNegativesRankingLoss`` and
  ``CachedMultipleNegativesRankingLoss`` computed by llave-fast's fused loss (the cached one
  through ``llave_fast.GradCache``), and ``fused_mnrl_loss`` on embeddings.
* ``llave_fast.integrations.hf_trainer`` (``pip install "llave-fast[train]"``): a Hugging Face
  ``Trainer`` whose ``compute_loss`` is ``FusedHardnessLoss`` on a shared or two-tower encoder,
  with the whole global batch as negatives across ranks.

The names are imported on first use, so ``import llave_fast.integrations`` needs neither extra.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "FusedMultipleNegativesRankingLoss": "sentence_transformers",
    "FusedCachedMultipleNegativesRankingLoss": "sentence_transformers",
    "fused_mnrl_loss": "sentence_transformers",
    "FusedLossFallbackWarning": "sentence_transformers",
    "DualEncoder": "hf_trainer",
    "FusedContrastiveTrainer": "hf_trainer",
    "TextPairCollator": "hf_trainer",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module = importlib.import_module(f"{__name__}.{_WHERE[name]}")
    return getattr(module, name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
