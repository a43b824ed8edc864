"""The vocabulary-parallel KD losses: :func:`vocab_parallel_kd_loss` and
:func:`vocab_parallel_sparse_kd_loss`, for logits sharded along the vocabulary (tensor-parallel
lm_heads, Megatron-style).

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

vocab_parallel_sparse_kd_loss (a sparse teacher: ids and log-probs, the same on every rank): 2,
with every option. The first carries the widths and each slice's per-row maximum and exp-sums;
the second, once the offsets are known, the student's log-probs at the teacher ids each rank
owns (K per row), the log of each slice's exp-sum outside the ids and its count of such
columns (the rest and whether the ids cover the vocabulary), and the label's logit. The loss
over the K + 1 categories is then the same on every rank, computed by the torch backend's
sparse code on a (K + 1)-token vocabulary whose logits are the categories' log-probs.

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
from .backends.torch_fallback import CHUNK_ELEMENTS, jsd_log_ratios, sparse_chunk
from .inputs import as_rows, check_inplace, check_labels, check_logits, check_num_items, check_same_tokens
from .ops import GradientInForward, gradient_buffer
from .options import LossOptions, loss_options
from .reduction import ReductionWeights
from .sparse import check_sparse_options, check_sparse_teacher, sparse_params

__all__ = ["vocab_parallel_kd_loss", "vocab_parallel_sparse_kd_loss"]

NAME = "vocab_parallel_kd_loss"
SPARSE_NAME = "vocab_parallel_sparse_kd_loss"
# The options whose every value is supported; any other option of LossOptions is accepted only at
# its default (vocab_size is refused outright: the slices are the vocabulary).
SUPPORTED_OPTIONS = ("temperature", "divergence", "beta", "ignore_index", "reduction", "scale_t2", "hard_weight",
                     "soft_weight", "inplace_backward", "expected_grad_output", "backend")
SUPPORTED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
SUPPORTED_BACKENDS = ("auto", "torch")


def _check_options(opts: LossOptions, given: dict, name: str = NAME) -> None:
    if "vocab_size" in given:
        raise ValueError(f"{name}() does not take vocab_size: each rank's slice is its part of the vocabulary, "
                         "and the vocabulary is their concatenation; slice off padding columns before the call")
    unsupported = [f"{f.name}={getattr(opts, f.name)!r}" for f in fields(LossOptions)
                   if f.name not in SUPPORTED_OPTIONS and getattr(opts, f.name) != f.default]
    if unsupported:
        raise ValueError(f"{name}() does not support {', '.join(unsupported)} (it supports "
                         f"{', '.join(SUPPORTED_OPTIONS)})")
    if opts.divergence not in SUPPORTED_DIVERGENCES:
        raise ValueError(f"{name}() does not support divergence={opts.divergence!r} (it supports "
                         f"{', '.join(map(repr, SUPPORTED_DIVERGENCES))})")
    if opts.backend not in SUPPORTED_BACKENDS:
        raise ValueError(f"{name}() runs its per-shard work with torch ops, not a fused kernel: backend must be "
                         f"'auto' or 'torch', got {opts.backend!r}")


def _group_rank(group, name: str = NAME) -> tuple[int, int]:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name}() needs an initialised torch.distributed process group "
                           "(torch.distributed.init_process_group)")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{name}() was called on global rank {dist.get_rank()}, which is not a member of group")
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

    def __init__(self, opts: LossOptions, code: Optional[int], hard: bool, teacher: bool = True):
        self.opts, self.code = opts, code
        self.sides = 2 if teacher else 1  # the student's (and the teacher's) logits
        self.names = ["max_s", "max_t", "sum_s", "sum_t"] if teacher else ["max_s", "sum_s"]
        if hard and opts.temperature != 1.0:
            self.names.append("sum_s1")  # the hard-label softmax is at T = 1
        if code in (FORWARD_KL, REVERSE_KL):
            self.names.append("cross")  # sum of exp * (log-ratio) on the slice

    def local(self, s: Tensor, t: Optional[Tensor]) -> list[Tensor]:
        """The statistics of a (rows, width) chunk of this rank's slice, width possibly 0."""
        inv_temp = 1.0 / self.opts.temperature
        if s.shape[-1] == 0:
            empty = torch.full((s.shape[0],), -math.inf, dtype=torch.float64, device=s.device)
            return [empty] * self.sides + [torch.zeros_like(empty)] * (len(self.names) - self.sides)
        logits = (s, t)[:self.sides]
        maxes = [x.amax(-1) for x in logits]
        centred = [_centred(x, m, inv_temp) for x, m in zip(logits, maxes)]
        exps = [x.exp() for x in centred]
        out = [m.double() for m in maxes] + [e.sum(-1, dtype=torch.float64) for e in exps]
        if "sum_s1" in self.names:
            out.append(_centred(s, maxes[0], 1.0).exp_().sum(-1, dtype=torch.float64))
        if self.code == FORWARD_KL:
            out.append(_weighted_sum(exps[1], centred[1] - centred[0]))
        elif self.code == REVERSE_KL:
            out.append(_weighted_sum(exps[0], centred[0] - centred[1]))
        return out

    def exchange(self, widths: list[int], student: Optional[Tensor], teacher: Optional[Tensor], n_rows: int,
                 dtype: torch.dtype, device: torch.device, world: int, group) -> tuple[list[list[int]], Tensor]:
        """The first collective: every rank's widths and statistics (world, len(names), rows), from
        the (B, M, V) student (and teacher) rows a chunk at a time; student None (the widths differ): zeros,
        sent all the same, so that every rank reaches the check of the widths and none waits."""
        local = torch.zeros(len(self.names), n_rows, dtype=torch.float64, device=device)
        if student is not None:
            n_batch, n_per_batch, width = student.shape
            for b, m0, m1, r0, r1 in _chunks(n_batch, n_per_batch, width):
                t = None if teacher is None else teacher[b, m0:m1].to(dtype)
                for i, value in enumerate(self.local(student[b, m0:m1].to(dtype), t)):
                    local[i, r0:r1] = value
        header = torch.tensor(widths, dtype=torch.float64, device=device)
        gathered = _gather(torch.cat([header, local.reshape(-1)]), world, group)
        return (gathered[:, :len(widths)].long().tolist(),
                gathered[:, len(widths):].reshape(world, len(self.names), n_rows))


