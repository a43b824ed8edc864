"""The vocabulary-parallel KD loss: :func:`vocab_parallel_kd_loss`, for logits sharded along the
vocabulary (tensor-parallel lm_heads, Megatron-style).

Each rank holds a contiguous slice of every row's columns. The softmax of a row needs its
normaliser over all slices, so each rank reduces its slice to a few per-row scalars (its
maximum, its sum of exponentials, the divergence's weighted sums), and the ranks exchange
only those, with torch.distributed collectives (all_gather of one float64 tensor per call).
The gradient of each slice is computed during the forward pass, as kd_loss does, so backward
needs no communication.

Collectives per forward call (none in backward):

- forward_kl and reverse_kl: 1 (the normalisers and the divergence's sums travel together,
  with the ranks' widths); 2 with hard_weight > 0 (the label's logit, known only once the
  offsets are, travels in the second).
- jsd with 0 < beta < 1: 2, with or without hard labels: the mixture m = beta p_t + (1 - beta) p_s
  needs both global normalisers before its terms can be summed; the label's logit travels
  with those sums.

The per-shard work is plain torch ops over chunks of rows (no fused kernel yet): one pass over
the slice for the statistics, one for the gradient (and one more for jsd's mixture sums). The
widths are read on the host after the first collective: one device sync per call on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import FORWARD_KL, JSD, REVERSE_KL, compute_dtype, jsd_weights
from .backends.torch_fallback import CHUNK_ELEMENTS, jsd_log_ratios
from .inputs import as_rows, check_inplace, check_labels, check_logits, check_num_items, check_same_tokens
from .ops import GradientInForward, gradient_buffer
from .options import LossOptions, loss_options
from .reduction import ReductionWeights

__all__ = ["vocab_parallel_kd_loss"]

NAME = "vocab_parallel_kd_loss"
# The options whose every value is supported; any other option of LossOptions is accepted only at
# its default (vocab_size is refused outright: the slices are the vocabulary).
SUPPORTED_OPTIONS = ("temperature", "divergence", "beta", "ignore_index", "reduction", "scale_t2", "hard_weight",
                     "soft_weight", "inplace_backward", "expected_grad_output", "backend")
SUPPORTED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
SUPPORTED_BACKENDS = ("auto", "torch")


def _check_options(opts: LossOptions, given: dict) -> None:
    if "vocab_size" in given:
        raise ValueError(f"{NAME}() does not take vocab_size: each rank's slice is its part of the vocabulary, "
                         "and the vocabulary is their concatenation; slice off padding columns before the call")
    unsupported = [f"{f.name}={getattr(opts, f.name)!r}" for f in fields(LossOptions)
                   if f.name not in SUPPORTED_OPTIONS and getattr(opts, f.name) != f.default]
    if unsupported:
        raise ValueError(f"{NAME}() does not support {', '.join(unsupported)} (it supports "
                         f"{', '.join(SUPPORTED_OPTIONS)})")
    if opts.divergence not in SUPPORTED_DIVERGENCES:
        raise ValueError(f"{NAME}() does not support divergence={opts.divergence!r} (it supports "
                         f"{', '.join(map(repr, SUPPORTED_DIVERGENCES))})")
    if opts.backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"{NAME}() runs its per-shard work with torch ops, not a fused kernel: backend must be "
                         f"'auto' or 'torch', got {opts.backend!r}")


def _group_rank(group) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{NAME}() needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{NAME}() was called on global rank {dist.get_rank()}, which is not a member of group")
    return rank, dist.get_world_size(group)


def _gather(local: Tensor, world: int, group) -> Tensor:
    """(world, *local.shape): every rank's tensor, in group-rank order, in one collective."""
    out = local.new_empty(world * local.numel())  # gloo takes the concatenated form only
    dist.all_gather_single(out, local.reshape(-1), group=group)
    return out.view(world, *local.shape)


