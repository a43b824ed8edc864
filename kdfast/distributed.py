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
- jsd with 0 < beta < 1 and tvd: 2, with or without hard labels: jsd's mixture
  m = beta p_t + (1 - beta) p_s and tvd's |p_t - p_s| need both global normalisers before their
  terms can be summed; the label's logit travels with those sums.

vocab_parallel_sparse_kd_loss (a sparse teacher: ids and log-probs, the same on every rank): 2,
with every option. The first carries the widths and each slice's per-row maximum and exp-sums;
the second, once the offsets are known, the student's log-probs at the teacher ids each rank
owns (K per row), the log of each slice's exp-sum outside the ids and its count of such
columns (the rest and whether the ids cover the vocabulary), and the label's logit. The loss
over the K + 1 categories is then the same on every rank, computed by the torch backend's
sparse code on a (K + 1)-token vocabulary whose logits are the categories' log-probs.

The per-shard work of vocab_parallel_kd_loss is the backend's ``vocab_shard`` kernels
(kdfast.backends): Triton's on a GPU, the C++ kernel's on a CPU (one program or thread per row: a
sweep over the slice for the statistics, one for the gradient, and one more for jsd's and tvd's
mixture sums), the torch backend's chunked ops for float64. That of vocab_parallel_sparse_kd_loss
is torch ops. The widths are read on the host after the first collective: one device sync per call
on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import fields
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from .backends import FORWARD_KL, JSD, REVERSE_KL, SHARD_ROWS, SHARD_STATS, TVD, compute_dtype, jsd_weights
from .backends.registry import backend, resolve_backend
from .backends.torch_fallback import centred, row_chunks, shift_of, sparse_chunk, vocab_shard_stats
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
SUPPORTED_DIVERGENCES = ("forward_kl", "reverse_kl", "jsd", "tvd")


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


