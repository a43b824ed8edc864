"""Distillation from a sparse teacher: its top-k (or sampled) tokens and their log-probabilities
per position instead of its full logits.

Per row, with p = softmax(student_logits / T) over the whole vocabulary, the teacher is given
at K ids (-1: an empty slot) by log q_k, its log-probabilities at the same temperature. Q is
the teacher's mass on its ids, r = 1 - Q the rest; p_S the student's mass on the ids and p_r
its rest, computed from the exp-sum of the complement (no cancellation however small). How
the rest counts is ``tail``:

- ``"bucket"``: both get one more category holding the rest (r, p_r), and the divergence is
  taken over the K + 1 categories (forward_kl, reverse_kl, jsd). Ids that cover the whole
  vocabulary leave no rest: r = p_r = 0, so K = V is exactly kd_loss. A rest r within the
  rounding of the log-probs' dtype (MASS_TOLERANCE) is none; reverse KL is then infinite
  wherever the student has a rest.
- ``"renorm"``: the teacher renormalised over its ids, q_k / Q; forward_kl only.
- ``"raw"``: the weights as given, no rest term; forward_kl only. The estimator for sampled
  teachers (q_k = count_k / n for n draws), whose gradient is unbiased.

``teacher_topk`` and ``teacher_sample`` make such teachers from logits; ``fused_linear_teacher_topk``
from hidden states and an lm_head, never holding the N x V logits.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .backends import TAIL_CODES, SparseKernelParams, compute_dtype
from .backends.registry import resolve_backend
from .chunked import ChunkPlan, FusedLinearFunction, LinearHead, check_head, chunk_rows, logits_dtype
from .inputs import as_rows, check_inplace, check_labels, check_logits, check_num_items
from .ops import SparseKDFunction, apply_loss
from .options import LossOptions, check_choice, check_positive_int, loss_options
from .reduction import ReductionWeights

TAILS = tuple(TAIL_CODES)
SPARSE_REDUCTIONS = ("batchmean", "sum", "none")
LOGPROB_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
# How far the teacher's mass on its ids may exceed 1, and the rest below which it has none:
# the rounding of log-probabilities stored in each dtype (about 2^-8 relative in bf16).
MASS_TOLERANCE = {torch.float64: 1e-4, torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# Rows per chunk of the teacher_* helpers, whose float32 log-softmax is the only N x V-sized temporary.
CAPTURE_CHUNK_ELEMENTS = 1 << 24


def check_sparse_options(opts: LossOptions, tail: str) -> None:
    check_choice("tail", tail, TAILS)
    check_choice("reduction", opts.reduction, SPARSE_REDUCTIONS)
    if opts.vocab_size is not None:
        raise ValueError("vocab_size does not apply to a sparse teacher: its ids say which tokens it covers")
    if opts.divergence == "tvd":
        raise ValueError("divergence='tvd' is not supported by the sparse losses: use 'forward_kl', 'reverse_kl' "
                         "or 'jsd', or kd_loss / fused_linear_kd_loss with the teacher's logits")
    for name in ("softcap", "logit_scale"):
        value = getattr(opts, name)
        if value is not None and value[1] is not None and value[1] != value[0]:
            raise ValueError(f"{name} for the teacher does not apply to a sparse teacher: its log-probabilities are "
                             f"taken as given (capture them from the teacher's own logits); give "
                             f"{name}=(student, None) "
                             f"or one number, which transforms the student's logits, got {name}={value!r}")
    if opts.teacher_temperature is not None:
        raise ValueError("teacher_temperature does not apply to a sparse teacher: its log-probabilities are taken "
                         "as given (capture them at the temperature wanted, e.g. teacher_topk(..., temperature=T))")
    if tail != "bucket" and opts.divergence != "forward_kl":
        raise ValueError(f"tail={tail!r} is defined for divergence='forward_kl' only, got "
                         f"divergence={opts.divergence!r}; use tail='bucket' for other divergences")


def _first_bad_row(bad: Tensor) -> int:
    return int(bad.nonzero()[0, 0])


def check_sparse_teacher(ids, logprobs, lead_shape: torch.Size, vocab: int, device: torch.device):
    """(ids, log-probs) as contiguous (N, K) tensors and the mass tolerance of their dtype, after
    checking them: on the CPU their values too (ids in [-1, V), none repeated in a row, log-probs
    at most 0 and summing to at most 1, within the tolerance). On a GPU those checks would wait
    for the device; there a row with an id outside [-1, V) gets a NaN loss instead."""
    if not isinstance(ids, Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"teacher_ids must be an int64 or int32 tensor of token ids, got "
                        f"{ids.dtype if isinstance(ids, Tensor) else type(ids).__name__}")
    if not isinstance(logprobs, Tensor) or logprobs.dtype not in LOGPROB_DTYPES:
        raise TypeError(f"teacher_logprobs must be a float32, bfloat16 or float16 tensor of log-probabilities, got "
                        f"{logprobs.dtype if isinstance(logprobs, Tensor) else type(logprobs).__name__}")
    if ids.shape != logprobs.shape:
        raise ValueError(f"teacher_ids has shape {tuple(ids.shape)} and teacher_logprobs {tuple(logprobs.shape)}: "
                         "they must match, one log-probability per id")
    if ids.dim() < 1 or ids.shape[:-1] != lead_shape:
        raise ValueError(f"teacher_ids must have shape {(*lead_shape, 'K')} (the student's leading shape, then "
                         f"K ids per position), got {tuple(ids.shape)}")
    if ids.shape[-1] == 0:
        raise ValueError("teacher_ids has K = 0 ids per position: a sparse teacher needs at least one")
    for name, x in (("teacher_ids", ids), ("teacher_logprobs", logprobs)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but student_logits is on {device}")
    k = ids.shape[-1]
    ids, logprobs = ids.reshape(-1, k).contiguous(), logprobs.reshape(-1, k).contiguous()
    tolerance = MASS_TOLERANCE[logprobs.dtype]
    if device.type == "cpu" and not torch.compiler.is_compiling() and ids.numel():
        _check_teacher_values(ids, logprobs, vocab, tolerance)
    return ids, logprobs, tolerance


CHECK_ROWS = 256  # rows checked at a time: the checks' temporaries stay small next to the gradient


def _check_teacher_values(ids: Tensor, logprobs: Tensor, vocab: int, tolerance: float) -> None:
    for start in range(0, ids.shape[0], CHECK_ROWS):
        _check_teacher_rows(ids[start:start + CHECK_ROWS], logprobs[start:start + CHECK_ROWS], vocab, tolerance,
                            start)


def _check_teacher_rows(ids: Tensor, logprobs: Tensor, vocab: int, tolerance: float, first_row: int) -> None:
    """The checks of _check_teacher_values on a block of rows; errors name the row in the whole call."""
    out_of_range = (ids < -1) | (ids >= vocab)
    if out_of_range.any():
        i = _first_bad_row(out_of_range.any(-1))
        raise ValueError(f"teacher_ids must lie in [0, {vocab}) or be -1 (an empty slot); found "
                         f"{int(ids[i][out_of_range[i]][0])} in row {first_row + i}")
    ordered = ids.sort(-1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    if repeated.any():
        i = _first_bad_row(repeated.any(-1))
        raise ValueError(f"teacher_ids repeats id {int(ordered[i, 1:][repeated[i]][0])} in row {first_row + i}: "
                         "each id may appear once per row (teacher_sample merges repeated draws into counts)")
    lp = torch.where(ids >= 0, logprobs.double(), -math.inf)
    if torch.isnan(lp).any():
        raise ValueError(f"teacher_logprobs holds NaN in row {first_row + _first_bad_row(torch.isnan(lp).any(-1))}")
    if (lp > tolerance).any():
        i = _first_bad_row((lp > tolerance).any(-1))
        raise ValueError(f"teacher_logprobs must be log-probabilities (<= 0); found {float(lp[i].max()):.4g} in "
                         f"row {first_row + i}: for logits pass log_softmax(teacher_logits / T) at the ids "
                         "(teacher_topk)")
    mass = lp.exp().sum(-1)
    if (mass > 1 + tolerance).any():
        i = _first_bad_row(mass > 1 + tolerance)
        raise ValueError(f"the teacher's probabilities in row {first_row + i} sum to {float(mass[i]):.6g}, exceeding "
                         f"1 by {float(mass[i]) - 1:.3g} (tolerance {tolerance:g} for {logprobs.dtype}): are the "
                         "log-probabilities at the loss's temperature, and the ids unique?")


def _sparse_kd_loss_with_options(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor,
                                 labels: Optional[Tensor], opts: LossOptions, tail: str, return_parts: bool,
                                 num_items_in_batch):
    check_sparse_options(opts, tail)
    check_logits("student_logits", student_logits)
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension (V=0)")
    lead_shape, device = student_logits.shape[:-1], student_logits.device
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    ids, logprobs, tolerance = check_sparse_teacher(teacher_ids, teacher_logprobs, lead_shape, vocab, device)
    (student,) = as_rows(student_logits)
    n_rows = student.shape[0] * student.shape[1]
    backend = resolve_backend(opts.backend, device, (student.dtype, logprobs.dtype), "sparse_kd_forward") \
        if n_rows else "torch"
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, compute_dtype(student.dtype, logprobs.dtype),
                                  num_items_in_batch)
    inplace = opts.inplace_backward and student.requires_grad and torch.is_grad_enabled()
    if inplace:
        check_inplace(student_logits, student, logprobs)
    loss, kd_rows, ce_rows = apply_loss(SparseKDFunction, student, ids, logprobs, labels, weights,
                                        opts.expected_grad_output, sparse_params(opts, tail, tolerance),
                                        backend, opts.reduction == "none", inplace)
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def sparse_params(opts: LossOptions, tail: str, mass_tolerance: float) -> SparseKernelParams:
    dense = opts.kernel_params
    return SparseKernelParams(dense.temperature, dense.divergence, dense.beta, TAIL_CODES[tail], mass_tolerance,
                              dense.ignore_index, dense.hard, dense.student_scale, dense.student_cap)


def sparse_kd_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                   temperature: float = 1.0, divergence: str = "forward_kl", beta: float = 0.5, tail: str = "bucket",
                   labels: Optional[Tensor] = None, ignore_index: int = -100, reduction: str = "batchmean",
                   scale_t2: bool = True, hard_weight: float = 0.0, soft_weight: float = 1.0,
                   num_items_in_batch=None, inplace_backward: bool = False, expected_grad_output: float = 1.0,
                   softcap=None, logit_scale=None, return_parts: bool = False, backend: str = "auto"):
    """The distillation loss against a sparse teacher: K token ids and their log-probabilities per
    position (see the module's docstring for the tails).

    Args:
        student_logits: (..., V) logits; the tensor that gets a gradient.
        teacher_ids: (..., K) int64 or int32 ids: the teacher's top-k, tokens sampled from it, or any
            support of the caller's choosing; -1 marks an empty slot (rows may hold fewer than K).
        teacher_logprobs: (..., K) float32/bfloat16/float16 log-probabilities of those ids under the
            teacher at the same temperature T.
        tail: "bucket", "renorm" or "raw" (the last two with forward_kl only).
        softcap, logit_scale: the student's logit transforms (one number, or (student, None)); the
            teacher's log-probabilities are taken as given, so a teacher entry is refused.
        Every other argument means what it means in kd_loss; reduction is "batchmean", "sum" or "none".

    Returns:
        A float32 scalar, or per-row losses of shape (...) for reduction="none".
    """
    opts = LossOptions(temperature=temperature, divergence=divergence, beta=beta, ignore_index=ignore_index,
                       reduction=reduction, scale_t2=scale_t2, hard_weight=hard_weight, soft_weight=soft_weight,
                       inplace_backward=inplace_backward, expected_grad_output=expected_grad_output,
                       softcap=softcap, logit_scale=logit_scale, backend=backend)
    return _sparse_kd_loss_with_options(student_logits, teacher_ids, teacher_logprobs, labels, opts, tail,
                                        return_parts, num_items_in_batch)


# The keywords of fused_linear_sparse_kd_loss besides the loss options, for the unknown-option error.
FUSED_LINEAR_SPARSE_KEYWORDS = ("student_bias", "labels", "chunk_size", "tail", "num_items_in_batch",
                                "return_parts")


def fused_linear_sparse_kd_loss(student_hidden: Tensor, student_weight: Tensor, teacher_ids: Tensor,
                                teacher_logprobs: Tensor, *, student_bias: Optional[Tensor] = None,
                                labels: Optional[Tensor] = None, chunk_size: Optional[int] = None,
                                tail: str = "bucket", num_items_in_batch=None, return_parts: bool = False,
                                **options):
    """sparse_kd_loss(student_hidden @ student_weight.T + student_bias, teacher_ids, teacher_logprobs)
    without the N x V logits: the student's logits a chunk of tokens at a time (see kdfast.chunked),
    with gradients for the hidden states, weight and bias. No teacher and no logits at all.

    ``**options`` are sparse_kd_loss's keywords (temperature, divergence, beta, ignore_index,
    reduction, scale_t2, hard_weight, soft_weight, expected_grad_output, softcap and logit_scale of the
    student's head, backend).
    """
    opts = loss_options("fused_linear_sparse_kd_loss", options, FUSED_LINEAR_SPARSE_KEYWORDS)
    check_sparse_options(opts, tail)
    student = LinearHead(student_hidden, student_weight, student_bias)
    check_head("student", student)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    lead_shape, device = student_hidden.shape[:-1], student_hidden.device
    vocab = student_weight.shape[0]
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    ids, logprobs, tolerance = check_sparse_teacher(teacher_ids, teacher_logprobs, lead_shape, vocab, device)
    student = student._replace(hidden=student_hidden.reshape(-1, student_hidden.shape[-1]))
    n_rows = student.hidden.shape[0]
    dtypes = (logits_dtype(student.weight), logprobs.dtype)
    backend = resolve_backend(opts.backend, device, dtypes, "sparse_kd_forward") if n_rows else "torch"
    plan = ChunkPlan(chunk_rows(chunk_size, n_rows, vocab, dtypes[:1], device), vocab, backend,
                     sparse_params(opts, tail, tolerance))
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, compute_dtype(*dtypes), num_items_in_batch)
    loss, kd_rows, ce_rows = apply_loss(FusedLinearFunction, *student, (ids, logprobs), labels, weights,
                                        opts.expected_grad_output, plan, opts.reduction == "none",
                                        "fused_linear_sparse_kd_loss")
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


# --- capture: sparse teachers from logits ---

def _check_capture(logits, count: int, count_name: str, temperature: float) -> float:
    check_logits("teacher_logits", logits)
    check_positive_int(count_name, count)
    return LossOptions(temperature=temperature).temperature


def _row_chunks(n_rows: int, vocab: int):
    step = max(1, CAPTURE_CHUNK_ELEMENTS // max(vocab, 1))
    return (slice(r0, min(n_rows, r0 + step)) for r0 in range(0, n_rows, step))


@torch.no_grad()
def teacher_topk(teacher_logits: Tensor, k: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """The teacher's k most likely tokens per position and their log-probabilities at temperature T:
    (ids int64, log-probs float32), each of shape (..., k), most likely first. Rows are processed
    in chunks, so no N x V float32 copy of the logits is made."""
    temperature = _check_capture(teacher_logits, k, "k", temperature)
    lead_shape, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    if k > vocab:
        raise ValueError(f"k={k} exceeds the vocabulary of teacher_logits (V={vocab})")
    rows = teacher_logits.reshape(-1, vocab)
    ids = torch.empty(rows.shape[0], k, dtype=torch.int64, device=rows.device)
    logprobs = torch.empty(rows.shape[0], k, dtype=torch.float32, device=rows.device)
    for chunk in _row_chunks(rows.shape[0], vocab):
        log_p = torch.log_softmax(rows[chunk].float() / temperature, dim=-1)
        logprobs[chunk], ids[chunk] = log_p.topk(k, dim=-1)
    return ids.view(*lead_shape, k), logprobs.view(*lead_shape, k)


@torch.no_grad()
def fused_linear_teacher_topk(teacher_hidden: Tensor, teacher_weight: Tensor, k: int, *,
                              teacher_bias: Optional[Tensor] = None, temperature: float = 1.0,
                              chunk_size: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """teacher_topk(teacher_hidden @ teacher_weight.T + teacher_bias, k, temperature), a chunk of
    tokens at a time: the teacher's N x V logits are never held."""
    head = LinearHead(teacher_hidden, teacher_weight, teacher_bias)
    check_head("teacher", head)
    check_positive_int("chunk_size", chunk_size, allow_none=True)
    lead_shape, vocab = teacher_hidden.shape[:-1], teacher_weight.shape[0]
    head = head._replace(hidden=teacher_hidden.reshape(-1, teacher_hidden.shape[-1])).in_logits_dtype()
    n_rows = head.hidden.shape[0]
    rows_per_chunk = chunk_rows(chunk_size, n_rows, vocab, (head.weight.dtype,), teacher_hidden.device)
    buffer = head.hidden.new_empty(min(rows_per_chunk, n_rows), vocab)
    ids, logprobs = [], []
    for r0 in range(0, n_rows, rows_per_chunk):
        rows = slice(r0, min(n_rows, r0 + rows_per_chunk))
        chunk_ids, chunk_logprobs = teacher_topk(head.logits_into(buffer[:rows.stop - r0], rows), k, temperature)
        ids.append(chunk_ids)
        logprobs.append(chunk_logprobs)
    if not ids:  # no tokens
        return teacher_topk(buffer[:0], k, temperature)
    return torch.cat(ids).view(*lead_shape, k), torch.cat(logprobs).view(*lead_shape, k)


@torch.no_grad()
def teacher_sample(teacher_logits: Tensor, n: int, temperature: float = 1.0,
                   generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
    """n tokens drawn per position from softmax(teacher_logits / T), with replacement, as a sparse
    teacher for ``tail="raw"``: (ids int64, log(count / n) float32), each (..., n); the distinct
    tokens first (in increasing id order), then empty slots (id -1, log-weight -inf). With these
    weights the forward-KL gradient is an unbiased estimate of the full-logit one."""
    temperature = _check_capture(teacher_logits, n, "n", temperature)
    lead_shape, vocab = teacher_logits.shape[:-1], teacher_logits.shape[-1]
    rows = teacher_logits.reshape(-1, vocab)
    ids = torch.full((rows.shape[0], n), -1, dtype=torch.int64, device=rows.device)
    weights = torch.full((rows.shape[0], n), -math.inf, dtype=torch.float32, device=rows.device)
    for chunk in _row_chunks(rows.shape[0], vocab):
        probs = torch.softmax(rows[chunk].float() / temperature, dim=-1)
        draws = torch.multinomial(probs, n, replacement=True, generator=generator).sort(-1).values
        first = torch.ones_like(draws, dtype=torch.bool)
        first[:, 1:] = draws[:, 1:] != draws[:, :-1]
        # Each distinct draw's count = the distance to the next distinct one; distinct draws go first.
        starts = torch.where(first, torch.arange(n, device=draws.device), n)
        order = starts.sort(-1)
        ends = torch.cat([order.values[:, 1:], torch.full_like(order.values[:, :1], n)], -1)
        counts = (ends - order.values).clamp(min=0)
        distinct = order.values < n
        ids[chunk] = torch.where(distinct, draws.gather(-1, order.values.clamp(max=n - 1)), -1)
        weights[chunk] = torch.where(distinct, (counts.float() / n).log(), -math.inf)
    return ids.view(*lead_shape, n), weights.view(*lead_shape, n)


class SparseKDLoss(torch.nn.Module):
    """Module form of :func:`sparse_kd_loss`: ``SparseKDLoss(tail="bucket", temperature=2.0)(logits, ids, logprobs)``."""

    def __init__(self, *, tail: str = "bucket", return_parts: bool = False, **options):
        super().__init__()
        self.options = loss_options("SparseKDLoss", options, ("tail", "return_parts"))
        check_sparse_options(self.options, tail)
        self.tail, self.return_parts = tail, return_parts

    def forward(self, student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                labels: Optional[Tensor] = None, num_items_in_batch=None):
        return _sparse_kd_loss_with_options(student_logits, teacher_ids, teacher_logprobs, labels, self.options,
                                            self.tail, self.return_parts, num_items_in_batch)