class _Global:
    """The rows' global normalisers, from every rank's statistics (world, rows) in float64."""

    def __init__(self, stats: _Stats, gathered: Tensor, temperature: float):
        self.g = g = dict(zip(stats.names, gathered.unbind(1)))
        inv_temp = 1.0 / temperature
        self.max_s = g["max_s"].amax(0)  # NaN propagates: undefined rows
        self.undefined = ~torch.isfinite(self.max_s)
        # log p_j = (x_j - max_k) / T - c_k on slice k, with c_k = (max - max_k) / T + log Z.
        self.c_s, self.log_z_s = self._offsets(g["max_s"], self.max_s, g["sum_s"], inv_temp)
        if "max_t" in g:
            self.max_t = g["max_t"].amax(0)
            self.undefined |= ~torch.isfinite(self.max_t)
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

    def log_probs(self, x: Tensor, side: str, rank: int, r0: int, r1: int, inv_temp: float) -> Tensor:
        """The log-probabilities of this rank's logits x (rows r0:r1, any trailing width) from the global
        offsets: the student's ("s"), the teacher's ("t"), or the student's at T = 1 for the hard labels
        ("s1", with inv_temp 1)."""
        dtype = x.dtype
        row_max = self.g["max_t" if side == "t" else "max_s"][rank, r0:r1].to(dtype)
        offsets = self.c_t if side == "t" else self.c_s1 if side == "s1" else self.c_s
        return _centred(x, row_max, inv_temp).sub_(offsets[rank, r0:r1, None].to(dtype))

    def row_flags(self, labels: Optional[Tensor], vocab: int, opts: LossOptions) -> tuple[Tensor, Tensor]:
        """(ignored, undefined) per row; undefined: no softmax, or a label outside [0, V) (that gets
        here only on a GPU, where labels are not checked on the host)."""
        if labels is None:
            return torch.zeros_like(self.undefined), self.undefined
        ignored = labels == opts.ignore_index
        return ignored, self.undefined | ~(ignored | ((labels >= 0) & (labels < vocab)))


