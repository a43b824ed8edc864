"""Pure PyTorch backend: the closed-form loss and gradient, a chunk of rows at a time.

It runs on any device and in float64, and it is the CPU fallback when the C++ extension
cannot be built. Working on chunks of rows keeps the extra memory near one chunk of
temporaries instead of several N x V float32 tensors.
"""

from __future__ import annotations

import math

import torch

from . import (FORWARD_KL, JSD, REVERSE_KL, SHARD_ROWS, SHARD_STATS, TAIL_BUCKET, TAIL_RENORM, TVD, Backend,
               KernelParams, VocabShardKernels, compute_dtype, jsd_weights)

CHUNK_ELEMENTS = 1 << 21  # elements per temporary; about eight temporaries are alive at once


def unavailable_reason() -> str | None:
    return None


def _weighted_sum(weight: torch.Tensor, values: torch.Tensor, dtype=None) -> torch.Tensor:
    """sum(weight * values) over the last dim (accumulated in dtype) with 0 * inf = 0 (so 0 * log 0 = 0).

    weight is a probability and values a difference of log-probabilities, so a NaN in the
    product is 0 * inf; NaN inputs are handled per row by the caller.
    """
    return (weight * values).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1, dtype=dtype)


# Below it, expm1 cannot overflow (in float32 either); above it, where w_small < e^-64,
# w_small * expm1(delta) = exp(delta + log w_small) - w_small without cancellation.
JSD_EXPM1_LIMIT = 64.0


def jsd_log_ratios(log_pt: torch.Tensor, log_ps: torch.Tensor, w: JsdWeights) -> tuple[torch.Tensor, torch.Tensor]:
    """(log m - log p_t, log m - log p_s) without the cancellation of log m - log p in floating point.

    With delta = log p_A - log p_B: up to w.split (B dominates m, or delta <= 1),
    log m - log p_B = log1p(w_small expm1(delta)), whose argument is >= -w_small >= -0.5; beyond it,
    log m - log p_A = log(w_small) + log1p(exp(c - delta)), exp of a number < 0. The other side's
    ratio differs by delta. Entries where both sides are -inf give NaN (their weights are 0)."""
    log_pa, log_pb = (log_pt, log_ps) if w.teacher_is_a else (log_ps, log_pt)
    delta = log_pa - log_pb
    near_b = delta <= w.split
    shifted = torch.where(delta > JSD_EXPM1_LIMIT, (delta + w.log_w_small).exp() - w.w_small,
                          torch.expm1(delta) * w.w_small)
    log1p = torch.where(near_b, shifted, (w.c - delta).exp()).log1p_()
    ratio_a = torch.where(near_b, log1p - delta, log1p + w.log_w_small)
    ratio_b = torch.where(near_b, log1p, ratio_a + delta)
    return (ratio_a, ratio_b) if w.teacher_is_a else (ratio_b, ratio_a)


def transform_logits(x: torch.Tensor, scale: float, cap: float):
    """(z, dz/dx) of the logit transforms (see kdfast.backends): z = cap tanh(scale x / cap), or scale x
    without a cap; dz/dx is a tensor with a cap, else the number scale."""
    y = x * scale if scale != 1.0 else x
    if cap == 0.0:
        return y, scale
    u = y / cap
    # 1 - tanh^2(u) as 4 e / (1 + e)^2, e = exp(-2|u|): 1 - t * t would cancel where the cap saturates.
    e = u.abs().mul_(-2.0).exp_()
    return torch.tanh(u).mul_(cap), e.mul(4.0 * scale).div_((1.0 + e).square_())


