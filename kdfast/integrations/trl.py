"""TRL integration: :class:`GKDTrainer`, TRL's ``GKDTrainer`` with kdfast's loss. Switching is one import::

    # from trl.experimental.gkd import GKDTrainer
    from kdfast.integrations.trl import GKDTrainer

The constructor, the config (``GKDConfig``: ``beta``, ``lmbda``, ``seq_kd``, ...) and the
on-policy generation are TRL's own; two methods change:

- ``generalized_jsd_loss`` (a staticmethod with TRL's signature) computes the same number
  with kdfast's fused kernels: beta 0 / 1 are forward / reverse KL, no T² factor, positions
  whose label is -100 are left out, "batchmean" divides by the counted positions (by the
  batch size without labels), "mean" by their elements, ``num_items_in_batch`` replaces the
  divisor whatever the reduction. ``reduction="none"`` is TRL's element-wise (positions, V)
  tensor, which nothing can fuse: it is TRL's own code.
- ``compute_loss`` takes the fused-linear path (the loss from both models' hidden states and
  output layers, never the logits) when both models allow it, checked on the first step as
  :class:`kdfast.integrations.hf.KDTrainer` does, else the logits path. Like TRL's, it
  computes the loss at temperature 1 (``GKDConfig.temperature`` is the sampling temperature
  of the on-policy generation).

TRL's newer ``DistillationTrainer`` computes its loss in a private module function inside
``_compute_loss``: it has no stable hook to override, so it is not wrapped here.
"""

from __future__ import annotations

import os
from typing import Optional

import torch.nn.functional as F

import kdfast
from kdfast import LossOptions

from ..train.config import require
from ..train.lm import LMDistillLoss, check_loss_path, choose_loss_path

require("trl", "trl", "kdfast.integrations.trl")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # GKDTrainer lives in trl.experimental
from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer  # noqa: E402

TRL_IGNORE_INDEX = -100  # TRL's label mask, fixed in its code


class GKDTrainer(_TRLGKDTrainer):
    """TRL's GKDTrainer with kdfast's loss. Args are TRL's, plus ``loss_path``: "auto",
    "fused_linear" or "logits" (see kdfast.train.lm)."""

    def __init__(self, *args, loss_path: str = "auto", **kwargs):
        check_loss_path(loss_path)
        super().__init__(*args, **kwargs)
        self.loss_path = loss_path
        self.distill_loss: Optional[LMDistillLoss] = None
        self._distill_loss_model = None  # the model self.distill_loss was chosen for

    @staticmethod
    def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
        if reduction == "none":
            return _TRLGKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                                       reduction, num_items_in_batch)
        options = dict(divergence="jsd", beta=beta, temperature=temperature, scale_t2=False,
                       ignore_index=TRL_IGNORE_INDEX)
        if num_items_in_batch is not None:
            return kdfast.kd_loss(student_logits, teacher_logits, labels=labels, reduction="batchmean",
                                  num_items_in_batch=num_items_in_batch, **options)
        if reduction == "batchmean" and labels is None:  # TRL divides by the batch size, not the positions
            total = kdfast.kd_loss(student_logits, teacher_logits, reduction="sum", **options)
            return total / max(student_logits.shape[0], 1)
        return kdfast.kd_loss(student_logits, teacher_logits, labels=labels, reduction=reduction, **options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if model is not self._distill_loss_model:
            options = LossOptions(divergence="jsd", beta=self.beta, scale_t2=False, ignore_index=TRL_IGNORE_INDEX)
            path = choose_loss_path(model, self.teacher_model, options, self.loss_path)
            self.distill_loss, self._distill_loss_model = LMDistillLoss(options, path), model
        self.teacher_model.eval()
        # Position t predicts token t + 1; the last position predicts nothing.
        targets = F.pad(inputs["labels"][:, 1:], (0, 1), value=TRL_IGNORE_INDEX)
        loss = self.distill_loss(model, self.teacher_model, inputs["input_ids"], targets, inputs["attention_mask"],
                                 num_items_in_batch=num_items_in_batch).loss
        return (loss, {"loss": loss}) if return_outputs else loss
