"""llave-fast: fused hardness-weighted contrastive loss for LLaVE-style embedding training."""

from .errors import LlaveFastError
from .gradcache import GradCache
from .loss import FusedHardnessLoss, hardness_weighted_loss
from .reference import reference_loss  # noqa: F401  (the test oracle: llave_fast.reference, not the user API)

__version__ = "0.1.0"

__all__ = ["FusedHardnessLoss", "GradCache", "LlaveFastError", "hardness_weighted_loss", "__version__"]