def _chunks(n_batch: int, n_rows: int, vocab: int):
    """(b, m0, m1, r0, r1): the (B, M, V) rows walked a chunk at a time; r0:r1 in flat rows."""
    step = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for b in range(n_batch):
        for m0 in range(0, n_rows, step):
            m1 = min(n_rows, m0 + step)
            yield b, m0, m1, b * n_rows + m0, b * n_rows + m1


def _weighted_sum(weight: Tensor, values: Tensor) -> Tensor:
    """sum(weight * values) over the last dim in float64, with 0 * inf = 0 (0 log 0 = 0)."""
    return (weight * values).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1, dtype=torch.float64)


def _centred(x: Tensor, row_max: Tensor, scale: float) -> Tensor:
    """(x - max) * scale per row; a slice that is all -inf is shifted by 0 (it stays -inf)."""
    shift = torch.where(row_max == -math.inf, 0.0, row_max)
    return (x - shift[:, None]).mul_(scale)


class _Stats:
    """Per-row statistics of this rank's slice, in float64: the rows of the first collective."""

    def __init__(self, opts: LossOptions, code: int, hard: bool):
        self.opts, self.code = opts, code
        self.names = ["max_s", "max_t", "sum_s", "sum_t"]
        if hard and opts.temperature != 1.0:
            self.names.append("sum_s1")  # the hard-label softmax is at T = 1
        if code in (FORWARD_KL, REVERSE_KL):
            self.names.append("cross")  # sum of exp * (log-ratio) on the slice

    def local(self, s: Tensor, t: Tensor) -> list[Tensor]:
        """The statistics of a (rows, width) chunk of this rank's slice, width possibly 0."""
        inv_temp = 1.0 / self.opts.temperature
        if s.shape[-1] == 0:
            empty = torch.full((s.shape[0],), -math.inf, dtype=torch.float64, device=s.device)
            return [empty, empty] + [torch.zeros_like(empty)] * (len(self.names) - 2)
        max_s, max_t = s.amax(-1), t.amax(-1)
        v, u = _centred(s, max_s, inv_temp), _centred(t, max_t, inv_temp)
        ev, eu = v.exp(), u.exp()
        out = [max_s.double(), max_t.double(), ev.sum(-1, dtype=torch.float64), eu.sum(-1, dtype=torch.float64)]
        if "sum_s1" in self.names:
            out.append(_centred(s, max_s, 1.0).exp_().sum(-1, dtype=torch.float64))
        if self.code == FORWARD_KL:
            out.append(_weighted_sum(eu, u - v))
        elif self.code == REVERSE_KL:
            out.append(_weighted_sum(ev, v - u))
        return out


class _Global:
    """The rows' global normalisers, from every rank's statistics (world, rows) in float64."""

    def __init__(self, stats: _Stats, gathered: Tensor, temperature: float):
        self.g = g = dict(zip(stats.names, gathered.unbind(1)))
        inv_temp = 1.0 / temperature
        self.max_s, self.max_t = g["max_s"].amax(0), g["max_t"].amax(0)  # NaN propagates: undefined rows
        self.undefined = ~(torch.isfinite(self.max_s) & torch.isfinite(self.max_t))
        # log p_j = (x_j - max_k) / T - c_k on slice k, with c_k = (max - max_k) / T + log Z.
        self.c_s, self.log_z_s = self._offsets(g["max_s"], self.max_s, g["sum_s"], inv_temp)
        self.c_t, _ = self._offsets(g["max_t"], self.max_t, g["sum_t"], inv_temp)
        # The hard labels' softmax at T = 1 (the one at T when T = 1).
        self.c_s1, self.log_z_s1 = (self._offsets(g["max_s"], self.max_s, g["sum_s1"], 1.0) if "sum_s1" in g
                                    else (self.c_s, self.log_z_s))

    @staticmethod
    def _offsets(slice_max: Tensor, row_max: Tensor, slice_sum: Tensor, inv_temp: float) -> tuple[Tensor, Tensor]:
        """(c_k per slice, log Z) for sums of exp((x - max_k) * inv_temp); an all -inf slice has c_k = inf."""
        shift = torch.where(slice_max == -math.inf, 0.0, slice_max)
        log_z = (slice_sum * ((slice_max - row_max) * inv_temp).exp()).sum(0).log()
        return (row_max - shift) * inv_temp + log_z, log_z

    def kl_from_cross(self, c_p: Tensor, c_q: Tensor, sums_p: Tensor) -> Tensor:
        """KL(p || q) per row from each slice's cross = sum e^x (x - y), x and y the centred, scaled
        logits of p and q: on slice k, sum p (log p - log q) = e^-cp_k cross_k + P_k (cq_k - cp_k),
        P_k = e^-cp_k sums_p_k its mass. A slice with no mass of p (or less than float64 holds)
        adds nothing, as 0 log 0 = 0 elementwise."""
        mass = (-c_p).exp()
        slice_mass = mass * sums_p
        terms = mass * self.g["cross"] + slice_mass * (c_q - c_p)
        return torch.where(slice_mass > 0, terms, 0.0).sum(0)


