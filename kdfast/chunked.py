"""The chunked pass over a student's output layer that the fused-linear losses share.

The tokens are walked in chunks. For each chunk the student's logits are computed from its
hidden states and lm_head (and the teacher's, for a teacher given as a head too, without
autograd); the fused kernel writes the logits' gradient over the student's chunk of logits,
and that gradient is multiplied into the gradients of the hidden states, weight and bias
straight away. Peak extra memory is one chunk of logits per side plus the gradients the
caller needs; the N x V logits are never held.

The gradients are computed during the forward pass and scaled by the incoming grad_output in
backward, except for per-row losses (reduction="none"), whose per-row grad_output is only
known in backward: there the chunks are recomputed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .backends import KernelParams, SparseKernelParams
from .ops import kd_forward, relative_grad_output, scale_grad_, sparse_kd_forward, start_backward
from .reduction import ReductionWeights, weighted_loss

# Bytes of one chunk's student + teacher logits when chunk_size is None. Every chunk reads
# and writes the whole weight gradient once (its V x H accumulation), so on a GPU, where that
# traffic is what small chunks cost (and GEMMs want many rows), chunks are larger: 512 MiB
# is 1024 rows at V = 128256 in bf16, one chunk pair plus a bf16 weight gradient ~1.1 GB.
LOGITS_BUDGET_BYTES = {"cuda": 512 * 2**20}
DEFAULT_LOGITS_BUDGET_BYTES = 128 * 2**20


def logits_dtype(weight: Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def default_chunk_size(n_rows: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Rows per chunk such that one chunk's student and teacher logits fit the device's budget."""
    budget = LOGITS_BUDGET_BYTES.get(device.type, DEFAULT_LOGITS_BUDGET_BYTES)
    rows = max(1, budget // (2 * vocab * itemsize))
    return min(n_rows, max(8, rows // 8 * 8)) if n_rows else 1


class LinearHead(NamedTuple):
    """One side's output layer on its final hidden states: logits = hidden @ weight.T + bias."""

    hidden: Tensor  # (N, H)
    weight: Tensor  # (V, H)
    bias: Optional[Tensor]  # (V,) or None

    def first(self, vocab: int) -> LinearHead:
        """The head of the first ``vocab`` logits."""
        return LinearHead(self.hidden, self.weight[:vocab], None if self.bias is None else self.bias[:vocab])

    def in_logits_dtype(self) -> LinearHead:
        """The operands in the dtype the logits' matmul runs in (autocast's, if on), cast once."""
        dtype = logits_dtype(self.weight)
        return LinearHead(*(None if x is None else x.to(dtype) for x in self))

    def logits_into(self, out: Tensor, rows: slice) -> Tensor:
        """hidden[rows] @ weight.T + bias, written into out."""
        if self.bias is None:
            return torch.mm(self.hidden[rows], self.weight.t(), out=out)
        return torch.addmm(self.bias, self.hidden[rows], self.weight.t(), out=out)


def check_head(side: str, head: LinearHead) -> None:
    hidden, weight, bias = head
    for name, x in ((f"{side}_hidden", hidden), (f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and (not isinstance(x, Tensor) or not x.is_floating_point()):
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if hidden is None or weight is None:
        raise TypeError(f"{side}_hidden and {side}_weight are required tensors")
    if hidden.dim() < 1:
        raise ValueError(f"{side}_hidden must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{side}_weight must have shape (V, {hidden.shape[-1]}) to match {side}_hidden's "
                         f"hidden size, got {tuple(weight.shape)}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{side}_bias must be None or a tensor of shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape)}")
    for name, x in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {side}_hidden is on {hidden.device}")
    if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
        raise TypeError(f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}: use one dtype, or "
                        "run under torch.autocast")


class HeadGrads(NamedTuple):
    """Gradients of a student LinearHead's tensors (None where not wanted)."""

    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


class ChunkPlan(NamedTuple):
    """How the tokens are walked: rows per chunk, the logits compared, and the kernel that compares them."""

    rows: int
    vocab: int  # the first vocab logits of each side are compared
    backend: str
    params: Union[KernelParams, SparseKernelParams]  # and so the teacher: a LinearHead, or sparse (ids, logprobs)


ChunkLoss = Callable[[Tensor, slice, Optional[Tensor], Optional[Tensor], Tensor], tuple[Tensor, Tensor]]


def _teacher_loss(teacher: tuple, plan: ChunkPlan, n_rows: int) -> ChunkLoss:
    """loss(student_logits, rows, labels, grad, coefs) -> (kd_rows, ce_rows) of a chunk of rows
    against the teacher: its own chunk of logits for a LinearHead, its ids and log-probs for a
    sparse teacher."""
    if isinstance(plan.params, SparseKernelParams):
        ids, logprobs = teacher

        def sparse_loss(logits, rows, labels, grad, coefs):
            return sparse_kd_forward(logits[None], ids[rows], logprobs[rows], labels,
                                     None if grad is None else grad[None], coefs, *plan.params, plan.backend)
        return sparse_loss

    head = LinearHead(*teacher).first(plan.vocab).in_logits_dtype()
    # One logits buffer serves every chunk: on the CPU, fresh memory for each chunk costs the
    # OS a page-zeroing pass as large as the logits (a fifth of the whole pass at N=4096,
    # V=32000 fp32).
    buffer = head.hidden.new_empty(min(plan.rows, n_rows), plan.vocab)

    def dense_loss(logits, rows, labels, grad, coefs):
        teacher_logits = head.logits_into(buffer[:rows.stop - rows.start], rows)
        return kd_forward(logits[None], teacher_logits[None], labels, None if grad is None else grad[None], coefs,
                          *plan.params, plan.backend)
    return dense_loss


def _accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """acc += grad_logits.T @ hidden, accumulated in acc's dtype (fp32 for fp32 master weights)."""
    if acc.dtype == grad_logits.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    else:  # autocast: the product in low precision, the sum in acc's dtype
        acc.add_(grad_logits.t() @ hidden)


def _chunked_pass(student: LinearHead, teacher: tuple, labels: Optional[Tensor], coefs: Tensor, plan: ChunkPlan,
                  wanted: tuple[bool, bool, bool], row_scale: Optional[Tensor] = None):
    """Per-row divergence and cross-entropy over all chunks, and the student's gradients that are
    wanted (hidden, weight, bias), each row's weighted by row_scale when given."""
    student = student.first(plan.vocab)
    n_rows = student.hidden.shape[0]
    grads = HeadGrads(*(torch.zeros_like(x) if want else None for x, want in zip(student, wanted)))
    student = student.in_logits_dtype()
    chunk_loss = _teacher_loss(teacher, plan, n_rows)
    kd_rows = torch.empty(n_rows, dtype=coefs.dtype, device=student.hidden.device)
    ce_rows = torch.empty_like(kd_rows)
    buffer = student.hidden.new_empty(min(plan.rows, n_rows), plan.vocab)  # reused, as the teacher's
    need_grad = any(wanted)
    for r0 in range(0, n_rows, plan.rows):
        rows = slice(r0, min(n_rows, r0 + plan.rows))
        with torch.no_grad(), torch.autocast(student.hidden.device.type, enabled=False):  # operands cast already
            logits = student.logits_into(buffer[:rows.stop - r0], rows)
            # The kernel writes the logits' gradient over the student logits (ours to reuse).
            grad_logits = logits if need_grad else None
            kd_rows[rows], ce_rows[rows] = chunk_loss(logits, rows, None if labels is None else labels[rows],
                                                      grad_logits, coefs)
            if not need_grad:
                continue
            if row_scale is not None:
                grad_logits.mul_(row_scale[rows, None].to(grad_logits.dtype))
            if grads.hidden is not None:
                grads.hidden[rows] = grad_logits @ student.weight
            if grads.weight is not None:
                _accumulate_weight_grad(grads.weight, grad_logits, student.hidden[rows])
            if grads.bias is not None:
                grads.bias.add_(grad_logits.sum(0, dtype=torch.float32).to(grads.bias.dtype))
    return kd_rows, ce_rows, grads


def _pad_to(grad: Optional[Tensor], full_vocab: int) -> Optional[Tensor]:
    """A gradient of the first rows of a head's weight or bias as one of the whole: rows of the
    lm_head beyond vocab_size get no gradient."""
    if grad is None or grad.shape[0] == full_vocab:
        return grad
    return torch.nn.functional.pad(grad, (0, 0) * (grad.dim() - 1) + (0, full_vocab - grad.shape[0]))


class FusedLinearFunction(torch.autograd.Function):
    """The loss of a student head (hidden, weight, bias: the tensors that get gradients) against a
    teacher (a tuple of tensors the plan's kernel reads). The gradients are computed in forward
    and scaled in backward, except for per-row losses, whose per-row grad_output is only known
    in backward: those chunks are recomputed there."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher: tuple,
                labels: Optional[Tensor], weights: ReductionWeights, expected_grad_output: float, plan: ChunkPlan,
                per_row: bool, loss_name: str):
        student = LinearHead(hidden, weight, bias)
        wanted = tuple(ctx.needs_input_grad[:3])
        device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.plan, ctx.wanted, ctx.per_row, ctx.loss_name = plan, wanted, per_row, loss_name
        ctx.expected_grad_output, ctx.teacher_size = expected_grad_output, len(teacher)
        if per_row:
            kd_rows, ce_rows, _ = _chunked_pass(student, teacher, labels, weights.grad_coefs, plan,
                                                (False, False, False))
            ctx.save_for_backward(*student, labels, weights.grad_coefs, *teacher)
        else:
            kd_rows, ce_rows, grads = _chunked_pass(student, teacher, labels, weights.grad_coefs, plan, wanted)
            ctx.save_for_backward(*grads)
        ctx.full_vocab = weight.shape[0]
        ctx.mark_non_differentiable(kd_rows, ce_rows)
        return weighted_loss(weights.coefs, kd_rows, ce_rows, per_row), kd_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd_rows, _grad_ce_rows):
        start_backward(ctx, ctx.loss_name, once=not ctx.per_row)  # per_row recomputes its chunks
        scale = relative_grad_output(grad_loss, ctx.expected_grad_output)
        if ctx.per_row:
            saved = ctx.saved_tensors
            student, (labels, grad_coefs), teacher = LinearHead(*saved[:3]), saved[3:5], saved[5:]
            enabled, dtype = ctx.autocast
            with torch.autocast(student.hidden.device.type, dtype=dtype, enabled=enabled):
                _, _, grads = _chunked_pass(student, teacher, labels, grad_coefs, ctx.plan, ctx.wanted,
                                            row_scale=scale)
        else:
            grads = HeadGrads(*ctx.saved_tensors)
            for g in grads:  # as rows, for the same in-place scaling kd_loss's gradient gets
                if g is not None:
                    scale_grad_(g.view(1, -1, g.shape[-1]), scale, ctx.plan.backend)
        return (grads.hidden, _pad_to(grads.weight, ctx.full_vocab), _pad_to(grads.bias, ctx.full_vocab),
                None, None, None, None, None, None, None)


def chunk_rows(chunk_size: Optional[int], n_rows: int, vocab: int, dtypes: tuple[torch.dtype, ...],
               device: torch.device) -> int:
    """Rows per chunk: chunk_size when given, else what fits the device's logits budget."""
    return chunk_size or default_chunk_size(n_rows, vocab, max(d.itemsize for d in dtypes), device)
