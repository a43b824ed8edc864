"""kdfast: fast, memory-efficient knowledge-distillation losses for large-vocabulary language models."""

from .api import KDLoss, KDLossParts, LossOptions, kd_loss
from .backends.registry import available_backends, empty_cache
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss

__all__ = ["FusedLinearKDLoss", "KDLoss", "KDLossParts", "LossOptions", "available_backends",
           "empty_cache", "fused_linear_kd_loss", "kd_loss"]
__version__ = "0.1.0"
