"""kdfast: fast, memory-efficient knowledge-distillation losses for large-vocabulary language models."""

from .api import KDLoss, KDLossParts, LossOptions, kd_loss
from .backends.registry import available_backends, empty_cache
from .fused_linear import FusedLinearKDLoss, fused_linear_kd_loss
from .sparse import (
    SparseKDLoss,
    fused_linear_sparse_kd_loss,
    fused_linear_teacher_topk,
    sparse_kd_loss,
    teacher_sample,
    teacher_topk,
)

__all__ = ["FusedLinearKDLoss", "KDLoss", "KDLossParts", "LossOptions", "SparseKDLoss", "available_backends",
           "empty_cache", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss", "fused_linear_teacher_topk",
           "kd_loss", "sparse_kd_loss", "teacher_sample", "teacher_topk"]
__version__ = "0.1.0"
