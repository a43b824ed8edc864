"""Fused linear KD loss: hidden states and lm_head weights in, loss out, no N x V logits kept.

Tokens are processed in chunks. For each chunk the student and teacher logits are
computed (the teacher's without autograd), the fused kernel writes the logits' gradient
over the student logits of the chunk, and that gradient is multiplied into the gradients
of the hidden states, weight and bias straight away; the chunk's logits are then freed.
Peak extra memory is one chunk of logits (both sides) plus the gradients the caller needs.

The gradients are computed during the forward pass (as kd_loss does) and scaled by the
incoming grad_output in backward, except for reduction="none", whose per-row
grad_output is only known in backward: there the chunks are recomputed in backward.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .backends import KernelParams, compute_dtype
from .backends.registry import resolve_backend
from .inputs import check_labels, check_num_items, check_same_tokens, check_vocab
from .ops import kd_forward, relative_grad_output, scale_grad_, start_backward
from .options import LossOptions, check_positive_int, loss_options
from .reduction import ReductionWeights, weighted_loss

# Bytes of one chunk's student + teacher logits when chunk_size is None. Every chunk reads
# and writes the whole weight gradient once (its V x H accumulation), so on a GPU, where that
# traffic is what small chunks cost (and GEMMs want many rows), chunks are larger: 512 MiB
# is 1024 rows at V = 128256 in bf16, one chunk pair plus a bf16 weight gradient ~1.1 GB.
LOGITS_BUDGET_BYTES = {"cuda": 512 * 2**20}
DEFAULT_LOGITS_BUDGET_BYTES = 128 * 2**20


# The keywords of fused_linear_kd_loss besides the loss options, for the unknown-option error.
FUSED_LINEAR_KEYWORDS = ("student_bias", "teacher_bias", "labels", "chunk_size", "num_items_in_batch",
                         "return_parts")


def _logits_dtype(weight: Tensor) -> torch.dtype:
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
        dtype = _logits_dtype(self.weight)
        return LinearHead(*(None if x is None else x.to(dtype) for x in self))

    def logits_into(self, out: Tensor, rows: slice) -> Tensor:
        """hidden[rows] @ weight.T + bias, written into out."""
        if self.bias is None:
            return torch.mm(self.hidden[rows], self.weight.t(), out=out)
        return torch.addmm(self.bias, self.hidden[rows], self.weight.t(), out=out)


def _check_head(side: str, head: LinearHead) -> None:
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
    params: KernelParams


def _accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """acc += grad_logits.T @ hidden, accumulated in acc's dtype (fp32 for fp32 master weights)."""
    if acc.dtype == grad_logits.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    else:  # autocast: the product in low precision, the sum in acc's dtype
        acc.add_(grad_logits.t() @ hidden)


def _chunked_pass(student: LinearHead, teacher: LinearHead, labels: Optional[Tensor], coefs: Tensor,
                  plan: ChunkPlan, wanted: tuple[bool, bool, bool], row_scale: Optional[Tensor] = None):
    """Per-row divergence and cross-entropy over all chunks, and the student's gradients that are
    wanted (hidden, weight, bias), each row's weighted by row_scale when given."""
    student, teacher = student.first(plan.vocab), teacher.first(plan.vocab)
    n_rows = student.hidden.shape[0]
    grads = HeadGrads(*(torch.zeros_like(x) if want else None for x, want in zip(student, wanted)))
    student, teacher = student.in_logits_dtype(), teacher.in_logits_dtype()
    kd_rows = torch.empty(n_rows, dtype=coefs.dtype, device=student.hidden.device)
    ce_rows = torch.empty_like(kd_rows)
    # One pair of logits buffers serves every chunk: on the CPU, fresh memory for each chunk
    # costs the OS a page-zeroing pass as large as the logits (a fifth of the whole pass at
    # N=4096, V=32000 fp32).
    s_buf = student.hidden.new_empty(min(plan.rows, n_rows), plan.vocab)
    t_buf = teacher.hidden.new_empty(min(plan.rows, n_rows), plan.vocab)
    need_grad = any(wanted)
    params = plan.params
    for r0 in range(0, n_rows, plan.rows):
        rows = slice(r0, min(n_rows, r0 + plan.rows))
        with torch.no_grad(), torch.autocast(student.hidden.device.type, enabled=False):  # operands cast already
            t_logits = teacher.logits_into(t_buf[:rows.stop - r0], rows)
            s_logits = student.logits_into(s_buf[:rows.stop - r0], rows)
            # The kernel writes the logits' gradient over the student logits (ours to reuse).
            grad_logits = s_logits if need_grad else None
            kd_rows[rows], ce_rows[rows] = kd_forward(
                s_logits.unsqueeze(0), t_logits.unsqueeze(0), None if labels is None else labels[rows],
                None if grad_logits is None else grad_logits.unsqueeze(0), coefs, params.temperature,
                params.divergence, params.beta, params.ignore_index, params.hard, plan.backend)
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