class _Stats:
    """Per-row statistics of this rank's slice, in float64: the rows of the first collective."""

    def __init__(self, opts: LossOptions, code: Optional[int], hard: bool, teacher: bool = True):
        self.sides = 2 if teacher else 1  # the student's (and the teacher's) logits
        self.names = ["max_s", "max_t", "sum_s", "sum_t"] if teacher else ["max_s", "sum_s"]
        if hard and opts.temperature != 1.0:
            self.names.append("sum_s1")  # the hard-label softmax is at T = 1
        if code in (FORWARD_KL, REVERSE_KL):
            self.names.append("cross")  # sum of exp * (log-ratio) on the slice

    def exchange(self, widths: list[int], student: Optional[Tensor], teacher: Optional[Tensor], n_rows: int,
                 device: torch.device, world: int, group, shard_stats, params) -> tuple[list[list[int]], Tensor]:
        """The first collective: every rank's widths and statistics (world, len(names), rows), from the
        (B, M, V) student (and teacher) rows by shard_stats (a vocab_shard.stats); student None (the widths
        differ): zeros, sent all the same, so that every rank reaches the check of the widths and none waits."""
        local = torch.zeros(len(self.names), n_rows, dtype=torch.float64, device=device)
        if student is not None and student.numel() > 0:
            picked = [SHARD_STATS.index(name) for name in self.names]
            local = shard_stats(student, teacher, params._replace(hard="sum_s1" in self.names))[picked].double()
        elif student is not None:  # an empty slice: no maximum, nothing summed
            local[:self.sides] = -math.inf
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
        log_z = (slice_sum * ((slice_max - row_max) * inv_temp).exp()).sum(0).log()
        return (row_max - shift_of(slice_max)) * inv_temp + log_z, log_z

    def kl_from_cross(self, c_p: Tensor, c_q: Tensor, sums_p: Tensor) -> Tensor:
        """KL(p || q) per row from each slice's cross = sum e^x (x - y), x and y the centred, scaled
        logits of p and q: on slice k, sum p (log p - log q) = e^-cp_k cross_k + P_k (cq_k - cp_k),
        P_k = e^-cp_k sums_p_k its mass. A slice with no mass of p (or less than float64 holds)
        adds nothing, as 0 log 0 = 0 elementwise."""
        mass = (-c_p).exp()
        slice_mass = mass * sums_p
        terms = mass * self.g["cross"] + slice_mass * (c_q - c_p)
        return torch.where(slice_mass > 0, terms, 0.0).sum(0)

    def student_log_probs(self, x: Tensor, rank: int, rows: slice, inv_temp: float) -> Tensor:
        """The log-probabilities of this rank's student logits x (flat rows rows, any trailing width) from the
        global offsets: at the temperature, or at T = 1 for the hard labels (inv_temp 1)."""
        dtype = x.dtype
        offsets = self.c_s1 if inv_temp == 1.0 else self.c_s  # c_s1 is c_s at T = 1
        return centred(x, self.g["max_s"][rank, rows].to(dtype), inv_temp).sub_(offsets[rank, rows, None].to(dtype))

    def shard_rows(self, rank: int) -> Tensor:
        """The (len(SHARD_ROWS), rows) float64 values of the vocab_shard kernels, with this rank's shifts and
        offsets filled in (the rest 0): log p = (x - shift) / T - offset on its slice."""
        rows = torch.zeros(len(SHARD_ROWS), self.max_s.shape[0], dtype=torch.float64, device=self.max_s.device)
        for name, side, offsets in (("s", "max_s", self.c_s), ("t", "max_t", self.c_t), ("s1", None, self.c_s1)):
            if side is not None:
                rows[SHARD_ROWS.index(f"shift_{name}")] = shift_of(self.g[side][rank])
            rows[SHARD_ROWS.index(f"offset_{name}")] = offsets[rank]
        return rows

    def row_flags(self, labels: Optional[Tensor], vocab: int, opts: LossOptions) -> tuple[Tensor, Tensor]:
        """(ignored, undefined) per row; undefined: no softmax, or a label outside [0, V) (that gets
        here only on a GPU, where labels are not checked on the host)."""
        if labels is None:
            return torch.zeros_like(self.undefined), self.undefined
        ignored = labels == opts.ignore_index
        return ignored, self.undefined | ~(ignored | ((labels >= 0) & (labels < vocab)))


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

    def columns(self, width: int) -> Tensor:
        """Each row's label as a column of this slice: width where another rank owns it (vocab_shard.gradient)."""
        return torch.where(self.owned, self.local, width)

    def add_gradient(self, g: Tensor, s: Tensor, glob: _Global, rank: int, rows: slice) -> None:
        """g += coef * (softmax(s) - onehot(label)) on the chunk s of flat rows rows."""
        dtype = s.dtype
        p1 = glob.student_log_probs(s, rank, rows, 1.0)
        p1 = p1.exp_().scatter_add_(-1, self.local[rows, None], -self.owned[rows, None].to(dtype))
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

    def __call__(self, d_kd: Tensor, s: Tensor, b: int, positions: slice, rows: slice) -> None:
        g = d_kd.mul_(self.kd_scale[rows, None])
        if self.hard is not None:
            self.hard.add_gradient(g, s, self.glob, self.rank, rows)
        g[self.ignored[rows]] = 0.0  # ignored rows get no gradient, whatever their logits hold
        self.grad[b, positions] = g


def _kd_scale(weights: ReductionWeights, undefined: Tensor, inv_temp: float, dtype: torch.dtype) -> Tensor:
    """The per-row factor of d(kd_row)/d(s / T) in the gradient: NaN for undefined rows."""
    return torch.where(undefined, math.nan, weights.grad_coefs[0].double() * inv_temp).to(dtype)


class _VocabParallelFunction(GradientInForward):
    """Hands the slice's gradient, computed in forward, to autograd (backward scales it)."""

    @staticmethod
    def forward(ctx, student: Tensor, grad: Optional[Tensor], kd_rows: Tensor, ce_rows: Tensor,
                weights: ReductionWeights, expected_grad_output: float, per_row: bool, name: str, backend_name: str):
        return GradientInForward.finish(ctx, name, grad, kd_rows, ce_rows, weights, expected_grad_output,
                                        backend_name, per_row)