def _log_probs(s: Tensor, t: Tensor, glob: _Global, rank: int, r0: int, r1: int, inv_temp: float):
    """log p_s and log p_t on this rank's chunk of rows r0:r1, from the global offsets."""
    return glob.log_probs(s, "s", rank, r0, r1, inv_temp), glob.log_probs(t, "t", rank, r0, r1, inv_temp)


class _HardLabels:
    """The hard-label term on this rank's (B, M, V_rank) slice: the label's logit, read by the rank
    that owns its column (0 on the others: the second collective sums them), and its gradient."""

    def __init__(self, student: Tensor, labels: Tensor, offset: int, coef: Tensor):
        n_batch, n_per_batch, width = student.shape
        local = labels - offset
        self.owned = (local >= 0) & (local < width)
        self.local = torch.where(self.owned, local, 0)
        self.coef = coef
        self.logit = torch.zeros(labels.shape, dtype=torch.float64, device=labels.device)
        if width > 0:
            picked = student.gather(-1, self.local.view(n_batch, n_per_batch, 1)).reshape(-1).double()
            self.logit = torch.where(self.owned, picked, 0.0)

    def add_gradient(self, g: Tensor, s: Tensor, glob: _Global, rank: int, r0: int, r1: int) -> None:
        """g += coef * (softmax(s) - onehot(label)) on the chunk s of rows r0:r1."""
        dtype = s.dtype
        p1 = glob.log_probs(s, "s1", rank, r0, r1, 1.0)
        p1 = p1.exp_().scatter_add_(-1, self.local[r0:r1, None], -self.owned[r0:r1, None].to(dtype))
        g.add_(p1.mul_(self.coef.to(dtype)))

    @staticmethod
    def cross_entropy(glob: _Global, label_logit: Tensor, ignored: Tensor, undefined: Tensor) -> Tensor:
        """The rows' cross-entropy at T = 1, log Z1 + max - s_label, from the summed label logits."""
        return torch.where(ignored, 0.0, torch.where(undefined, math.nan, glob.max_s + glob.log_z_s1 - label_logit))


class _GradientWriter:
    """Writes each chunk's gradient into grad from d_kd = d(kd_row)/d(s / T), plus the hard part's."""

    def __init__(self, grad: Tensor, kd_scale: Tensor, ignored: Tensor, hard: Optional[_HardLabels], glob: _Global,
                 rank: int):
        self.grad, self.kd_scale, self.ignored, self.hard, self.glob, self.rank = \
            grad, kd_scale, ignored, hard, glob, rank

    def __call__(self, d_kd: Tensor, s: Tensor, b: int, m0: int, m1: int, r0: int, r1: int) -> None:
        g = d_kd.mul_(self.kd_scale[r0:r1, None])
        if self.hard is not None:
            self.hard.add_gradient(g, s, self.glob, self.rank, r0, r1)
        g[self.ignored[r0:r1]] = 0.0  # ignored rows get no gradient, whatever their logits hold
        self.grad[b, m0:m1] = g


def _kd_scale(weights: ReductionWeights, undefined: Tensor, inv_temp: float, dtype: torch.dtype) -> Tensor:
    """The per-row factor of d(kd_row)/d(s / T) in the gradient: NaN for undefined rows."""
    return torch.where(undefined, math.nan, weights.grad_coefs[0].double() * inv_temp).to(dtype)


class _VocabParallelFunction(GradientInForward):
    """Hands the slice's gradient, computed in forward, to autograd (backward scales it)."""

    @staticmethod
    def forward(ctx, student: Tensor, grad: Optional[Tensor], kd_rows: Tensor, ce_rows: Tensor,
                weights: ReductionWeights, expected_grad_output: float, per_row: bool, name: str):
        return GradientInForward.finish(ctx, name, grad, kd_rows, ce_rows, weights, expected_grad_output, "torch",
                                        per_row)


