"""kdfast: fast, memory-efficient knowledge-distillation losses for large-vocabulary language models."""

from .api import KDLoss, KDLossParts, LossOptions, kd_loss
from .dispatch import available_backends

__all__ = ["KDLoss", "KDLossParts", "LossOptions", "available_backends", "kd_loss"]
__version__ = "0.1.0"