@torch.no_grad()
def _forward(student: Optional[Tensor], teacher: Optional[Tensor], lead_shape: torch.Size, widths: tuple[int, int],
             device: torch.device, labels: Optional[Tensor], opts: LossOptions, group, num_items_in_batch,
             want_grad: bool, backend_name: str):
    """The slice's weighted gradient (or None), the row losses and the reduction weights, from the
    (B, M, V) student and teacher rows (None when their widths differ: then every rank raises), with
    the vocab_shard kernels of backend_name."""
    rank, world = _group_rank(group)
    kernels = backend(backend_name).vocab_shard
    params = opts.kernel_params
    code, hard = params.divergence, opts.hard_weight > 0
    dtype = compute_dtype(student.dtype, teacher.dtype) if student is not None else torch.float32
    inv_temp = 1.0 / opts.temperature
    stats = _Stats(opts, code, hard)
    n_rows = math.prod(lead_shape)

    # 1. This slice's statistics, its widths in front, in the first collective.
    widths, gathered = stats.exchange(list(widths), student, teacher, n_rows, device, world, group, kernels.stats,
                                      params)
    mismatched = [k for k, (ws, wt) in enumerate(widths) if ws != wt]
    if mismatched:
        raise ValueError("student_logits and teacher_logits must have the same width on every rank; (student, "
                         f"teacher) widths by group rank: {[tuple(w) for w in widths]}")
    vocab = sum(w for w, _ in widths)
    if vocab == 0:
        raise ValueError("student_logits and teacher_logits have an empty vocabulary dimension on every rank (V=0)")
    offset = sum(w for w, _ in widths[:rank])
    width = student.shape[-1]
    labels = check_labels(labels, lead_shape, device, vocab, opts)
    glob = _Global(stats, gathered, opts.temperature)
    ignored, undefined = glob.row_flags(labels, vocab, opts)
    weights = ReductionWeights.of(labels, n_rows, vocab, opts, device, dtype, num_items_in_batch)
    rows = glob.shard_rows(rank)
    row = {name: rows[i] for i, name in enumerate(SHARD_ROWS)}  # views: writing them fills rows

    # 2. jsd and tvd: the slices' mixture sums, which need both global normalisers; the hard label's logit.
    second = []  # what the second collective sums over the ranks
    hard_labels = _HardLabels(student, labels, offset, weights.grad_coefs[1]) if hard else None
    if code == FORWARD_KL:  # the loss follows from the statistics, and the gradient needs nothing more
        kd = glob.kl_from_cross(glob.c_t, glob.c_s, glob.g["sum_t"])
    elif code == REVERSE_KL:
        kd = glob.kl_from_cross(glob.c_s, glob.c_t, glob.g["sum_s"])
    else:
        second.append(kernels.mixture(student, teacher, rows, params).double() if student.numel() > 0
                      else rows.new_zeros(3, n_rows))
    if hard:
        second.append(hard_labels.logit[None])
    if second:
        summed = _gather(torch.cat(second), world, group).sum(0)  # summed in the same order on every rank
        if code == JSD:
            jsd = jsd_weights(opts.beta)
            kd = jsd.teacher * summed[0] + jsd.student * summed[1]
            row["kl_student_mix"].copy_(summed[1])
        elif code == TVD:
            kd = summed[0]
            row["mass_below"].copy_(summed[1])
            row["mass_above"].copy_(summed[2])

    # 3. This slice's gradient.
    grad = None
    if want_grad:
        grad = student if opts.inplace_backward else gradient_buffer(student, backend_name)
        if student.numel() > 0:
            row["kd"].copy_(kd)
            row["coef_kd"].copy_(_kd_scale(weights, undefined, inv_temp, torch.float64))
            row["coef_ce"].fill_(weights.grad_coefs[1])
            row["ignored"].copy_(ignored)
            columns = hard_labels.columns(width) if hard else torch.full((n_rows,), width, device=device)
            kernels.gradient(student, teacher, columns, grad, rows, params)

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
    vocabulary) and ``backend`` ("auto", or a backend with per-shard kernels: "triton", "cpu", "torch").
    ``num_items_in_batch`` and ``return_parts`` are kd_loss's too. Every rank must call it
    with the same leading shape, options and labels.

    Collectives per call: 1 for forward_kl and reverse_kl, 2 with hard_weight > 0, 2 for jsd with
    0 < beta < 1 and for tvd; none in backward. Only per-row scalars travel (float64).
    """
    opts = loss_options(NAME, options, ("group", "labels", "num_items_in_batch", "return_parts"))
    _check_options(opts, options)
    check_logits("student_logits", student_logits)
    check_logits("teacher_logits", teacher_logits)
    check_same_tokens("student_logits", student_logits, "teacher_logits", teacher_logits)
    num_items_in_batch = check_num_items(num_items_in_batch, opts)
    backend_name = resolve_backend(opts.backend, student_logits.device, (student_logits.dtype, teacher_logits.dtype),
                                   "vocab_shard")
    want_grad = student_logits.requires_grad and torch.is_grad_enabled()
    lead_shape, widths = student_logits.shape[:-1], (student_logits.shape[-1], teacher_logits.shape[-1])
    student = teacher = None
    if widths[0] == widths[1]:  # else every rank raises after the first collective, none waits for the rest
        # Outside no_grad: autograd must see the student rows as a view of student_logits.
        student, teacher = as_rows(student_logits, teacher_logits.detach())
        if opts.inplace_backward and want_grad:
            check_inplace(student_logits, student, teacher)
    grad, kd_rows, ce_rows, weights = _forward(student, teacher, lead_shape, widths, student_logits.device, labels,
                                               opts, group, num_items_in_batch, want_grad, backend_name)
    loss, kd_rows, ce_rows = _VocabParallelFunction.apply(student, grad, kd_rows, ce_rows, weights,
                                                          opts.expected_grad_output, opts.reduction == "none", NAME,
                                                          backend_name)
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
    width = student.shape[-1]
    dtype, device = compute_dtype(student.dtype, teacher_logprobs.dtype), student.device
    hard = opts.hard_weight > 0
    inv_temp = 1.0 / opts.temperature
    stats = _Stats(opts, None, hard, teacher=False)
    n_rows = math.prod(lead_shape)

    # 1. The widths, and each slice's maximum and exp-sums per row.
    widths, gathered = stats.exchange([width], student, None, n_rows, device, world, group, vocab_shard_stats,
                                      opts.kernel_params)
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
        for b, positions, rows in row_chunks(student.shape):
            s = student[b, positions].to(dtype)
            in_ids = torch.zeros(s.shape[0], width + 1, dtype=torch.bool, device=device)
            in_ids = in_ids.scatter_(-1, slot[rows], True)[:, :width]
            yield s, glob.student_log_probs(s, rank, rows, inv_temp), in_ids, b, positions, rows

    for s, log_p, in_ids, b, positions, rows in chunks():
        picked = student[b, positions].gather(-1, torch.where(owned[rows], local_ids[rows], 0)).double()
        log_pk[:, rows] = torch.where(owned[rows], glob.student_log_probs(picked, rank, rows, inv_temp), 0.0).T
        log_rest[rows] = log_p.masked_fill(in_ids, -math.inf).logsumexp(-1).double()
        n_rest[rows] = (~in_ids).sum(-1)
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
        for s, log_p, in_ids, b, positions, rows in chunks():
            share = (log_p - log_rest[rows, None].to(dtype)).exp()  # p_j / p_rest
            rest_share = torch.where(in_ids | (log_p == -math.inf), 0.0, share)
            d_kd = torch.cat([rest_share.mul_(dz[rows, k:].to(dtype)), rest_share.new_zeros(s.shape[0], 1)], -1)
            d_kd = d_kd.scatter_(-1, slot[rows], dz[rows, :k].to(dtype))[:, :width]
            write_gradient(d_kd, s, b, positions, rows)

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
    if opts.backend not in ("auto", "torch"):
        raise ValueError(f"{SPARSE_NAME}() runs its per-shard work with torch ops, not a fused kernel: backend must "
                         f"be 'auto' or 'torch', got {opts.backend!r}")
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
                                                          SPARSE_NAME, "torch")
    return weights.finish(loss, kd_rows, ce_rows, lead_shape, opts, return_parts)