def _log_probs(s: Tensor, t: Tensor, glob: _Global, rank: int, r0: int, r1: int, inv_temp: float):
    """log p_s and log p_t on this rank's chunk of rows r0:r1, from the global offsets."""
    dtype = s.dtype
    log_ps = _centred(s, glob.g["max_s"][rank, r0:r1].to(dtype), inv_temp).sub_(glob.c_s[rank, r0:r1, None].to(dtype))
    log_pt = _centred(t, glob.g["max_t"][rank, r0:r1].to(dtype), inv_temp).sub_(glob.c_t[rank, r0:r1, None].to(dtype))
    return log_ps, log_pt


class _VocabParallelFunction(GradientInForward):
    """Hands the slice's gradient, computed in forward, to autograd (backward scales it)."""

    @staticmethod
    def forward(ctx, student: Tensor, grad: Optional[Tensor], kd_rows: Tensor, ce_rows: Tensor,
                weights: ReductionWeights, expected_grad_output: float, per_row: bool):
        return GradientInForward.finish(ctx, NAME, grad, kd_rows, ce_rows, weights, expected_grad_output, "torch",
                                        per_row)


@torch.no_grad()
def _forward(student: Optional[Tensor], teacher: Optional[Tensor], lead_shape: torch.Size, widths: tuple[int, int],
             dtype: torch.dtype, device: torch.device, labels: Optional[Tensor], opts: LossOptions, group,
             num_items_in_batch, want_grad: bool):
    """The slice's weighted gradient (or None), the row losses and the reduction weights, from the
    (B, M, V) student and teacher rows (None when their widths differ: then every rank raises)."""
    rank, world = _group_rank(group)
    width_s, width_t = widths
    code = opts.kernel_params.divergence
    hard = opts.hard_weight > 0
    inv_temp = 1.0 / opts.temperature
    stats = _Stats(opts, code, hard)
    n_rows = math.prod(lead_shape)

    # 1. This slice's statistics, its widths in front, in the first collective.
    local = torch.zeros(len(stats.names), n_rows, dtype=torch.float64, device=device)
    if student is not None:
        n_batch, n_per_batch, width = student.shape
        for b, m0, m1, r0, r1 in _chunks(n_batch, n_per_batch, width):
            for i, value in enumerate(stats.local(student[b, m0:m1].to(dtype), teacher[b, m0:m1].to(dtype))):
                local[i, r0:r1] = value
    header = torch.tensor([width_s, width_t], dtype=torch.float64, device=device)
    gathered = _gather(torch.cat([header, local.reshape(-1)]), world, group)
    widths = gathered[:, :2].long().tolist()
    mismatched = [k for k, (ws, wt) in enumerate(widths) if ws != wt]
    if mismatched:
        raise ValueError("student_logits and teacher_logits must have the same width on every rank; (student, "
                         f"teacher) widths by group rank: {[tuple(w) for w in widths]}")
    vocab = sum(w for w, _ in widths)
    if vocab == 0:
        raise ValueError("student_logits and teacher_logits have an empty vocabulary dimension on every rank (V=0)")
    offset = sum(w for w, _ in widths[:rank])
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    glob = _Global(stats, gathered[:, 2:].reshape(world, len(stats.names), n_rows), opts.temperature)
    if labels is None:
        ignored = out_of_range = torch.zeros(n_rows, dtype=torch.bool, device=device)
    else:  # a label outside [0, V) gets here only on a GPU (checked on the CPU): its row is NaN
        ignored = labels == opts.ignore_index
        out_of_range = ~(ignored | ((labels >= 0) & (labels < vocab)))
    undefined = glob.undefined | out_of_range
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, dtype, num_items_in_batch)
    kd_scale = torch.where(undefined, math.nan, weights.grad_coefs[0].double() * inv_temp).to(dtype)

    second = []  # what the second collective sums over the ranks
    if hard:
        # The label's logit, read by the rank that owns its column.
        local_label = labels - offset
        owned = (local_label >= 0) & (local_label < width)
        local_label = torch.where(owned, local_label, 0)
        label_logit = torch.zeros(n_rows, dtype=torch.float64, device=device)
        if width > 0:
            picked = student.gather(-1, local_label.view(n_batch, n_per_batch, 1)).reshape(-1).double()
            label_logit = torch.where(owned, picked, 0.0)
    grad = None
    if want_grad:
        grad = student if opts.inplace_backward else gradient_buffer(student, "torch")

    def write_gradient(d_kd: Tensor, s: Tensor, b: int, m0: int, m1: int, r0: int, r1: int) -> None:
        """The chunk's gradient from d_kd = d(kd_row)/d(s / T), plus the hard part's."""
        g = d_kd.mul_(kd_scale[r0:r1, None])
        if hard:
            max_s = glob.g["max_s"][rank, r0:r1].to(dtype)
            p1 = _centred(s, max_s, 1.0).sub_(glob.c_s1[rank, r0:r1, None].to(dtype)).exp_()
            p1.scatter_add_(-1, local_label[r0:r1, None], -owned[r0:r1, None].to(dtype))
            g.add_(p1.mul_(weights.grad_coefs[1].to(dtype)))
        g[ignored[r0:r1]] = 0.0  # ignored rows get no gradient, whatever their logits hold
        grad[b, m0:m1] = g

    def chunks():
        """This rank's chunks of rows with their log-probabilities; none for an empty slice."""
        if width == 0:
            return
        for b, m0, m1, r0, r1 in _chunks(n_batch, n_per_batch, width):
            s = student[b, m0:m1].to(dtype)
            yield s, *_log_probs(s, teacher[b, m0:m1].to(dtype), glob, rank, r0, r1, inv_temp), b, m0, m1, r0, r1

    if code in (FORWARD_KL, REVERSE_KL):
        # The loss follows from the statistics, and the gradient needs nothing more.
        if code == FORWARD_KL:
            kd = glob.kl_from_cross(glob.c_t, glob.c_s, glob.g["sum_t"])
        else:
            kd = glob.kl_from_cross(glob.c_s, glob.c_t, glob.g["sum_s"])
        if grad is not None:
            for s, log_ps, log_pt, b, m0, m1, r0, r1 in chunks():
                ps = log_ps.exp()
                if code == FORWARD_KL:
                    d_kd = ps.sub_(log_pt.exp_())
                else:
                    d_kd = torch.where(ps > 0, ps * log_ps.sub_(log_pt).sub_(kd[r0:r1, None].to(dtype)), 0.0)
                write_gradient(d_kd, s, b, m0, m1, r0, r1)
    else:
        # jsd: the mixture's terms need both global normalisers, so their sums take the second collective.
        jsd = jsd_weights(opts.beta)
        teacher_kl_mix = torch.zeros(n_rows, dtype=torch.float64, device=device)
        student_kl_mix = torch.zeros_like(teacher_kl_mix)
        for _, log_ps, log_pt, _, _, _, r0, r1 in chunks():
            teacher_vs_mix, student_vs_mix = jsd_log_ratios(log_pt, log_ps, jsd)  # log m - log p
            teacher_kl_mix[r0:r1] = -_weighted_sum(log_pt.exp(), teacher_vs_mix)
            student_kl_mix[r0:r1] = -_weighted_sum(log_ps.exp(), student_vs_mix)
        second = [teacher_kl_mix, student_kl_mix]
    if hard:
        second.append(label_logit)

    if second:
        summed = _gather(torch.stack(second), world, group).sum(0)  # summed in the same order on every rank
        if code == JSD:
            kl_student_mix = summed[1]
            kd = jsd.teacher * summed[0] + jsd.student * kl_student_mix
            if grad is not None:
                for s, log_ps, log_pt, b, m0, m1, r0, r1 in chunks():
                    _, student_vs_mix = jsd_log_ratios(log_pt, log_ps, jsd)
                    ps = log_ps.exp()
                    # d kd / d(s / T) = (1 - beta) p_s (log p_s - log m - KL(p_s || m))
                    d_kd = torch.where(ps > 0, ps * student_vs_mix.neg_().sub_(kl_student_mix[r0:r1, None].to(dtype)),
                                       0.0).mul_(jsd.student)
                    write_gradient(d_kd, s, b, m0, m1, r0, r1)

    kd = torch.where(ignored, 0.0, torch.where(undefined, math.nan, kd))
    ce = torch.zeros_like(kd)
    if hard:  # at T = 1: log Z1 + max - s_label
        ce = torch.where(ignored, 0.0, torch.where(undefined, math.nan, glob.max_s + glob.log_z_s1 - summed[-1]))
    return grad, kd.to(dtype), ce.to(dtype), weights


