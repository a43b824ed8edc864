"""The Triton kernel of the sparse-teacher loss (kdfast.sparse): one program per row.

Sweep 1 reads the student row once, in blocks, keeping an online softmax (running maximum,
exp-sum) and, for the hard-label term, the exp-sum at T = 1. Block sums are exact in float64,
and the shift each block was summed against is kept (a few floats per row), so that the ids'
own terms, recomputed afterwards with the same shift and formula, subtract exactly: the
student's rest p_r comes from the exp-sum of the complement of the ids, with no cancellation
however small it is. The K + 1 categories (the ids, and the rest) are then combined in float64,
and a second sweep writes the gradient d_j = coef * (p_j / p_r * h_r - p_j * H) of every entry,
after which the ids' entries are rewritten with their own term h_k - p_k * H (see
kdfast.backends.torch_fallback for the derivation).

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import FORWARD_KL, REVERSE_KL, TAIL_BUCKET, TAIL_RENORM, SparseKernelParams, on_device_of
from .triton_math import _expm1, _log1p, load_logits, row_label, store_ignored_row, transform_logits

NEG_INF = tl.constexpr(float("-inf"))  # a jit function reads only constexpr globals


@triton.jit
def _xlogy_over(p, log_p, log_q):
    """p * (log p - log q) with 0 log 0 = 0."""
    return tl.where(p > 0, p * (log_p - log_q), 0.0)


@triton.jit
def _category_terms(log_p, log_q, live, beta, DIVERGENCE: tl.constexpr):
    """(divergence term, h = P * d(divergence)/dP) of categories with student log-probability log_p
    and teacher log-probability log_q, in float64; categories not live add nothing."""
    p = tl.where(live, tl.exp(log_p), 0.0)
    q = tl.where(live, tl.exp(log_q), 0.0)
    if DIVERGENCE == 0:  # forward KL
        term = _xlogy_over(q, log_q, log_p)
        h = -q
    elif DIVERGENCE == 1:  # reverse KL
        term = _xlogy_over(p, log_p, log_q)
        h = term
    else:  # jsd: the mixture relative to each side, with log1p / expm1 (accurate at any beta)
        d = log_q - log_p
        both = (p > 0) & (q > 0)
        # log p - log m, and log q - log m; where only one side has mass, m is that side's share of it.
        p_vs_mix = tl.where(both, -_log1p(beta * _expm1(d)), tl.where(p > 0, -tl.log(1.0 - beta), 0.0))
        q_vs_mix = tl.where(both, -_log1p((1.0 - beta) * _expm1(-d)), tl.where(q > 0, -tl.log(beta), 0.0))
        h = (1.0 - beta) * tl.where(p > 0, p * p_vs_mix, 0.0)
        term = beta * tl.where(q > 0, q * q_vs_mix, 0.0) + h
    return tl.where(live, term, 0.0), tl.where(live, h, 0.0)


@triton.jit
def _sparse_rows_kernel(
    s_ptr, ids_ptr, lq_ptr, g_ptr, shift_ptr, labels_ptr, coefs_ptr, kd_out_ptr, ce_out_ptr,
    rows_per_batch, s_stride_b, s_stride_m, g_stride_b, g_stride_m, n_ids, vocab, n_blocks,
    inv_temp, beta, mass_tolerance, ignore_index, scale, cap,  # scale, cap: the student's logit transforms
    DIVERGENCE: tl.constexpr, TAIL: tl.constexpr, HARD: tl.constexpr, HAS_LABELS: tl.constexpr,
    WRITE_GRAD: tl.constexpr, CAP: tl.constexpr, BLOCK: tl.constexpr, K_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    batch, pos = row // rows_per_batch, row % rows_per_batch
    s_row = s_ptr + batch * s_stride_b + pos * s_stride_m
    g_row = g_ptr + batch * g_stride_b + pos * g_stride_m
    cols = tl.arange(0, BLOCK)
    label, ignored = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if ignored:  # ignored rows are not read at all
        store_ignored_row(kd_out_ptr, ce_out_ptr, row, g_row, vocab, WRITE_GRAD, BLOCK)
    else:
        # Sweep 1: the running maximum m, the exp-sum z = sum exp((x - m) / T) (float64, exact per
        # block) and z1 = sum exp(x - m) at T = 1. Each block's shift is kept for the ids' terms.
        m = tl.full([], NEG_INF, tl.float32)
        z = tl.zeros([], dtype=tl.float64)
        z1 = tl.zeros([], dtype=tl.float32)
        bad = False
        for blk in range(0, n_blocks):
            offs = blk * BLOCK + cols
            x, _ = load_logits(s_row, offs, offs < vocab, scale, cap, CAP)
            bad = bad | (tl.sum(tl.where((x != x) | (x == float("inf")), 1, 0), axis=0) > 0)
            new_m = tl.maximum(m, tl.max(x, axis=0))
            shift = tl.where(new_m > NEG_INF, new_m, 0.0)
            old_shift = tl.where(m > NEG_INF, m, 0.0)
            # What was summed against the old shift, rescaled (nothing was, before a maximum).
            factor = tl.where(m > NEG_INF, tl.exp((old_shift.to(tl.float64) - shift) * inv_temp), 0.0)
            z = z * factor + tl.sum(tl.exp((x - shift) * inv_temp).to(tl.float64), axis=0)
            if HARD:
                z1 = z1 * tl.where(m > NEG_INF, tl.exp(old_shift - shift), 0.0) + tl.sum(tl.exp(x - shift), axis=0)
            tl.store(shift_ptr + row * n_blocks + blk, shift)
            m = new_m
        shift = m
        tl.debug_barrier()  # the block shifts stored above are read by other threads below

        # The ids: their logits, and their terms against the shift of their block (the same
        # numbers sweep 1 summed), so that the complement's exp-sum subtracts exactly.
        k_offs = tl.arange(0, K_BLOCK)
        in_k = k_offs < n_ids
        ids = tl.load(ids_ptr + row * n_ids + k_offs, mask=in_k, other=-1).to(tl.int64)
        valid = in_k & (ids >= 0) & (ids < vocab)
        bad = bad | (tl.sum(tl.where(in_k & ((ids < -1) | (ids >= vocab)), 1, 0), axis=0) > 0)
        bad = bad | (m == NEG_INF)
        x_k, slope_k = load_logits(s_row, ids, valid, scale, cap, CAP)
        block_shift = tl.load(shift_ptr + row * n_blocks + ids // BLOCK, mask=valid, other=0.0)
        e_k = tl.exp((x_k - block_shift) * inv_temp).to(tl.float64)
        e_k_final = e_k * tl.exp((block_shift.to(tl.float64) - shift) * inv_temp)
        z_ids = tl.sum(tl.where(valid, e_k_final, 0.0), axis=0)
        n_valid = tl.sum(tl.where(valid, 1, 0), axis=0)
        has_rest = n_valid < vocab  # ids covering the vocabulary leave no rest on either side
        log_z = tl.log(z)
        log_pk = tl.where(valid, (x_k - shift).to(tl.float64) * inv_temp - log_z, NEG_INF)
        z_rest = tl.maximum(z - z_ids, 0.0)
        log_pr = tl.where(has_rest, tl.log(z_rest) - log_z, NEG_INF)
        log_qk = tl.where(valid, tl.load(lq_ptr + row * n_ids + k_offs, mask=valid, other=NEG_INF).to(tl.float64),
                          NEG_INF)
        teacher_mass = tl.sum(tl.where(valid, tl.exp(log_qk), 0.0), axis=0)

        if TAIL == 0:  # bucket: the rests as one more category
            rest = tl.where((1.0 - teacher_mass > mass_tolerance) & has_rest, 1.0 - teacher_mass, 0.0)
            terms_k, h_k = _category_terms(log_pk, log_qk, valid, beta, DIVERGENCE)
            term_r, h_r = _category_terms(log_pr, tl.log(rest), has_rest, beta, DIVERGENCE)
            kd = tl.sum(terms_k, axis=0) + term_r
        else:
            if TAIL == 1:  # renorm: the teacher over its ids
                log_qk = tl.where(teacher_mass > 0, log_qk - tl.log(teacher_mass), NEG_INF)
            terms_k, h_k = _category_terms(log_pk, log_qk, valid, beta, DIVERGENCE)
            kd = tl.sum(terms_k, axis=0)
            h_r = tl.zeros([], dtype=tl.float64)
        # A row of empty slots has no teacher mass, so no divergence.
        kd = tl.where(n_valid > 0, kd, 0.0)
        h_k = tl.where(n_valid > 0, h_k, 0.0)
        h_r = tl.where(n_valid > 0, h_r, 0.0)
        h_total = tl.sum(h_k, axis=0) + h_r

        label_ok = True
        if HAS_LABELS:
            label_ok = (label >= 0) & (label < vocab)
        nan_if_bad = tl.where(bad | (not label_ok), float("nan"), 0.0)
        tl.store(kd_out_ptr + row, (kd + nan_if_bad).to(tl.float32))
        log_z1 = 0.0
        if HARD:
            log_z1 = tl.log(z1)
            x_label, _ = transform_logits(tl.load(s_row + label, mask=label_ok, other=float("nan")).to(tl.float32),
                                          scale, cap, CAP)
            tl.store(ce_out_ptr + row, shift + log_z1 - x_label + nan_if_bad)
        else:
            tl.store(ce_out_ptr + row, 0.0)

        if WRITE_GRAD:
            # Sweep 2: every entry as a rest token, last-read blocks first; then the ids' own.
            coef_kd = tl.load(coefs_ptr) * inv_temp  # d(s / T)/ds = 1 / T
            coef_ce = tl.load(coefs_ptr + 1)
            log_z_rest = tl.log(z_rest)
            h_r32 = h_r.to(tl.float32)
            h_total32 = h_total.to(tl.float32)
            for i in range(0, n_blocks):
                offs = (n_blocks - 1 - i) * BLOCK + cols
                mask = offs < vocab
                x, slope = load_logits(s_row, offs, mask, scale, cap, CAP)
                a = (x - shift) * inv_temp
                p = tl.exp(a - log_z.to(tl.float32))
                rest_share = tl.where(x > NEG_INF, tl.exp(a - log_z_rest.to(tl.float32)), 0.0)  # p_j / p_r
                g = coef_kd * (tl.where(has_rest, rest_share * h_r32, 0.0) - p * h_total32)
                if HARD:
                    g += coef_ce * (tl.exp(x - shift - log_z1) - tl.where(offs == label, 1.0, 0.0))
                tl.store(g_row + offs, (g * slope + nan_if_bad).to(g_ptr.dtype.element_ty), mask=mask)
            tl.debug_barrier()  # the ids' entries below overwrite what other threads just stored
            p_k = tl.exp(log_pk)
            g_k = coef_kd * (h_k - p_k * h_total).to(tl.float32)
            if HARD:
                g_k += coef_ce * (tl.exp(x_k - shift - log_z1) - tl.where(ids == label, 1.0, 0.0))
            tl.store(g_row + ids, (g_k * slope_k + nan_if_bad).to(g_ptr.dtype.element_ty), mask=valid)


SPARSE_BLOCK = 4096


def sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, params: SparseKernelParams):
    n_batch, rows_per_batch, vocab = student.shape
    n_rows, n_ids = ids.shape
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    ce_rows = torch.empty_like(kd_rows)
    block = min(SPARSE_BLOCK, triton.next_power_of_2(vocab))
    n_blocks = triton.cdiv(vocab, block)
    shifts = torch.empty(n_rows, n_blocks, dtype=torch.float32, device=student.device)
    g = grad if grad is not None else student  # not written when WRITE_GRAD is False
    with on_device_of(student):
        _sparse_rows_kernel[(n_rows,)](
            student, ids, logprobs, g, shifts, labels if labels is not None else kd_rows, coefs.float(), kd_rows,
            ce_rows, rows_per_batch, student.stride(0), student.stride(1), g.stride(0), g.stride(1), n_ids, vocab,
            n_blocks, 1.0 / params.temperature, params.beta, params.mass_tolerance, params.ignore_index,
            params.student_scale, params.student_cap,
            DIVERGENCE=params.divergence, TAIL=params.tail, HARD=params.hard, HAS_LABELS=labels is not None,
            WRITE_GRAD=grad is not None, CAP=params.student_cap > 0, BLOCK=block, K_BLOCK=triton.next_power_of_2(n_ids),
            num_warps=max(1, min(16, block // 256)))
    return kd_rows, ce_rows


assert (FORWARD_KL, REVERSE_KL, TAIL_BUCKET, TAIL_RENORM) == (0, 1, 0, 1)  # the codes the kernel tests for
