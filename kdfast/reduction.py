"""Reductions: how each row's divergence and cross-entropy weigh in the loss, and the loss's final form."""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .options import LossOptions


class KDLossParts(NamedTuple):
    """The result of ``kd_loss(..., return_parts=True)``.

    ``loss`` = soft_weight * kd + hard_weight * hard and carries the gradient; ``kd``
    (the divergence, times T**2 when scale_t2) and ``hard`` (the cross-entropy on hard
    labels at T = 1) are detached, reduced the same way, for logging.
    """

    loss: Tensor
    kd: Tensor
    hard: Tensor


class ReductionWeights(NamedTuple):
    """How the reduction weighs each row's divergence and cross-entropy."""

    row_weight: Tensor  # 1, or 1 / (counted rows) for "batchmean" and "mean"
    kd_row_weight: Tensor  # row_weight, and also / V for "mean"
    coefs: Tensor  # d(loss)/d(row divergence), d(loss)/d(row cross-entropy)
    grad_coefs: Tensor  # what the kernels weight the gradient by: coefs * expected_grad_output

    @staticmethod
    def of(labels: Optional[Tensor], n_rows: int, vocab: int, opts: LossOptions, device: torch.device,
           dtype: torch.dtype, num_items_in_batch=None) -> ReductionWeights:
        """num_items_in_batch, when given, replaces the rows this call counts as the divisor of
        "batchmean" and "mean" (the tokens of the whole optimizer step)."""
        # The rows counted stay a tensor, so that no device sync is needed.
        if num_items_in_batch is not None:
            counted = num_items_in_batch
        else:
            counted = n_rows if labels is None else labels.ne(opts.ignore_index).sum()
        counted = torch.as_tensor(counted, device=device).to(dtype).clamp(min=1)
        row_weight = torch.ones((), dtype=dtype, device=device) if opts.reduction in ("none", "sum") else 1 / counted
        kd_row_weight = row_weight / vocab if opts.reduction == "mean" else row_weight
        coefs = torch.stack([opts.soft_weight * opts.kd_scale * kd_row_weight, opts.hard_weight * row_weight])
        coefs = coefs.to(dtype)
        grad_coefs = coefs if opts.expected_grad_output == 1.0 else coefs * opts.expected_grad_output
        return ReductionWeights(row_weight, kd_row_weight, coefs, grad_coefs)

    def finish(self, loss: Tensor, kd_rows: Tensor, ce_rows: Tensor, lead_shape: torch.Size, opts: LossOptions,
               return_parts: bool):
        """The loss in the reduction's shape, with the detached parts when asked."""
        if opts.reduction == "none":
            loss = loss.view(lead_shape)
        if not return_parts:
            return loss
        if opts.reduction == "none":
            return KDLossParts(loss, opts.kd_scale * kd_rows.view(lead_shape), ce_rows.view(lead_shape))
        return KDLossParts(loss, opts.kd_scale * self.kd_row_weight * kd_rows.sum(), self.row_weight * ce_rows.sum())


def weighted_loss(coefs: Tensor, kd_rows: Tensor, ce_rows: Tensor, per_row: bool) -> Tensor:
    """coefs[0] * kd_rows + coefs[1] * ce_rows, summed over rows unless per_row."""
    loss_rows = coefs[0].to(kd_rows.dtype) * kd_rows + coefs[1].to(ce_rows.dtype) * ce_rows
    return loss_rows if per_row else loss_rows.sum()