def vocab_parallel_kd_loss(student_logits: Tensor, teacher_logits: Tensor, *, group=None,
                           labels: Optional[Tensor] = None, num_items_in_batch=None, return_parts: bool = False,
                           **options):
    """:func:`kdfast.kd_loss` on logits sharded along the vocabulary across the ranks of ``group``.

    Each rank of ``group`` (default: the world) passes its contiguous slice of the vocabulary,
    (..., V_rank) student and teacher logits, group rank 0 holding the first columns; slices may
    differ in width (one may be empty). Every rank returns the same loss as ``kd_loss`` on the
    concatenated logits, and backward gives each rank d(loss)/d(its slice) (neither summed over
    the ranks nor divided by their number). ``labels`` are the same global token ids on every
    rank; only the rank owning a label's column reads its logit. ``options`` are kd_loss's, with
    the same meaning and edge behaviour, except ``vocab_size`` (refused: the slices are the
    vocabulary) and ``backend`` ("auto" or "torch" only: the per-shard work is torch ops).
    ``num_items_in_batch`` and ``return_parts`` are kd_loss's too. Every rank must call it
    with the same leading shape, options and labels.

    Collectives per call: 1 for forward_kl and reverse_kl, 2 with hard_weight > 0, 2 for jsd with
    0 < beta < 1; none in backward. Only per-row scalars travel (float64).
    """
    opts = loss_options(NAME, options, ("group", "labels", "num_items_in_batch", "return_parts"))
    _check_options(opts, options)
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_tokens("student_logits", student_logits, "teacher_logits", teacher_logits)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    want_grad = student_logits.requires_grad and torch.is_grad_enabled()
    lead_shape, widths = student_logits.shape[:-1], (student_logits.shape[-1], teacher_logits.shape[-1])
    student = teacher = None
    if widths[0] == widths[1]:  # else every rank raises after the first collective, none waits for the rest
        # Outside no_grad: autograd must see the student rows as a view of student_logits.
        student, teacher = as_rows(student_logits, teacher_logits.detach())
        if opts.inplace_backward and want_grad:
            check_inplace(student_logits, student, teacher)
    grad, kd_rows, ce_rows, weights = _forward(student, teacher, lead_shape, widths,
                                               compute_dtype(student_logits.dtype, teacher_logits.dtype),
                                               student_logits.device, labels, opts, group, num_items_in_batch,
                                               want_grad)
    loss, kd_rows, ce_rows = _VocabParallelFunction.apply(student, grad, kd_rows, ce_rows, weights,
                                                          opts.expected_grad_output, opts.reduction == "none")
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)
