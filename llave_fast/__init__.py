"""llave-fast: fused hardness-weighted contrastive loss for LLaVE-style embedding training."""

from .gradcache import GradCache
from .loss import FusedHardnessLoss, hardness_weighted_loss
from .reference import reference_loss

__version__ = "0.1.0"

__all__ = ["FusedHardnessLoss", "GradCache", "hardness_weighted_loss", "reference_loss", "__version__"]