def _tvd_masses(ps: torch.Tensor, above: torch.Tensor, below: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's mass where p_s > p_t and where p_s < p_t, each plus half the tied mass, per row.

    d(0.5 sum_i |p_t,i - p_s,i|)/d(s_j / T) = p_s,j (g_j - sum_i p_s,i g_i), g = 0.5 sign(p_s - p_t)
    (the subgradient with sign(0) = 0, as autograd's |x|). As sum p_s = 1, g_j - sum_i p_s,i g_i is
    mass_below where p_s,j > p_t,j, -mass_above where p_s,j < p_t,j, and half their difference at a
    tie: sums of positive terms, where 0.5 - sum_i p_s,i g_i would cancel when the teacher is near
    one-hot and the student puts little mass on its token."""
    tied = ps.masked_fill(above | below, 0.0).sum(-1, keepdim=True).mul_(0.5)
    return (ps.masked_fill(~above, 0.0).sum(-1, keepdim=True).add_(tied),
            ps.masked_fill(~below, 0.0).sum(-1, keepdim=True).add_(tied))


def _kd_gradient(ps, log_ps, log_pt, params: KernelParams, kd, kl_student_mix, mass_below, mass_above):
    """d(kd_row)/d(s / T) from the log-probabilities (ps = exp(log_ps)) and the row values each divergence's
    gradient needs (columns): reverse KL its kd, jsd KL(p_s || m), tvd the masses of _tvd_masses."""
    if params.divergence == FORWARD_KL:
        return ps - log_pt.exp()
    if params.divergence == REVERSE_KL:
        return torch.where(ps > 0, ps * (log_ps - log_pt).sub_(kd), 0.0)
    if params.divergence == TVD:
        pt = log_pt.exp()
        return ps * torch.where(ps > pt, mass_below, torch.where(ps < pt, -mass_above, 0.5 * (mass_below - mass_above)))
    weights = jsd_weights(params.beta)
    _, student_vs_mix = jsd_log_ratios(log_pt, log_ps, weights)  # log m - log p_s
    return torch.where(ps > 0, ps * student_vs_mix.neg_().sub_(kl_student_mix), 0.0).mul_(weights.student)


def _chunk(s, t, labels, coefs, params: KernelParams, want_grad: bool):
    """Row losses (and the weighted gradient) of a (rows, V) chunk already in the compute dtype."""
    inv_temp = 1.0 / params.temperature
    max_s, max_t = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    # Centre before dividing by T: x - max is exact where it matters, even for huge logits.
    log_ps = torch.log_softmax((s - max_s).mul_(inv_temp), dim=-1)
    log_pt = torch.log_softmax((t - max_t).mul_(1.0 / params.teacher_temperature), dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    kl_student_mix = mass_below = mass_above = None
    if params.divergence == FORWARD_KL:
        kd = _weighted_sum(pt, log_pt - log_ps)
    elif params.divergence == REVERSE_KL:
        kd = _weighted_sum(ps, log_ps - log_pt)
    elif params.divergence == TVD:
        diff = ps - pt
        kd = 0.5 * diff.abs().sum(-1)
        if want_grad:
            mass_above, mass_below = _tvd_masses(ps, diff > 0, diff < 0)
    else:
        assert params.divergence == JSD and 0.0 < params.beta < 1.0
        weights = jsd_weights(params.beta)
        teacher_vs_mix, student_vs_mix = jsd_log_ratios(log_pt, log_ps, weights)  # log m - log p, each side
        kl_student_mix = -_weighted_sum(ps, student_vs_mix)[:, None]
        kd = -weights.teacher * _weighted_sum(pt, teacher_vs_mix) + weights.student * kl_student_mix[:, 0]
    d_kd = _kd_gradient(ps, log_ps, log_pt, params, kd[:, None], kl_student_mix, mass_below, mass_above) \
        if want_grad else None

    # NaN, +inf, or an all -inf row: the softmax is undefined, so the row loss is NaN.
    undefined = ~(torch.isfinite(max_s[:, 0]) & torch.isfinite(max_t[:, 0]))
    ignored = torch.zeros_like(undefined) if labels is None else labels == params.ignore_index
    if labels is not None:
        # Labels decide which rows count even without the hard term; on a GPU they are not
        # checked on the host (that would sync), so a label out of range makes its row NaN.
        in_range = (labels >= 0) & (labels < s.shape[-1])
        undefined |= ~(in_range | ignored)
    kd = torch.where(ignored, 0.0, torch.where(undefined, torch.nan, kd))

    ce = torch.zeros_like(kd)
    d_ce = None
    if params.hard:
        index = torch.where(in_range, labels, 0)[:, None]
        log_p1 = torch.log_softmax(s, dim=-1)
        ce = torch.where(in_range & ~undefined, -log_p1.gather(-1, index)[:, 0], torch.nan)
        ce = torch.where(ignored, 0.0, ce)
        if want_grad:
            d_ce = log_p1.exp_().scatter_add_(-1, index, -in_range[:, None].to(s.dtype))

    grad = None
    if want_grad:
        # Per-row factors: NaN for undefined rows, out-of-range labels among them.
        kd_scale = torch.where(undefined, torch.nan, coefs[0] * inv_temp)
        grad = d_kd.mul_(kd_scale[:, None])
        if d_ce is not None:
            grad.add_(d_ce.mul_(coefs[1]))
        grad[ignored] = 0.0  # ignored rows get no gradient, whatever their logits hold
    return kd, ce, grad


def _over_row_chunks(student, grad, dtype, chunk_fn, params):
    """Runs chunk_fn(student[b, m0:m1] in dtype and transformed, b, slice(m0, m1), slice(r0, r1)) over
    chunks of the (B, M, V) student's rows (r: the flat row index); collects the row losses, and writes
    the gradient chunks, taken back through the student's logit transforms, into grad when it is given."""
    n_batch, n_rows, _ = student.shape
    kd_rows = torch.zeros(n_batch * n_rows, dtype=dtype, device=student.device)
    ce_rows = torch.zeros_like(kd_rows)
    for b, positions, rows in row_chunks(student.shape):
        s, slope = transform_logits(student[b, positions].to(dtype), params.student_scale, params.student_cap)
        kd_rows[rows], ce_rows[rows], g = chunk_fn(s, b, positions, rows)
        if grad is not None:
            grad[b, positions] = g if isinstance(slope, float) and slope == 1.0 else g.mul_(slope)
    return kd_rows, ce_rows


def row_chunks(shape: torch.Size):
    """(b, positions, rows) over chunks of the rows of a (B, M, V) tensor, V > 0: its rows [b, positions],
    the flat row indices rows, at most about CHUNK_ELEMENTS elements at a time."""
    n_batch, n_rows, vocab = shape
    step = max(1, CHUNK_ELEMENTS // vocab)
    for b in range(n_batch):
        for m0 in range(0, n_rows, step):
            m1 = min(n_rows, m0 + step)
            yield b, slice(m0, m1), slice(b * n_rows + m0, b * n_rows + m1)


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    dtype = compute_dtype(student.dtype, teacher.dtype)
    coefs = coefs.to(dtype)

    def chunk(s, b: int, positions: slice, rows: slice):
        t, _ = transform_logits(teacher[b, positions].to(dtype), params.teacher_scale, params.teacher_cap)
        return _chunk(s, t, None if labels is None else labels[rows], coefs, params, want_grad=grad is not None)

    return _over_row_chunks(student, grad, dtype, chunk, params)


# --- the sparse-teacher loss (kdfast.sparse) ---

def _sparse_terms(log_pc: torch.Tensor, log_qc: torch.Tensor, valid: torch.Tensor, params) -> tuple:
    """The divergence per row over categories c (the ids, and the tail bucket when there is one),
    and h_c = P_c * d(divergence)/dP_c, from which the gradient follows (see sparse_chunk)."""
    pc, qc = log_pc.exp(), log_qc.exp()
    if params.tail == TAIL_RENORM:
        mass = qc.sum(-1, keepdim=True)
        qc = torch.where(mass > 0, qc / mass, 0.0)
        log_qc = torch.where(valid & (mass > 0), log_qc - mass.log(), -math.inf)
    if params.divergence == FORWARD_KL:
        kd = _weighted_sum(qc, log_qc - log_pc)
        h = -qc
    elif params.divergence == REVERSE_KL:
        h = torch.where(pc > 0, pc * (log_pc - log_qc), 0.0)
        kd = h.sum(-1)
    else:
        weights = jsd_weights(params.beta)
        q_vs_mix, p_vs_mix = jsd_log_ratios(log_qc, log_pc, weights)  # log m - log q, log m - log p
        h = torch.where(pc > 0, pc * p_vs_mix, 0.0).mul_(-weights.student)
        kd = -weights.teacher * _weighted_sum(qc, q_vs_mix) + h.sum(-1)
    return kd, h


def sparse_chunk(s, ids, log_q, labels, coefs, params, want_grad: bool):
    """Row losses (and the weighted gradient) of a (rows, V) chunk against (rows, K) ids and
    teacher log-probabilities, all already in the compute dtype."""
    n, vocab = s.shape
    inv_temp = 1.0 / params.temperature
    max_s = s.amax(-1, keepdim=True)
    log_p = torch.log_softmax((s - max_s).mul_(inv_temp), dim=-1)
    ids = ids.long()
    bad_ids = ((ids < -1) | (ids >= vocab)).any(-1)
    valid = (ids >= 0) & (ids < vocab)
    slot = torch.where(valid, ids, vocab)  # padding points past the row, at a column dropped below
    in_ids = torch.zeros(n, vocab + 1, dtype=torch.bool, device=s.device).scatter_(-1, slot, True)[:, :vocab]
    log_pk = torch.where(valid, log_p.gather(-1, torch.where(valid, ids, 0)), -math.inf)
    log_qk = torch.where(valid, log_q, -math.inf)
    if params.tail == TAIL_BUCKET:
        # The student's tail from the exp-sum of its complement: no cancellation however small.
        log_pr = torch.logsumexp(log_p.masked_fill(in_ids, -math.inf), -1)
        teacher_tail = 1.0 - log_qk.exp().sum(-1)
        covers = in_ids.all(-1)  # no tail at all, whatever the rounding of the teacher's mass
        log_r = torch.where(~covers & (teacher_tail > params.mass_tolerance), teacher_tail, 0.0).log()
        log_pc, log_qc = torch.cat([log_pk, log_pr[:, None]], -1), torch.cat([log_qk, log_r[:, None]], -1)
        kd, h = _sparse_terms(log_pc, log_qc, torch.cat([valid, ~covers[:, None]], -1), params)
        h_ids, h_tail = h[:, :-1], h[:, -1]
    else:
        kd, h_ids = _sparse_terms(log_pk, log_qk, valid, params)
        log_pr, h_tail = torch.zeros_like(kd), torch.zeros_like(kd)
    # A row of empty slots has no teacher mass, so no divergence (its hard-label part still counts).
    no_teacher = ~valid.any(-1)
    kd = torch.where(no_teacher, 0.0, kd)
    h_ids, h_tail = h_ids.masked_fill(no_teacher[:, None], 0.0), h_tail.masked_fill(no_teacher, 0.0)
    h_total = h_ids.sum(-1) + h_tail

    undefined = ~torch.isfinite(max_s[:, 0]) | bad_ids
    ignored = torch.zeros_like(undefined) if labels is None else labels == params.ignore_index
    kd = torch.where(ignored, 0.0, torch.where(undefined, torch.nan, kd))
    ce = torch.zeros_like(kd)
    in_range = None
    if labels is not None:
        in_range = (labels >= 0) & (labels < vocab)
        kd = torch.where(in_range | ignored, kd, torch.nan)
    if params.hard:
        index = torch.where(in_range, labels, 0)[:, None]
        log_p1 = torch.log_softmax(s, dim=-1)
        ce = torch.where(in_range & ~undefined, -log_p1.gather(-1, index)[:, 0], torch.nan)
        ce = torch.where(ignored, 0.0, ce)

    grad = None
    if want_grad:
        # d(divergence)/d(s_j / T) = p_j (G_j - sum_c h_c), G_j = h_c / P_c of j's category:
        # a tail token's share of h_tail is p_j / p_r.
        p = log_p.exp()
        tail_share = torch.where(in_ids | (log_p == -math.inf), 0.0, (log_p - log_pr[:, None]).exp())
        d = tail_share * h_tail[:, None] - p * h_total[:, None]
        id_values = torch.where(valid, h_ids - log_pk.exp() * h_total[:, None], 0.0)
        d = torch.cat([d, d.new_zeros(n, 1)], -1).scatter_(-1, slot, id_values)[:, :vocab]
        row_ok = ~undefined if in_range is None else ~undefined & (in_range | ignored)
        grad = d.mul_(torch.where(row_ok, coefs[0] * inv_temp, torch.nan)[:, None])
        if params.hard:
            index = torch.where(in_range, labels, 0)[:, None]
            d_ce = log_p1.exp_().scatter_add_(-1, index, -in_range[:, None].to(s.dtype))
            grad.add_(d_ce.mul_(torch.where(in_range, coefs[1], torch.nan)[:, None]))
        grad[ignored] = 0.0
    return kd, ce, grad


def sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, params):
    """The sparse-teacher loss: (B, M, V) student rows against (B*M, K) ids and log-probabilities."""
    dtype = compute_dtype(student.dtype, logprobs.dtype)
    coefs = coefs.to(dtype)

    def chunk(s, b: int, positions: slice, rows: slice):
        return sparse_chunk(s, ids[rows], logprobs[rows].to(dtype), None if labels is None else labels[rows], coefs,
                             params, want_grad=grad is not None)

    return _over_row_chunks(student, grad, dtype, chunk, params)


# --- the vocabulary-parallel loss's per-shard kernels (kdfast.distributed; the contract in kdfast.backends) ---

def shift_of(row_max: torch.Tensor) -> torch.Tensor:
    """What a row is centred by: its maximum, or 0 where that is -inf (so that -inf - shift stays -inf, not NaN)."""
    return torch.where(row_max == -math.inf, 0.0, row_max)


def centred(x: torch.Tensor, row_max: torch.Tensor, scale: float) -> torch.Tensor:
    """(x - shift_of(max)) * scale per row."""
    return (x - shift_of(row_max)[:, None]).mul_(scale)


def vocab_shard_stats(student, teacher, params: KernelParams) -> torch.Tensor:
    """SHARD_STATS of each row, summed in float64; without a teacher (None) its rows are -inf and 0."""
    dtype = compute_dtype(student.dtype, *(() if teacher is None else (teacher.dtype,)))
    n_batch, n_rows, _ = student.shape
    out = torch.zeros(len(SHARD_STATS), n_batch * n_rows, dtype=torch.float64, device=student.device)
    out[:2] = -math.inf
    stat = {name: out[i] for i, name in enumerate(SHARD_STATS)}
    for b, positions, rows in row_chunks(student.shape):
        s = student[b, positions].to(dtype)
        stat["max_s"][rows] = max_s = s.amax(-1)
        a_s = centred(s, max_s, 1.0 / params.temperature)
        e_s = a_s.exp()
        stat["sum_s"][rows] = e_s.sum(-1, dtype=torch.float64)
        if params.hard:
            stat["sum_s1"][rows] = centred(s, max_s, 1.0).exp_().sum(-1, dtype=torch.float64)
        if teacher is None:
            continue
        t = teacher[b, positions].to(dtype)
        stat["max_t"][rows] = max_t = t.amax(-1)
        a_t = centred(t, max_t, 1.0 / params.teacher_temperature)
        e_t = a_t.exp()
        stat["sum_t"][rows] = e_t.sum(-1, dtype=torch.float64)
        if params.divergence == FORWARD_KL:
            stat["cross"][rows] = _weighted_sum(e_t, a_t - a_s, torch.float64)
        elif params.divergence == REVERSE_KL:
            stat["cross"][rows] = _weighted_sum(e_s, a_s - a_t, torch.float64)
    return out


def _shard_chunks(student, teacher, rows_values: torch.Tensor, params: KernelParams):
    """(b, positions, s, log p_s, log p_t, row values by SHARD_ROWS name as (rows, 1) columns) over chunks."""
    dtype = compute_dtype(student.dtype, teacher.dtype)
    for b, positions, rows in row_chunks(student.shape):
        row = dict(zip(SHARD_ROWS, rows_values[:, rows].to(dtype)[..., None].unbind(0)))
        s = student[b, positions].to(dtype)
        log_ps = (s - row["shift_s"]).mul_(1.0 / params.temperature).sub_(row["offset_s"])
        log_pt = (teacher[b, positions].to(dtype) - row["shift_t"]).mul_(1.0 / params.teacher_temperature)
        yield b, positions, rows, s, log_ps, log_pt.sub_(row["offset_t"]), row


def vocab_shard_mixture(student, teacher, rows_values: torch.Tensor, params: KernelParams) -> torch.Tensor:
    out = torch.zeros(3, rows_values.shape[1], dtype=torch.float64, device=student.device)
    for _, _, rows, _, log_ps, log_pt, _ in _shard_chunks(student, teacher, rows_values, params):
        ps, pt = log_ps.exp(), log_pt.exp()
        if params.divergence == JSD:
            teacher_vs_mix, student_vs_mix = jsd_log_ratios(log_pt, log_ps, jsd_weights(params.beta))
            out[0, rows] = -_weighted_sum(pt, teacher_vs_mix, torch.float64)
            out[1, rows] = -_weighted_sum(ps, student_vs_mix, torch.float64)
        else:
            assert params.divergence == TVD
            diff = ps - pt
            out[0, rows] = 0.5 * diff.abs().sum(-1, dtype=torch.float64)
            mass_above, mass_below = _tvd_masses(ps, diff > 0, diff < 0)
            out[1, rows], out[2, rows] = mass_below[:, 0], mass_above[:, 0]
    return out


def vocab_shard_gradient(student, teacher, labels, grad, rows_values: torch.Tensor, params: KernelParams) -> None:
    for b, positions, rows, s, log_ps, log_pt, row in _shard_chunks(student, teacher, rows_values, params):
        d_kd = _kd_gradient(log_ps.exp(), log_ps, log_pt, params, row["kd"], row["kl_student_mix"],
                            row["mass_below"], row["mass_above"])
        g = d_kd.mul_(row["coef_kd"])
        if params.hard:
            owned = labels[rows, None] < s.shape[-1]
            d_ce = (s - row["shift_s"]).sub_(row["offset_s1"]).exp_()  # softmax at T = 1
            d_ce.scatter_add_(-1, torch.where(owned, labels[rows, None], 0), -owned.to(s.dtype))
            g.add_(d_ce.mul_(row["coef_ce"]))
        g[row["ignored"][:, 0] != 0] = 0.0  # ignored rows get no gradient, whatever their logits hold
        grad[b, positions] = g


BACKEND = Backend("torch", None, (torch.float32, torch.bfloat16, torch.float16, torch.float64), unavailable_reason,
                  kd_forward, sparse_kd_forward=sparse_kd_forward,
                  vocab_shard=VocabShardKernels(vocab_shard_stats, vocab_shard_mixture, vocab_shard_gradient))
