"""Hugging Face ``transformers`` integration: :class:`KDTrainer`, a ``transformers.Trainer`` that distils.

::

    from kdfast import LossOptions
    from kdfast.integrations.hf import KDTrainer

    trainer = KDTrainer(model=student, teacher_model=teacher, args=TrainingArguments(...),
                        train_dataset=dataset, data_collator=collator,
                        loss_options=LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5))
    trainer.train()

Batches hold ``input_ids`` and, optionally, ``attention_mask`` and ``labels`` (unshifted, as
for Hugging Face causal LMs, -100 where nothing is to be predicted; without labels the
input ids are the targets, padding excluded). The loss is kdfast's fused-linear KD loss
when both models allow it, else kd_loss on their logits: kdfast.train.lm decides at the first
step, on the model as the Trainer has wrapped it (an FSDP-sharded model takes the logits
path). Logs gain the two parts of the loss, ``kd`` and ``hard``.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

from kdfast import LossOptions

from ..train.config import require
from ..train.lm import LMDistillLoss, check_loss_path, choose_loss_path

transformers = require("transformers", "hf", "kdfast.integrations.hf")
require("accelerate", "hf", "transformers.Trainer")


class KDTrainer(transformers.Trainer):
    """A ``transformers.Trainer`` whose loss distils ``teacher_model`` (frozen, eval mode) into ``model``.

    Args (besides Trainer's):
        teacher_model: a causal LM with the student's vocabulary (or set ``vocab_size``).
        loss_options: a :class:`kdfast.LossOptions` or a dict of its fields.
        loss_path: "auto", "fused_linear" or "logits" (see kdfast.train.lm).

    ``trainer.distill_loss``, the loss (``trainer.distill_loss.path`` the path taken), is set at the first step.
    """

    # compute_loss returns a mean over the micro-batch: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, *args, teacher_model: torch.nn.Module,
                 loss_options: Union[LossOptions, dict, None] = None, loss_path: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        # transformers < 5 decides the same from this flag (and then skips counting items per batch)
        self.model_accepts_loss_kwargs = False
        check_loss_path(loss_path)
        self.loss_options = loss_options if isinstance(loss_options, LossOptions) else \
            LossOptions(**(loss_options or {}))
        self.loss_path = loss_path
        self.teacher_model = teacher_model.to(self.args.device).eval().requires_grad_(False)
        # Chosen in compute_loss, on the model the Trainer passes there: it wraps (and FSDP shards) the model
        # given here only later, and a sharded output embedding rules out the fused path.
        self.distill_loss: Optional[LMDistillLoss] = None
        self._distill_loss_model = None  # the model self.distill_loss was chosen for
        self._part_sums, self._part_count = None, 0  # kd and hard, summed on the device between logs

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch: Optional[int] = None):
        if model is not self._distill_loss_model:
            path = choose_loss_path(model, self.teacher_model, self.loss_options, self.loss_path)
            self.distill_loss, self._distill_loss_model = LMDistillLoss(self.loss_options, path), model
        ignore = self.loss_options.ignore_index
        input_ids, attention_mask = inputs["input_ids"], inputs.get("attention_mask")
        labels = inputs.get("labels")
        if labels is None:
            labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, ignore)
        targets = F.pad(labels[..., 1:], (0, 1), value=ignore)  # position t predicts token t + 1
        parts = self.distill_loss(model, self.teacher_model, input_ids, targets, attention_mask)
        if model.training:
            both = torch.stack([parts.kd, parts.hard]).float()
            self._part_sums = both if self._part_sums is None else self._part_sums + both
            self._part_count += 1
        return (parts.loss, {"loss": parts.loss}) if return_outputs else parts.loss

    def log(self, logs: dict, *args, **kwargs) -> None:
        if self._part_count and "loss" in logs:
            kd, hard = (self._part_sums / self._part_count).tolist()
            logs = {**logs, "kd": kd, "hard": hard}
            self._part_sums, self._part_count = None, 0
        super().log(logs, *args, **kwargs)