class FusedLinearKDFunction(torch.autograd.Function):
    """The loss of a student head (hidden, weight, bias: the tensors that get gradients) against
    a teacher head. The gradients are computed in forward and scaled in backward, except for
    per-row losses, whose per-row grad_output is only known in backward: those chunks are
    recomputed there."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], teacher: LinearHead,
                labels: Optional[Tensor], weights: ReductionWeights, expected_grad_output: float, plan: ChunkPlan,
                per_row: bool):
        student = LinearHead(hidden, weight, bias)
        wanted = tuple(ctx.needs_input_grad[:3])
        device_type = hidden.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.plan, ctx.wanted, ctx.per_row = plan, wanted, per_row
        ctx.expected_grad_output = expected_grad_output
        if per_row:
            kd_rows, ce_rows, _ = _chunked_pass(student, teacher, labels, weights.grad_coefs, plan,
                                                (False, False, False))
            ctx.save_for_backward(*student, *teacher, labels, weights.grad_coefs)
        else:
            kd_rows, ce_rows, grads = _chunked_pass(student, teacher, labels, weights.grad_coefs, plan, wanted)
            ctx.save_for_backward(*grads)
        ctx.full_vocab = weight.shape[0]
        ctx.mark_non_differentiable(kd_rows, ce_rows)
        return weighted_loss(weights.coefs, kd_rows, ce_rows, per_row), kd_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd_rows, _grad_ce_rows):
        start_backward(ctx, "fused_linear_kd_loss", once=not ctx.per_row)  # per_row recomputes its chunks
        if ctx.per_row:
            saved = ctx.saved_tensors
            student, teacher, (labels, grad_coefs) = LinearHead(*saved[:3]), LinearHead(*saved[3:6]), saved[6:]
            enabled, dtype = ctx.autocast
            with torch.autocast(student.hidden.device.type, dtype=dtype, enabled=enabled):
                _, _, grads = _chunked_pass(student, teacher, labels, grad_coefs, ctx.plan, ctx.wanted,
                                            row_scale=relative_grad_output(grad_loss, ctx.expected_grad_output))
        else:
            grads = HeadGrads(*ctx.saved_tensors)
            scale = relative_grad_output(grad_loss, ctx.expected_grad_output)
            for g in grads:  # as rows, for the same in-place scaling kd_loss's gradient gets
                if g is not None:
                    scale_grad_(g.view(1, -1, g.shape[-1]), scale, ctx.plan.backend)
        return grads.hidden, _pad_to(grads.weight, ctx.full_vocab), _pad_to(grads.bias, ctx.full_vocab), \
            None, None, None, None, None, None


def _fused_linear_kd_loss_with_options(student: LinearHead, teacher: LinearHead, labels: Optional[Tensor],
                                       opts: LossOptions, chunk_size: Optional[int], return_parts: bool = False,
                                       num_items_in_batch=None):
    """fused_linear_kd_loss once its options are validated: checks the tensors, then runs the chunks."""
    _check_head("student", student)
    _check_head("teacher", teacher)
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

    s_dtype, t_dtype = _logits_dtype(student.weight), _logits_dtype(teacher.weight)
    backend = resolve_backend(opts.backend, device, (s_dtype, t_dtype)) if n_rows else "torch"
    rows = chunk_size or default_chunk_size(n_rows, vocab, max(s_dtype.itemsize, t_dtype.itemsize), device)
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, compute_dtype(s_dtype, t_dtype),
                                  num_items_in_batch)
    loss, kd_rows, ce_rows = FusedLinearKDFunction.apply(
        *student, teacher, labels, weights, opts.expected_grad_output,
        ChunkPlan(rows, vocab, backend, opts.kernel_params), opts.reduction == "none")
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
        **options: kd_loss's keywords: temperature, divergence, beta, ignore_index, reduction, scale_t2,
            hard_weight, soft_weight, vocab_size, expected_grad_output, backend (inplace_backward has no
            effect: the chunk logits are always reused for their gradient).
    """
    return _fused_linear_kd_loss_with_options(
        LinearHead(student_hidden, student_weight, student_bias), LinearHead(teacher_hidden, teacher_weight, teacher_bias),
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


# Transitional name for kdfast.lm until the training stack moves onto the public API.
def compute_fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                 teacher_bias, labels, opts, chunk_size, return_parts=False):
    return _fused_linear_kd_loss_with_options(LinearHead(student_hidden, student_weight, student_bias),
                                              LinearHead(teacher_hidden, teacher_weight, teacher_bias), labels,
                                              opts, chunk_size, return_parts)