@torch.no_grad()
def _forward(student: Optional[Tensor], teacher: Optional[Tensor], lead_shape: torch.Size, widths: tuple[int, int],
             dtype: torch.dtype, device: torch.device, labels: Optional[Tensor], opts: LossOptions, group,
             num_items_in_batch, want_grad: bool):
    """The slice's weighted gradient (or None), the row losses and the reduction weights, from the
    (B, M, V) student and teacher rows (None when their widths differ: then every rank raises)."""
    rank, world = _group_rank(group)
    code = opts.kernel_params.divergence
    hard = opts.hard_weight > 0
    inv_temp = 1.0 / opts.temperature
    stats = _Stats(opts, code, hard)
    n_rows = math.prod(lead_shape)

    # 1. This slice's statistics, its widths in front, in the first collective.
    widths, gathered = stats.exchange(list(widths), student, teacher, n_rows, dtype, device, world, group)
    mismatched = [k for k, (ws, wt) in enumerate(widths) if ws != wt]
    if mismatched:
        raise ValueError("student_logits and teacher_logits must have the same width on every rank; (student, "
                         f"teacher) widths by group rank: {[tuple(w) for w in widths]}")
    vocab = sum(w for w, _ in widths)
    if vocab == 0:
        raise ValueError("student_logits and teacher_logits have an empty vocabulary dimension on every rank (V=0)")
    offset = sum(w for w, _ in widths[:rank])
    n_batch, n_per_batch, width = student.shape
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    glob = _Global(stats, gathered, opts.temperature)
    ignored, undefined = glob.row_flags(labels, vocab, opts)
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, dtype, num_items_in_batch)

    second = []  # what the second collective sums over the ranks
    hard_labels = _HardLabels(student, labels, offset, weights.grad_coefs[1]) if hard else None
    grad = write_gradient = None
    if want_grad:
        grad = student if opts.inplace_backward else gradient_buffer(student, "torch")
        write_gradient = _GradientWriter(grad, _kd_scale(weights, undefined, inv_temp, dtype), ignored, hard_labels,
                                         glob, rank)

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
        second.append(hard_labels.logit)

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
    ce = _HardLabels.cross_entropy(glob, summed[-1], ignored, undefined) if hard else torch.zeros_like(kd)
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
                                                          opts.expected_grad_output, opts.reduction == "none", NAME)
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)


def _category_divergence(log_pk: Tensor, log_rest: Tensor, covers: Tensor, valid: Tensor, log_q: Tensor,
                         opts: LossOptions, tail: str, tolerance: float, want_grad: bool) -> tuple[Tensor, Tensor]:
    """(kd per row, d(kd)/dz) over the categories of sparse_kd_loss: the K ids (log-probs log_pk,
    float64, all ranks' columns) and the rest (log_rest; none where the ids cover the vocabulary).
    It is sparse_kd_loss over a (K + 1)-token vocabulary whose logits z at T = 1 are the categories'
    log-probs, the ids being its first K tokens (and the last one where they cover the vocabulary,
    with no teacher mass: no rest), so the torch backend's code gives both. A student token j of the
    rest has d(kd)/d(s_j / T) = (p_j / p_rest) dz_rest; one at slot k, dz_k."""
    n_rows, k = log_pk.shape
    z = torch.cat([torch.where(valid, log_pk, -math.inf), torch.where(covers, -math.inf, log_rest)[:, None]], -1)
    slots = torch.arange(k + 1, device=z.device).expand(n_rows, k + 1)
    ids = torch.where(torch.cat([valid, covers[:, None]], -1), slots, -1)
    log_qz = torch.cat([log_q.double(), z.new_full((n_rows, 1), -math.inf)], -1)
    params = sparse_params(opts, tail, tolerance)._replace(temperature=1.0, hard=False, student_scale=1.0,
                                                           student_cap=0.0)
    kd, _, dz = sparse_chunk(z, ids, log_qz, None, z.new_ones(2), params, want_grad)
    return kd, dz


