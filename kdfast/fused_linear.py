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

from typing import Optional

import torch
from torch import Tensor

from .api import LossOptions, ReductionWeights, check_labels, check_same_tokens, check_vocab, loss_options
from .backends import KernelParams, compute_dtype
from .dispatch import resolve_backend
from .ops import kd_forward, scale_grad_, start_backward, weighted_loss

# Bytes of one chunk's student + teacher logits when chunk_size is None. Every chunk reads
# and writes the whole weight gradient once (its V x H accumulation), so on a GPU, where that
# traffic is what small chunks cost (and GEMMs want many rows), chunks are larger: 512 MiB
# is 1024 rows at V = 128256 in bf16, one chunk pair plus a bf16 weight gradient ~1.1 GB.
LOGITS_BUDGET_BYTES = {"cuda": 512 * 2**20}
DEFAULT_LOGITS_BUDGET_BYTES = 128 * 2**20


# The keywords of fused_linear_kd_loss besides the loss options, for the unknown-option error.
FUSED_LINEAR_KEYWORDS = ("student_bias", "teacher_bias", "labels", "chunk_size", "return_parts")


def _check_pair(side: str, hidden, weight, bias) -> None:
    for name, x in ((f"{side}_hidden", hidden), (f"{side}_weight", weight)):
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got "
                            f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    if hidden.dim() < 1:
        raise ValueError(f"{side}_hidden must have shape (..., H), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{side}_weight must have shape (V, {hidden.shape[-1]}) to match {side}_hidden's "
                         f"hidden size, got {tuple(weight.shape)}")
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != weight.shape[:1]):
        raise ValueError(f"{side}_bias must be None or a tensor of shape ({weight.shape[0]},), got "
                         f"{tuple(bias.shape) if isinstance(bias, Tensor) else type(bias).__name__}")
    for name, x in ((f"{side}_weight", weight), (f"{side}_bias", bias)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but {side}_hidden is on {hidden.device}")
    if not torch.is_autocast_enabled(hidden.device.type) and weight.dtype != hidden.dtype:
        raise TypeError(f"{side}_hidden is {hidden.dtype} but {side}_weight is {weight.dtype}: use one dtype, or "
                        "run under torch.autocast")


def _logits_dtype(weight: Tensor) -> torch.dtype:
    device = weight.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def default_chunk_size(n_rows: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Rows per chunk such that one chunk's student and teacher logits fit the device's budget."""
    budget = LOGITS_BUDGET_BYTES.get(device.type, DEFAULT_LOGITS_BUDGET_BYTES)
    rows = max(1, budget // (2 * vocab * itemsize))
    return min(n_rows, max(8, rows // 8 * 8)) if n_rows else 1


def _accumulate_weight_grad(acc: Tensor, grad_logits: Tensor, hidden: Tensor) -> None:
    """acc += grad_logits.T @ hidden, accumulated in acc's dtype (fp32 for fp32 master weights)."""
    if acc.dtype == grad_logits.dtype == hidden.dtype:
        acc.addmm_(grad_logits.t(), hidden)
    else:  # autocast: the product in low precision, the sum in acc's dtype
        acc.add_(grad_logits.t() @ hidden)


def _as_logits_dtype(hidden: Tensor, weight: Tensor, bias: Optional[Tensor]):
    """The operands of one side's logits in the dtype its matmul runs in (autocast's, if on)."""
    dtype = _logits_dtype(weight)
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """hidden @ weight.T + bias, written into out."""
    if bias is None:
        return torch.mm(hidden, weight.t(), out=out)
    return torch.addmm(bias, hidden, weight.t(), out=out)


def _chunked_pass(hs, ws, bs, ht, wt, bt, labels, coefs, params: KernelParams, backend: str, chunk: int,
                  vocab: int, want: tuple[bool, bool, bool], row_scale: Optional[Tensor] = None):
    """Per-row divergence and cross-entropy over all chunks, and the gradients flagged in want
    (hidden, weight, bias), each row's weighted by row_scale when given."""
    n_rows = hs.shape[0]
    grad_h = torch.zeros_like(hs) if want[0] else None
    grad_w = torch.zeros_like(ws[:vocab]) if want[1] else None
    grad_b = torch.zeros_like(bs[:vocab]) if want[2] else None
    hs, ws, bs = _as_logits_dtype(hs, ws[:vocab], None if bs is None else bs[:vocab])
    ht, wt, bt = _as_logits_dtype(ht, wt[:vocab], None if bt is None else bt[:vocab])
    kd_rows = torch.empty(n_rows, dtype=coefs.dtype, device=hs.device)
    ce_rows = torch.empty_like(kd_rows)
    # One pair of logits buffers serves every chunk: on the CPU, fresh memory for each chunk
    # costs the OS a page-zeroing pass as large as the logits (a fifth of the whole pass at
    # N=4096, V=32000 fp32).
    s_buf = hs.new_empty(min(chunk, n_rows), vocab)
    t_buf = ht.new_empty(min(chunk, n_rows), vocab)
    need_grad = any(want)
    for r0 in range(0, n_rows, chunk):
        r1 = min(n_rows, r0 + chunk)
        with torch.no_grad(), torch.autocast(hs.device.type, enabled=False):  # the operands are cast already
            t_logits = _logits_into(t_buf[:r1 - r0], ht[r0:r1], wt, bt)
            s_logits = _logits_into(s_buf[:r1 - r0], hs[r0:r1], ws, bs)
            chunk_labels = None if labels is None else labels[r0:r1]
            # The kernel writes the logits' gradient over the student logits (ours to reuse).
            grad_logits = s_logits if need_grad else None
            kd, ce = kd_forward(s_logits.unsqueeze(0), t_logits.unsqueeze(0), chunk_labels,
                                None if grad_logits is None else grad_logits.unsqueeze(0), coefs,
                                params.temperature, params.divergence, params.beta, params.ignore_index,
                                params.hard, backend)
            kd_rows[r0:r1] = kd
            ce_rows[r0:r1] = ce
            if not need_grad:
                continue
            if row_scale is not None:
                grad_logits.mul_(row_scale[r0:r1, None].to(grad_logits.dtype))
            if grad_h is not None:
                grad_h[r0:r1] = grad_logits @ ws
            if grad_w is not None:
                _accumulate_weight_grad(grad_w, grad_logits, hs[r0:r1])
            if grad_b is not None:
                grad_b += grad_logits.sum(0, dtype=torch.float32).to(grad_b.dtype)
    return kd_rows, ce_rows, (grad_h, grad_w, grad_b)


class FusedLinearKDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, bs, ht, wt, bt, labels, coefs, params: KernelParams, backend: str, chunk: int,
                vocab: int, per_row: bool):
        want = tuple(ctx.needs_input_grad[:3])
        device_type = hs.device.type
        ctx.autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        ctx.setup = (params, backend, chunk, vocab, ws.shape[0], want)
        if per_row:  # the gradient needs the per-row grad_output: recomputed in backward
            kd_rows, ce_rows, _ = _chunked_pass(hs, ws, bs, ht, wt, bt, labels, coefs, params, backend, chunk,
                                                vocab, (False, False, False))
            ctx.save_for_backward(hs, ws, bs, ht, wt, bt, labels, coefs)
        else:
            kd_rows, ce_rows, grads = _chunked_pass(hs, ws, bs, ht, wt, bt, labels, coefs, params, backend,
                                                    chunk, vocab, want)
            ctx.save_for_backward(*grads)
        ctx.per_row = per_row
        ctx.mark_non_differentiable(kd_rows, ce_rows)
        return weighted_loss(coefs, kd_rows, ce_rows, per_row), kd_rows, ce_rows

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd_rows, _grad_ce_rows):
        start_backward(ctx, "fused_linear_kd_loss", once=not ctx.per_row)  # per_row recomputes its chunks
        params, backend, chunk, vocab, full_vocab, want = ctx.setup
        if ctx.per_row:
            hs, ws, bs, ht, wt, bt, labels, coefs = ctx.saved_tensors
            device_type = hs.device.type
            with torch.autocast(device_type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
                _, _, grads = _chunked_pass(hs, ws, bs, ht, wt, bt, labels, coefs, params, backend, chunk, vocab,
                                            want, row_scale=grad_loss)
        else:
            grads = ctx.saved_tensors
            for g in grads:  # as rows, for the same in-place scaling kd_loss's gradient gets
                if g is not None:
                    scale_grad_(g.view(1, -1, g.shape[-1]), grad_loss, backend)
        grad_h, grad_w, grad_b = grads
        if vocab < full_vocab:  # rows of the lm_head beyond vocab_size get no gradient
            grad_w = None if grad_w is None else torch.nn.functional.pad(grad_w, (0, 0, 0, full_vocab - vocab))
            grad_b = None if grad_b is None else torch.nn.functional.pad(grad_b, (0, full_vocab - vocab))
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


def compute_fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias,
                                 teacher_bias, labels, opts: LossOptions, chunk_size: Optional[int],
                                 return_parts: bool = False):
    """fused_linear_kd_loss with validated options: checks the tensors, then runs the chunks."""
    _check_pair("student", student_hidden, student_weight, student_bias)
    _check_pair("teacher", teacher_hidden, teacher_weight, teacher_bias)
    check_same_tokens("student_hidden", student_hidden, "teacher_hidden", teacher_hidden)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int, got {chunk_size!r}")
    vocab = check_vocab(student_weight.shape[0], teacher_weight.shape[0], opts.vocab_size, "student_weight",
                        "teacher_weight")
    lead_shape = student_hidden.shape[:-1]
    device = student_hidden.device
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])
    ht = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    n_rows = hs.shape[0]

    s_dtype, t_dtype = _logits_dtype(student_weight), _logits_dtype(teacher_weight)
    backend = resolve_backend(opts.backend, device, (s_dtype, t_dtype)) if n_rows else "torch"
    itemsize = max(s_dtype.itemsize, t_dtype.itemsize)
    chunk = chunk_size or default_chunk_size(n_rows, vocab, itemsize, device)
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, compute_dtype(s_dtype, t_dtype))
    loss, kd_rows, ce_rows = FusedLinearKDFunction.apply(
        hs, student_weight, student_bias, ht, teacher_weight.detach(),
        None if teacher_bias is None else teacher_bias.detach(), labels, weights.coefs, opts.kernel_params, backend,
        chunk, vocab, opts.reduction == "none")
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def fused_linear_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                         teacher_weight: Tensor, student_bias: Optional[Tensor] = None,
                         teacher_bias: Optional[Tensor] = None, *, labels: Optional[Tensor] = None,
                         chunk_size: Optional[int] = None, return_parts: bool = False, **options):
    """kd_loss(student_hidden @ student_weight.T + student_bias, teacher_hidden @ teacher_weight.T + teacher_bias)
    without materialising the N x V logits.

    Args:
        student_hidden: (..., Hs) last hidden states of the student; gets a gradient.
        student_weight: (V, Hs) the student's lm_head weight; gets a gradient (accumulated in its own
            dtype: fp32 master weights get an fp32 gradient, also under autocast).
        teacher_hidden: (..., Ht) the teacher's last hidden states (same leading shape); no gradient.
        teacher_weight: (V_t, Ht) the teacher's lm_head weight; no gradient. V_t may differ from V
            when ``vocab_size`` says how many leading entries the two vocabularies share.
        student_bias, teacher_bias: optional (V,) and (V_t,) lm_head biases.
        labels: optional (...,) token ids, as in kd_loss (ignore_index rows are not counted).
        chunk_size: tokens per chunk; None picks it so one chunk's logits take about 128 MiB (512 MiB on
            a GPU).
        return_parts: return KDLossParts(loss, kd, hard), the parts detached for logging.
        **options: kd_loss's keywords: temperature, divergence, beta, ignore_index, reduction, scale_t2,
            hard_weight, soft_weight, vocab_size, backend (inplace_backward has no effect: the chunk
            logits are always reused for their gradient).
    """
    return compute_fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                        student_bias, teacher_bias, labels,
                                        loss_options("fused_linear_kd_loss", options, FUSED_LINEAR_KEYWORDS), chunk_size,
                                        return_parts)


class FusedLinearKDLoss(torch.nn.Module):
    """Module form of :func:`fused_linear_kd_loss`; options are validated once, at construction."""

    def __init__(self, *, chunk_size: Optional[int] = None, return_parts: bool = False, **options):
        super().__init__()
        self.options = loss_options("FusedLinearKDLoss", options, ("chunk_size", "return_parts"))
        self.chunk_size = chunk_size
        self.return_parts = return_parts

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None,
                labels: Optional[Tensor] = None):
        return compute_fused_linear_kd_loss(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                            student_bias, teacher_bias, labels, self.options, self.chunk_size,
                                            self.return_parts)
