"""kdfast's public loss on logits: :func:`kd_loss` and its module form :class:`KDLoss`.

The options are checked by kdfast.options, the tensors by kdfast.inputs; the reduction
(kdfast.reduction) weighs the rows; kdfast.ops runs the chosen backend's kernel.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import compute_dtype
from .backends.registry import resolve_backend
from .inputs import (as_rows, check_inplace, check_labels, check_logits, check_num_items, check_same_tokens,  # noqa: F401
                     check_vocab)
from .ops import KDLossFunction, apply_loss
from .options import LossOptions, loss_options
from .reduction import KDLossParts, ReductionWeights

__all__ = ["KDLoss", "KDLossParts", "LossOptions", "kd_loss"]


def _kd_loss_with_options(student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor], opts: LossOptions,
                          return_parts: bool = False, num_items_in_batch=None):
    """kd_loss once its options are validated: checks the tensors, then runs the chosen backend."""
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_tokens("student_logits", student_logits, "teacher_logits", teacher_logits)
    vocab = check_vocab(student_logits.shape[-1], teacher_logits.shape[-1], opts.vocab_size)
    lead_shape = student_logits.shape[:-1]
    labels = check_labels(labels, lead_shape, student_logits.device, vocab, opts)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    student, teacher = as_rows(student_logits[..., :vocab], teacher_logits.detach()[..., :vocab])
    backend = resolve_backend(opts.backend, student.device, (student.dtype, teacher.dtype))
    n_rows = student.shape[0] * student.shape[1]
    if n_rows == 0:
        backend = "torch"  # nothing to launch a kernel for

    weights = ReductionWeights.of(labels, n_rows, vocab, opts, student.device,
                                  compute_dtype(student.dtype, teacher.dtype), num_items_in_batch)
    inplace = opts.inplace_backward and student.requires_grad and torch.is_grad_enabled()
    if inplace:
        check_inplace(student_logits, student, teacher)
    loss, kd_rows, ce_rows = apply_loss(KDLossFunction, student, teacher, labels, weights,
                                        opts.expected_grad_output, opts.kernel_params, backend,
                                        opts.reduction == "none", inplace)
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, temperature: float = 1.0,
            teacher_temperature: Optional[float] = None, divergence: str = "forward_kl", beta: float = 0.5,
            labels: Optional[Tensor] = None,
            ignore_index: int = -100, reduction: str = "batchmean", scale_t2: bool = True, hard_weight: float = 0.0,
            soft_weight: float = 1.0, vocab_size: Optional[int] = None, inplace_backward: bool = False,
            expected_grad_output: float = 1.0, num_items_in_batch=None, softcap=None, logit_scale=None,
            return_parts: bool = False, backend: str = "auto"):
    """Knowledge-distillation loss between temperature-softened student and teacher distributions.

    Args:
        student_logits: (..., V) float32/bfloat16/float16 (or float64) logits; the tensor that gets a gradient.
        teacher_logits: (..., V') logits with the same leading shape; never receives a gradient.
        temperature: T > 0; both sides are divided by T before the softmax (the teacher by
            teacher_temperature when given). scale_t2 and the gradient's 1 / T use this T.
        teacher_temperature: None (default: temperature) or > 0: p_t = softmax(teacher_logits /
            teacher_temperature), p_s = softmax(student_logits / temperature). A teacher given as
            log-probabilities already at the distillation temperature T is ``temperature=T,
            teacher_temperature=1`` (log_softmax is idempotent, so they pass through unchanged).
        divergence: "forward_kl" = KL(p_t || p_s), "reverse_kl" = KL(p_s || p_t), or "jsd", the
            generalised Jensen-Shannon divergence of TRL's GKD and Liger with mixture
            m = beta p_t + (1 - beta) p_s; beta = 0 is exactly forward_kl and beta = 1 reverse_kl;
            or "tvd", the total variation distance 0.5 sum |p_t - p_s| (its subgradient, with
            sign(0) = 0).
        beta: jsd only, in [0, 1].
        labels: optional (...,) int64 token ids; rows whose label is ignore_index are not counted
            (and not read). Required when hard_weight > 0.
        reduction: "batchmean" (sum over counted rows / their number), "sum", "mean" (sum / (rows x V),
            torch's KLDivLoss meaning; the hard part is averaged over rows), or "none" (per-row, 0 at ignored rows).
        scale_t2: multiply the divergence by T**2 (Hinton et al.) so gradients keep their size as T changes.
            That holds for the KL divergences (whose gradient scales as 1 / T**2); TVD's gradient scales as
            1 / T, so with scale_t2 it grows as T: TVD users may prefer scale_t2=False.
        hard_weight: adds hard_weight * cross_entropy(student_logits at T = 1, labels).
        soft_weight: scales the distillation part.
        vocab_size: compare only the first vocab_size entries (e.g. a teacher with a padded vocabulary).
        inplace_backward: let kdfast write the gradient over student_logits during the forward pass,
            saving an N x V buffer; student_logits' values are then consumed (do not use them afterwards).
        expected_grad_output: the grad_output backward will receive, e.g. 1 / grad_accum for
            ``(loss / grad_accum).backward()``; the gradient computed in forward is weighted by it,
            so backward needs no pass over it. Any other grad_output is still exact, at the cost of
            that pass.
        num_items_in_batch: for "batchmean" and "mean", the divisor instead of this call's counted
            rows: the counted tokens of the whole optimizer step (all micro-batches and processes),
            so that gradient accumulation and data parallelism average over tokens exactly.
            ``kd_loss(..., num_items_in_batch=n)`` equals ``kd_loss(..., reduction="sum") / n``.
        softcap: None, a cap c > 0 for both sides, or a (student, teacher) pair whose entries may be
            None: that side's logits z become c * tanh(z / c) before the temperature (Gemma 2's
            ``final_logit_softcapping``), after logit_scale. Give it only for raw lm_head outputs
            (e.g. with fused_linear_kd_loss): a model's returned logits are capped already.
        logit_scale: None, s > 0 for both sides, or a (student, teacher) pair: z becomes s * z (Cohere's
            ``logit_scale``; Granite's ``logits_scaling`` is 1 / s). The hard-label cross-entropy is
            taken on the transformed student logits, and the gradient goes through the transforms.
        return_parts: return KDLossParts(loss, kd, hard), the two parts detached for logging.
        backend: "auto", "triton", "cuda", "cpu" or "torch".

    Returns:
        A float32 scalar (float64 for float64 logits), or per-row losses of shape (...) for reduction="none".
        The gradient is computed during the forward pass when student_logits requires grad.
    """
    opts = LossOptions(temperature=temperature, teacher_temperature=teacher_temperature, divergence=divergence,
                       beta=beta, ignore_index=ignore_index, reduction=reduction, scale_t2=scale_t2,
                       hard_weight=hard_weight, soft_weight=soft_weight,
                       vocab_size=vocab_size, inplace_backward=inplace_backward,
                       expected_grad_output=expected_grad_output, softcap=softcap, logit_scale=logit_scale,
                       backend=backend)
    return _kd_loss_with_options(student_logits, teacher_logits, labels, opts, return_parts, num_items_in_batch)


class KDLoss(torch.nn.Module):
    """Module form of :func:`kd_loss`: ``KDLoss(temperature=2.0)(student_logits, teacher_logits, labels)``."""

    def __init__(self, *, return_parts: bool = False, **options):
        super().__init__()
        self.options = loss_options("KDLoss", options, ("return_parts",))
        self.return_parts = return_parts

    def forward(self, student_logits: Tensor, teacher_logits: Tensor, labels: Optional[Tensor] = None,
                num_items_in_batch=None):
        return _kd_loss_with_options(student_logits, teacher_logits, labels, self.options, self.return_parts,
                                     num_items_in_batch)

    def extra_repr(self) -> str:
        defaults = LossOptions()
        changed = {k: v for k, v in vars(self.options).items() if getattr(defaults, k) != v}
        return ", ".join(f"{k}={v!r}" for k, v in changed.items())