@torch.no_grad()
def _sparse_forward(student: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, lead_shape: torch.Size,
                    labels: Optional[Tensor], opts: LossOptions, tail: str, group, num_items_in_batch,
                    want_grad: bool):
    """The slice's weighted gradient (or None), the row losses and the reduction weights of the
    sparse loss, from the (B, M, V_rank) student rows."""
    rank, world = _group_rank(group, SPARSE_NAME)
    n_batch, n_per_batch, width = student.shape
    dtype, device = compute_dtype(student.dtype, teacher_logprobs.dtype), student.device
    hard = opts.hard_weight > 0
    inv_temp = 1.0 / opts.temperature
    stats = _Stats(opts, None, hard, teacher=False)
    n_rows = math.prod(lead_shape)

    # 1. The widths, and each slice's maximum and exp-sums per row.
    widths, gathered = stats.exchange([width], student, None, n_rows, dtype, device, world, group)
    vocab = sum(w for (w,) in widths)
    if vocab == 0:
        raise ValueError("student_logits has an empty vocabulary dimension on every rank (V=0)")
    offset = sum(w for (w,) in widths[:rank])
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    ids, logprobs, tolerance = check_sparse_teacher(teacher_ids, teacher_logprobs, lead_shape, vocab, device)
    ids = ids.long()
    glob = _Global(stats, gathered, opts.temperature)
    ignored, undefined = glob.row_flags(labels, vocab, opts)
    undefined = undefined | ((ids < -1) | (ids >= vocab)).any(-1)  # only on a GPU: not checked on the host
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, dtype, num_items_in_batch)

    # 2. The log-probs at the ids this rank owns, and its columns outside the ids: their log exp-sum and count.
    k = ids.shape[-1]
    local_ids = ids - offset
    owned = (ids >= 0) & (local_ids >= 0) & (local_ids < width)
    slot = torch.where(owned, local_ids, width)  # not owned: a column past the slice, dropped
    log_pk = torch.zeros(k, n_rows, dtype=torch.float64, device=device)
    log_rest = torch.full((n_rows,), -math.inf, dtype=torch.float64, device=device)
    n_rest = torch.zeros(n_rows, dtype=torch.float64, device=device)
    hard_labels = _HardLabels(student, labels, offset, weights.grad_coefs[1]) if hard else None

    def chunks():
        """This rank's chunks of rows, their log-probabilities and which columns are ids; none for an empty slice."""
        if width == 0:
            return
        for b, m0, m1, r0, r1 in _chunks(n_batch, n_per_batch, width):
            s = student[b, m0:m1].to(dtype)
            in_ids = torch.zeros(r1 - r0, width + 1, dtype=torch.bool, device=device)
            in_ids = in_ids.scatter_(-1, slot[r0:r1], True)[:, :width]
            yield s, glob.log_probs(s, "s", rank, r0, r1, inv_temp), in_ids, b, m0, m1, r0, r1

    for s, log_p, in_ids, b, m0, m1, r0, r1 in chunks():
        picked = student[b, m0:m1].gather(-1, torch.where(owned[r0:r1], local_ids[r0:r1], 0)).double()
        log_pk[:, r0:r1] = torch.where(owned[r0:r1], glob.log_probs(picked, "s", rank, r0, r1, inv_temp), 0.0).T
        log_rest[r0:r1] = log_p.masked_fill(in_ids, -math.inf).logsumexp(-1).double()
        n_rest[r0:r1] = (~in_ids).sum(-1)
    second = [log_pk, log_rest[None], n_rest[None]] + ([hard_labels.logit[None]] if hard else [])
    gathered = _gather(torch.cat(second), world, group)  # (world, K + 2 (+ 1), rows), in the same order everywhere
    log_pk = gathered[:, :k].sum(0).T  # one owner per id: the others add 0
    log_rest = gathered[:, k].logsumexp(0)
    covers = gathered[:, k + 1].sum(0) == 0

    # 3. The divergence over the categories, the same on every rank, and this slice's gradient.
    valid = ids >= 0
    kd, dz = _category_divergence(log_pk, log_rest, covers, valid, logprobs, opts, tail, tolerance, want_grad)
    grad = None
    if want_grad:
        grad = student if opts.inplace_backward else gradient_buffer(student, "torch")
        write_gradient = _GradientWriter(grad, _kd_scale(weights, undefined, inv_temp, dtype), ignored, hard_labels,
                                         glob, rank)
        for s, log_p, in_ids, b, m0, m1, r0, r1 in chunks():
            share = (log_p - log_rest[r0:r1, None].to(dtype)).exp()  # p_j / p_rest
            rest_share = torch.where(in_ids | (log_p == -math.inf), 0.0, share)
            d_kd = torch.cat([rest_share.mul_(dz[r0:r1, k:].to(dtype)), rest_share.new_zeros(r1 - r0, 1)], -1)
            d_kd = d_kd.scatter_(-1, slot[r0:r1], dz[r0:r1, :k].to(dtype))[:, :width]
            write_gradient(d_kd, s, b, m0, m1, r0, r1)

    kd = torch.where(ignored, 0.0, torch.where(undefined, math.nan, kd))
    ce = _HardLabels.cross_entropy(glob, gathered[:, -1].sum(0), ignored, undefined) if hard else torch.zeros_like(kd)
    return grad, kd.to(dtype), ce.to(dtype), weights


