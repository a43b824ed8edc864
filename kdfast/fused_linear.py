"""Fused linear KD loss: hidden states and lm_head weights in, loss out, no N x V logits kept.

The student's and the teacher's logits are computed a chunk of tokens at a time and
compared by the fused kernel, which writes the gradient of the student's logits in place;
kdfast.chunked walks the chunks and turns that gradient into those of the hidden states,
weight and bias.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .backends import compute_dtype
from .backends.registry import resolve_backend
from .chunked import ChunkPlan, FusedLinearFunction, LinearHead, check_head, chunk_rows, logits_dtype
from .inputs import check_labels, check_num_items, check_same_tokens, check_vocab
from .ops import apply_loss
from .options import LossOptions, check_positive_int, loss_options
from .reduction import ReductionWeights

# The keywords of fused_linear_kd_loss besides the loss options, for the unknown-option error.
FUSED_LINEAR_KEYWORDS = ("student_bias", "teacher_bias", "labels", "chunk_size", "num_items_in_batch",
                         "return_parts")


def _fused_linear_kd_loss_with_options(student: LinearHead, teacher: LinearHead, labels: Optional[Tensor],
                                       opts: LossOptions, chunk_size: Optional[int], return_parts: bool = False,
                                       num_items_in_batch=None):
    """fused_linear_kd_loss once its options are validated: checks the tensors, then runs the chunks."""
    check_head("student", student)
    check_head("teacher", teacher)
    check_same_tokens("student_hidden", student.hidden, "teacher_hidden", teacher.hidden)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    vocab = check_vocab(student.weight.shape[0], teacher.weight.shape[0], opts.vocab_size, "student_weight",
                        "teacher_weight")
    lead_shape = student.hidden.shape[:-1]
    device = student.hidden.device
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    student = student._replace(hidden=student.hidden.reshape(-1, student.hidden.shape[-1]))
    teacher = LinearHead(*(None if x is None else x.detach() for x in teacher))
    teacher = teacher._replace(hidden=teacher.hidden.reshape(-1, teacher.hidden.shape[-1]))
    n_rows = student.hidden.shape[0]

    dtypes = (logits_dtype(student.weight), logits_dtype(teacher.weight))
    backend = resolve_backend(opts.backend, device, dtypes) if n_rows else "torch"
    plan = ChunkPlan(chunk_rows(chunk_size, n_rows, vocab, dtypes, device), vocab, backend, opts.kernel_params)
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, compute_dtype(*dtypes), num_items_in_batch)
    loss, kd_rows, ce_rows = apply_loss(FusedLinearFunction, *student, tuple(teacher), labels, weights,
                                        opts.expected_grad_output, plan, opts.reduction == "none",
                                        "fused_linear_kd_loss")
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None, num_items_in_batch=None, return_parts: bool = False,
                         **options):
    """kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias)
    without materialising the N x V logits.

    Args:
        student_hidden: (..., Hs) last hidden states of the student; gets a gradient.
        student_weight: (V, Hs) the student's lm_head weight; gets a gradient (accumulated in its own
            dtype: fp32 master weights get an fp32 gradient, also under autocast).
        teacher_hidden: (..., Ht) the teacher's last hidden states (same leading shape); no gradient.
        teacher_weight: (V_t, Ht) the teacher's lm_head weight; no gradient. V_t may differ from V
            when ``vocab_size`` says how many leading entries the two vocabularies share.
        student_bias, teacher_bias: optional (V,) and (V_t,) lm_head biases (keyword-only, like
            everything after the four tensors, so that labels can never be taken for a bias).
        labels: optional token ids, as in kd_loss (ignore_index rows are not counted).
        chunk_size: tokens per chunk; None picks it so one chunk's logits take about 128 MiB (512 MiB on
            a GPU).
        num_items_in_batch: as in kd_loss.
        return_parts: return KDLossParts(loss, kd, hard), the parts detached for logging.
        **options: kd_loss's keywords: temperature, teacher_temperature, divergence, beta, ignore_index,
            reduction, scale_t2, hard_weight, soft_weight, vocab_size, softcap and logit_scale (applied to each chunk's logits in the
            kernel: a Gemma-2 or Cohere head's real output), expected_grad_output, backend (inplace_backward has no
            effect: the chunk logits are always reused for their gradient).
    """
    return _fused_linear_kd_loss_with_options(
        LinearHead(student_hidden, student_weight, student_bias),
        LinearHead(teacher_hidden, teacher_weight, teacher_bias),
        labels, loss_options("fused_linear_kd_loss", options, FUSED_LINEAR_KEYWORDS), chunk_size, return_parts,
        num_items_in_batch)


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_kd_loss`; options are validated once, at construction."""

    def __init__(self, *, chunk_size: Optional[int] = None, return_parts: bool = False, **options):
        super().__init__()
        self.options = loss_options("FusedLinearKDLoss", options, ("chunk_size", "return_parts"))
        self.chunk_size = chunk_size
        self.return_parts = return_parts

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, *, student_bias: Optional[Tensor] = None,
                teacher_bias: Optional[Tensor] = None, labels: Optional[Tensor] = None, num_items_in_batch=None):
        return _fused_linear_kd_loss_with_options(
            LinearHead(student_hidden, student_weight, student_bias),
            LinearHead(teacher_hidden, teacher_weight, teacher_bias), labels, self.options, self.chunk_size,
            self.return_parts, num_items_in_batch)

