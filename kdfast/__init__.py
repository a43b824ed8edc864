"""kdfast: fast, memory-efficient knowledge-distillation losses for large-vocabulary language models.

Where things live (each layer imports only the layers below it; tests/test_layout.py checks it):

- The loss core, at the top of the package. ``api`` (kd_loss, KDLoss), ``fused_linear`` and
  ``sparse`` are the public losses; ``options`` checks their options, ``inputs`` their tensors
  (and lays logits out as rows), ``reduction`` turns row losses into the returned loss;
  ``chunked`` walks an output layer in chunks for the fused-linear losses; ``distributed``
  splits the loss over ranks that each hold a slice of the vocabulary; ``ops`` holds the
  torch.library custom ops and autograd Functions; ``reference`` is the float64 reference.
  A new loss: a module here, built from those pieces.
- ``backends/``: one module per backend (``triton_kernels`` and ``triton_sparse``, ``cuda_ext``,
  ``cpu_ext``, ``torch_fallback``), each ending with its ``Backend`` record; the contract and the
  divergence codes in ``backends/__init__.py``, the choice of backend in ``registry``, the
  extension builder in ``build``; the C++/CUDA sources in the repository's ``csrc/``. A new
  backend: one module and one line in ``registry.BACKEND_MODULES``. A new divergence: its code in
  ``backends/__init__.py``, its terms in each backend and in ``reference``.
- ``train/``: the training stack (trainer, data, checkpoints, the ``kdfast`` command), on the
  public API only. ``integrations/``: adapters to other trainers (Hugging Face, TRL).
"""

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