def vocab_parallel_sparse_kd_loss(student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, *,
                                  group=None, labels: Optional[Tensor] = None, tail: str = "bucket",
                                  num_items_in_batch=None, return_parts: bool = False, **options):
    """:func:`kdfast.sparse_kd_loss` on student logits sharded along the vocabulary across the ranks
    of ``group`` (default: the world).

    Each rank passes its contiguous slice of the student's vocabulary, (..., V_rank) logits, group
    rank 0 holding the first columns; slices may differ in width (one may be empty).
    ``teacher_ids`` (global token ids, -1: an empty slot), ``teacher_logprobs`` (both (..., K))
    and ``labels`` are the same full tensors on every rank; each rank reads the student's logits at
    the ids (and labels) in its columns. Every rank returns the same loss as ``sparse_kd_loss`` on
    the concatenated logits, and backward gives each rank d(loss)/d(its slice) (neither summed over
    the ranks nor divided by their number). ``tail`` and ``options`` are sparse_kd_loss's, with the
    same meaning and edge behaviour, except ``backend`` ("auto" or "torch" only: the per-shard work
    is torch ops) and the logit transforms (softcap, logit_scale: refused). Every rank must call it
    with the same leading shape, options, ids, log-probs and labels.

    Collectives per call: 2 (all_gather of one float64 tensor each); none in backward. Only
    per-row scalars and K values per row travel.
    """
    opts = loss_options(SPARSE_NAME, options, ("group", "labels", "tail", "num_items_in_batch", "return_parts"))
    _check_options(opts, options, SPARSE_NAME)
    check_sparse_options(opts, tail)
    check_logits("student_logits", student_logits)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    want_grad = student_logits.requires_grad and torch.is_grad_enabled()
    lead_shape = student_logits.shape[:-1]
    (student,) = as_rows(student_logits)  # outside no_grad: autograd must see the rows as a view of student_logits
    if opts.inplace_backward and want_grad:
        check_inplace(student_logits, student, teacher_logprobs)
    grad, kd_rows, ce_rows, weights = _sparse_forward(student, teacher_ids, teacher_logprobs, lead_shape, labels,
                                                      opts, tail, group, num_items_in_batch, want_grad)
    loss, kd_rows, ce_rows = _VocabParallelFunction.apply(student, grad, kd_rows, ce_rows, weights,
                                                          opts.expected_grad_output, opts.reduction == "none",
                                                          SPARSE_NAME)
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)
