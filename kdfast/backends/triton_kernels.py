"""The Triton backend: the fused KD loss as one kernel launch, one program per row.

Sweep 1 reads each row of student and teacher logits once, in blocks, keeping an online
softmax for both sides (running maxima, rescaled sums). Everything is kept relative to
the row maxima, so the divergence is a sum of small terms: for forward KL,
KL(p_t || p_s) = E_t[a_t - a_s] - log z_t + log z_s with a = (x - max) / T.
When a gradient is wanted, the same program sweeps the row a second time, in reverse
block order so that the blocks it read last (most likely still in L2) are re-read first,
and writes coefs[0] * d(kd)/ds + coefs[1] * d(ce)/ds in the student's dtype, possibly
over the student logits themselves. jsd and tvd need the normalisers before their mixture
and |p_t - p_s| terms, so they read the row once more for the loss. Forward-only calls skip
the gradient sweep.

Without a GPU the kernels run in Triton's interpreter (TRITON_INTERPRET=1), which is
how the CPU test-suite covers them.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from . import (FORWARD_KL, JSD, REVERSE_KL, SHARD_ROWS, SHARD_STATS, TVD, Backend, KernelParams, VocabShardKernels,
               jsd_weights, on_device_of)
from .triton_math import expm1_f32, fill_row, load_logits, log1p_f32, row_label, store_ignored_row, transform_logits
from .triton_sparse import sparse_kd_forward

# The divergence codes as the kernels' compile-time constants (a jit function reads only constexpr globals).
FORWARD_KL_CODE, REVERSE_KL_CODE, JSD_CODE, TVD_CODE = (tl.constexpr(c) for c in (FORWARD_KL, REVERSE_KL, JSD, TVD))


@functools.cache
def unavailable_reason() -> str | None:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    if not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter)"
    return None


# Below it, expm1 cannot overflow; above it, where w_small < e^-64, w_small * expm1(delta)
# = exp(delta + log w_small) - w_small without cancellation.
JSD_EXPM1_LIMIT = tl.constexpr(64.0)

@triton.jit
def jsd_log_ratios(log_pt, log_ps, w_small, log_w_small, c, split, TEACHER_IS_A: tl.constexpr):
    """(log m - log p_t, log m - log p_s) without the cancellation of log m - log p in fp32 (see
    kdfast.backends.JsdWeights for the arguments). With delta = log p_A - log p_B: up to split (B
    dominates m, or delta <= 1), log m - log p_B = log1p(w_small expm1(delta)), whose argument is
    >= -w_small >= -0.5; beyond it, log m - log p_A = log(w_small) + log1p(exp(c - delta)), exp of
    a number < 0. The other side's ratio differs by delta. Both sides -inf gives NaN (no weight)."""
    if TEACHER_IS_A:
        delta = log_pt - log_ps
    else:
        delta = log_ps - log_pt
    near_b = delta <= split
    e = tl.exp(tl.where(near_b, delta + log_w_small, c - delta))
    shifted = tl.where(delta > JSD_EXPM1_LIMIT, e - w_small, w_small * expm1_f32(delta))
    log1p = log1p_f32(tl.where(near_b, shifted, e))
    ratio_a = tl.where(near_b, log1p - delta, log1p + log_w_small)
    ratio_b = tl.where(near_b, log1p, ratio_a + delta)
    if TEACHER_IS_A:
        teacher_vs_mix, student_vs_mix = ratio_a, ratio_b
    else:
        teacher_vs_mix, student_vs_mix = ratio_b, ratio_a
    return teacher_vs_mix, student_vs_mix


@triton.jit
def tvd_factor(p_s, p_t, mass_below, mass_above):
    """d(tvd)/d(s_j / T) / p_s,j = g_j - sum_i p_s,i g_i, g = 0.5 sign(p_s - p_t) (sign(0) = 0, autograd's
    subgradient of |x|), from mixture_terms' masses: sums of positive terms, where 0.5 - sum_i p_s,i g_i
    would cancel when the teacher is near one-hot and the student puts little mass on its token."""
    return tl.where(p_s > p_t, mass_below, tl.where(p_s < p_t, -mass_above, 0.5 * (mass_below - mass_above)))


@triton.jit
def online_softmax_block(s_row, t_row, offs, mask, m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1, inv_temp, inv_temp_t,
                         s_scale, s_cap, t_scale, t_cap, DIVERGENCE: tl.constexpr, HARD: tl.constexpr,
                         CAP_S: tl.constexpr, CAP_T: tl.constexpr, MASKED: tl.constexpr):
    """One block of sweep 1 (see online_softmax): the state (m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1) after it."""
    xs, _ = load_logits(s_row, offs, mask, s_scale, s_cap, CAP_S, MASKED)
    xt, _ = load_logits(t_row, offs, mask, t_scale, t_cap, CAP_T, MASKED)
    new_m_s = tl.maximum(m_s, tl.max(xs, axis=0))
    new_m_t = tl.maximum(m_t, tl.max(xt, axis=0))
    old_shift_s = tl.where(m_s > float("-inf"), m_s, 0.0)
    old_shift_t = tl.where(m_t > float("-inf"), m_t, 0.0)
    shift_s = tl.where(new_m_s > float("-inf"), new_m_s, 0.0)
    shift_t = tl.where(new_m_t > float("-inf"), new_m_t, 0.0)
    # Rescale what was summed against the old shifts (nothing was, before a max).
    da_s = (shift_s - old_shift_s) * inv_temp
    da_t = (shift_t - old_shift_t) * inv_temp_t
    f_s = tl.where(m_s > float("-inf"), tl.exp(-da_s), 0.0)
    f_t = tl.where(m_t > float("-inf"), tl.exp(-da_t), 0.0)
    # A weight that underflowed to 0 adds nothing, even to an infinite w (a side -inf
    # where the other had mass): 0 * inf would make the row NaN.
    if DIVERGENCE == FORWARD_KL_CODE:
        acc_w = tl.where(f_t > 0, f_t * (acc_w - acc_zt * (da_t - da_s)), 0.0)
    if DIVERGENCE == REVERSE_KL_CODE:
        acc_w = tl.where(f_s > 0, f_s * (acc_w - acc_zs * (da_s - da_t)), 0.0)
    if HARD:
        acc_z1 = acc_z1 * tl.where(m_s > float("-inf"), tl.exp(old_shift_s - shift_s), 0.0)
    acc_zs = acc_zs * f_s
    acc_zt = acc_zt * f_t

    a_s = (xs - shift_s) * inv_temp
    a_t = (xt - shift_t) * inv_temp_t
    e_s = tl.exp(a_s)
    e_t = tl.exp(a_t)
    acc_zs += e_s
    acc_zt += e_t
    # 0 * log 0 = 0: entries with zero weight contribute nothing, even at -inf.
    if DIVERGENCE == FORWARD_KL_CODE:
        acc_w += tl.where(e_t > 0, e_t * (a_t - a_s), 0.0)
    if DIVERGENCE == REVERSE_KL_CODE:
        acc_w += tl.where(e_s > 0, e_s * (a_s - a_t), 0.0)
    if HARD:
        acc_z1 += tl.exp(xs - shift_s)
    return new_m_s, new_m_t, acc_zs, acc_zt, acc_w, acc_z1


@triton.jit
def span_mask(offs, lo, hi, PEEL: tl.constexpr):
    """The entries of a masked block that are the row's: lo <= offs < hi (lo is 0 unless PEEL)."""
    if PEEL:
        return (offs >= lo) & (offs < hi)
    return offs < hi


@triton.jit
def online_softmax(s_row, t_row, lo, hi, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap,
                   DIVERGENCE: tl.constexpr, HARD: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
                   BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, PEEL: tl.constexpr = False):
    """Sweep 1: the online softmax of both sides against running maxima m_s, m_t. Returns (m_s, m_t,
    z_s, z_t, w, z1): the maxima, the exp-sums of a = (z - m) / T, w = sum e_t (a_t - a_s) (forward
    KL) or sum e_s (a_s - a_t) (reverse KL), and z1, the student's exp-sum at T = 1 (hard labels).

    The shifts subtracted are the maxima, or 0 while a side has seen only -inf (so that exp(-inf -
    shift) = 0, not NaN). NaN or +inf anywhere, or an all -inf row, makes the sums NaN.

    The row is entries lo .. hi - 1 from the row pointers (every sweep reads so): lo = 0, or with PEEL
    (kd_forward's peel_rows) the row's distance from the 16-byte boundary below its start, where the
    pointers then point. The full blocks are read without a mask, so 16 bytes at a time; the partial
    last one, and with PEEL the first, with one."""
    cols = tl.arange(0, BLOCK)
    m_s = tl.full([], float("-inf"), tl.float32)
    m_t = tl.full([], float("-inf"), tl.float32)
    acc_zs = tl.zeros([BLOCK], dtype=tl.float32)
    acc_zt = tl.zeros([BLOCK], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK], dtype=tl.float32)
    acc_z1 = tl.zeros([BLOCK], dtype=tl.float32)
    first = 0  # with a head (PEEL and lo > 0), the first block is masked
    if PEEL:
        first = (lo > 0).to(tl.int32)
    if first > 0:
        m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1 = online_softmax_block(
            s_row, t_row, cols, span_mask(cols, lo, hi, PEEL), m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1, inv_temp,
            inv_temp_t, s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HARD, CAP_S, CAP_T, True)
    n_full = hi // BLOCK
    for blk in tl.range(first, n_full, num_stages=NUM_STAGES):
        offs = blk * BLOCK + cols
        m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1 = online_softmax_block(
            s_row, t_row, offs, offs < hi, m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1, inv_temp, inv_temp_t,
            s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HARD, CAP_S, CAP_T, False)
    if (n_full * BLOCK < hi) & (n_full >= first):
        offs = n_full * BLOCK + cols
        m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1 = online_softmax_block(
            s_row, t_row, offs, span_mask(offs, lo, hi, PEEL), m_s, m_t, acc_zs, acc_zt, acc_w, acc_z1, inv_temp,
            inv_temp_t, s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HARD, CAP_S, CAP_T, True)
    return (m_s, m_t, tl.sum(acc_zs, axis=0), tl.sum(acc_zt, axis=0), tl.sum(acc_w, axis=0),
            tl.sum(acc_z1, axis=0))


@triton.jit
def mixture_block(s_row, t_row, offs, mask, acc_kl_t, acc_kl_s, acc_above, shift_s, shift_t, log_zs, log_zt, inv_temp,
                  inv_temp_t, s_scale, s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c, jsd_split,
                  DIVERGENCE: tl.constexpr, TEACHER_IS_A: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
                  MASKED: tl.constexpr):
    """One block of sweep 2 (see mixture_terms): the accumulators after it; tvd's in acc_kl_t (|p_t - p_s|),
    acc_kl_s and acc_above (the student's mass where p_s < p_t, and where p_s > p_t, each plus half its mass
    where they are equal)."""
    xs, _ = load_logits(s_row, offs, mask, s_scale, s_cap, CAP_S, MASKED)
    xt, _ = load_logits(t_row, offs, mask, t_scale, t_cap, CAP_T, MASKED)
    log_ps = (xs - shift_s) * inv_temp - log_zs
    log_pt = (xt - shift_t) * inv_temp_t - log_zt
    p_s = tl.exp(log_ps)
    p_t = tl.exp(log_pt)
    if DIVERGENCE == JSD_CODE:
        teacher_vs_mix, student_vs_mix = jsd_log_ratios(log_pt, log_ps, w_small, log_w_small, jsd_c, jsd_split,
                                                        TEACHER_IS_A)
        # 0 * log 0 = 0: entries without mass add nothing (both sides -inf: NaN ratios).
        acc_kl_t += tl.where(p_t > 0, p_t * teacher_vs_mix, 0.0)
        acc_kl_s += tl.where(p_s > 0, p_s * student_vs_mix, 0.0)
    else:
        acc_kl_t += tl.abs(p_t - p_s)
        half_tied = tl.where(p_s == p_t, 0.5 * p_s, 0.0)
        acc_kl_s += tl.where(p_s < p_t, p_s, half_tied)
        acc_above += tl.where(p_s > p_t, p_s, half_tied)
    return acc_kl_t, acc_kl_s, acc_above


@triton.jit
def mixture_terms(s_row, t_row, lo, hi, shift_s, shift_t, log_zs, log_zt, inv_temp, inv_temp_t,
                  s_scale, s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c, jsd_split, w_teacher, w_student,
                  DIVERGENCE: tl.constexpr, TEACHER_IS_A: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr,
                  BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, PEEL: tl.constexpr = False):
    """Sweep 2 (jsd, tvd), which needs both normalisers: returns (kd, kl_student_mix, mass_below, mass_above).
    jsd: kd = beta KL(p_t || m) + (1 - beta) KL(p_s || m), and KL(p_s || m) for the gradient;
    tvd: kd = 0.5 sum |p_t - p_s|, and for the gradient (tvd_factor) the student's mass where p_s < p_t and
    where p_s > p_t, each plus half its mass where they are equal."""
    cols = tl.arange(0, BLOCK)
    acc_kl_t = tl.zeros([BLOCK], dtype=tl.float32)
    acc_kl_s = tl.zeros([BLOCK], dtype=tl.float32)
    acc_above = tl.zeros([BLOCK], dtype=tl.float32)
    first = 0  # the row's span as online_softmax reads it
    if PEEL:
        first = (lo > 0).to(tl.int32)
    if first > 0:
        acc_kl_t, acc_kl_s, acc_above = mixture_block(
            s_row, t_row, cols, span_mask(cols, lo, hi, PEEL), acc_kl_t, acc_kl_s, acc_above, shift_s, shift_t,
            log_zs, log_zt, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c,
            jsd_split, DIVERGENCE, TEACHER_IS_A, CAP_S, CAP_T, True)
    n_full = hi // BLOCK
    for blk in tl.range(first, n_full, num_stages=NUM_STAGES):
        offs = blk * BLOCK + cols
        acc_kl_t, acc_kl_s, acc_above = mixture_block(
            s_row, t_row, offs, offs < hi, acc_kl_t, acc_kl_s, acc_above, shift_s, shift_t, log_zs, log_zt,
            inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c, jsd_split, DIVERGENCE,
            TEACHER_IS_A, CAP_S, CAP_T, False)
    if (n_full * BLOCK < hi) & (n_full >= first):
        offs = n_full * BLOCK + cols
        acc_kl_t, acc_kl_s, acc_above = mixture_block(
            s_row, t_row, offs, span_mask(offs, lo, hi, PEEL), acc_kl_t, acc_kl_s, acc_above, shift_s, shift_t,
            log_zs, log_zt, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c,
            jsd_split, DIVERGENCE, TEACHER_IS_A, CAP_S, CAP_T, True)
    if DIVERGENCE == JSD_CODE:
        kl_student_mix = -tl.sum(acc_kl_s, axis=0)
        return -w_teacher * tl.sum(acc_kl_t, axis=0) + w_student * kl_student_mix, kl_student_mix, 0.0, 0.0
    return 0.5 * tl.sum(acc_kl_t, axis=0), 0.0, tl.sum(acc_kl_s, axis=0), tl.sum(acc_above, axis=0)


@triton.jit
def gradient_block(s_row, t_row, g_row, offs, mask, label, shift_s, shift_t, log_zs, log_zt, log_z1, inv_temp,
                   inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix, mass_below, mass_above, coef_kd,
                   coef_ce, nan_if_bad_label, w_small, log_w_small, jsd_c, jsd_split, w_student,
                   DIVERGENCE: tl.constexpr, HARD: tl.constexpr, TEACHER_IS_A: tl.constexpr, CAP_S: tl.constexpr,
                   CAP_T: tl.constexpr, MASKED: tl.constexpr):
    """One block of sweep 3 (see write_gradient), stored: the row's last read, and a gradient no later
    sweep reads (streaming stores, as the CUDA kernel's)."""
    xs, slope = load_logits(s_row, offs, mask, s_scale, s_cap, CAP_S, MASKED, True)  # slope: dz/dx
    xt, _ = load_logits(t_row, offs, mask, t_scale, t_cap, CAP_T, MASKED, True)
    log_ps = (xs - shift_s) * inv_temp - log_zs
    log_pt = (xt - shift_t) * inv_temp_t - log_zt
    p_s = tl.exp(log_ps)
    if DIVERGENCE == FORWARD_KL_CODE:
        d = p_s - tl.exp(log_pt)
    elif DIVERGENCE == REVERSE_KL_CODE:
        d = tl.where(p_s > 0, p_s * (log_ps - log_pt - kd), 0.0)
    elif DIVERGENCE == TVD_CODE:
        d = p_s * tvd_factor(p_s, tl.exp(log_pt), mass_below, mass_above)
    else:
        _, student_vs_mix = jsd_log_ratios(log_pt, log_ps, w_small, log_w_small, jsd_c, jsd_split, TEACHER_IS_A)
        # log p_s - log m = -student_vs_mix
        d = w_student * tl.where(p_s > 0, p_s * (-student_vs_mix - kl_student_mix), 0.0)
    g = coef_kd * d + nan_if_bad_label
    if HARD:
        p1 = tl.exp(xs - shift_s - log_z1)  # softmax(z) at T = 1
        g += coef_ce * (p1 - tl.where(offs == label, 1.0, 0.0))
    g = (g * slope).to(g_row.dtype.element_ty)
    if MASKED:
        tl.store(g_row + offs, g, mask=mask, cache_modifier=".cs")
    else:
        tl.store(g_row + offs, g, cache_modifier=".cs")


@triton.jit
def write_gradient(s_row, t_row, g_row, lo, hi, label, shift_s, shift_t, log_zs, log_zt, log_z1, inv_temp,
                   inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix, mass_below, mass_above, coef_kd,
                   coef_ce, nan_if_bad_label, w_small, log_w_small, jsd_c, jsd_split, w_student,
                   DIVERGENCE: tl.constexpr, HARD: tl.constexpr, TEACHER_IS_A: tl.constexpr, CAP_S: tl.constexpr,
                   CAP_T: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr, PEEL: tl.constexpr = False):
    """Sweep 3: coef_kd * d(kd)/d(s / T) + coef_ce * d(ce)/ds, times dz/dx of the student's transforms,
    in the gradient's dtype, over the row's span as online_softmax reads it (label: its offset in that
    span); the last-read blocks first (most likely still in L2): the partial one, then the full ones
    backwards, then with PEEL the first."""
    cols = tl.arange(0, BLOCK)
    first = 0
    if PEEL:
        first = (lo > 0).to(tl.int32)
    n_full = hi // BLOCK
    if (n_full * BLOCK < hi) & (n_full >= first):
        offs = n_full * BLOCK + cols
        gradient_block(s_row, t_row, g_row, offs, span_mask(offs, lo, hi, PEEL), label, shift_s, shift_t, log_zs,
                       log_zt, log_z1, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix,
                       mass_below, mass_above, coef_kd, coef_ce, nan_if_bad_label, w_small, log_w_small, jsd_c,
                       jsd_split, w_student, DIVERGENCE, HARD, TEACHER_IS_A, CAP_S, CAP_T, True)
    for i in tl.range(0, n_full - first, num_stages=NUM_STAGES):
        offs = (n_full - 1 - i) * BLOCK + cols
        gradient_block(s_row, t_row, g_row, offs, offs < hi, label, shift_s, shift_t, log_zs, log_zt, log_z1,
                       inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix, mass_below,
                       mass_above, coef_kd, coef_ce, nan_if_bad_label, w_small, log_w_small, jsd_c, jsd_split,
                       w_student, DIVERGENCE, HARD, TEACHER_IS_A, CAP_S, CAP_T, False)
    if first > 0:
        gradient_block(s_row, t_row, g_row, cols, span_mask(cols, lo, hi, PEEL), label, shift_s, shift_t, log_zs,
                       log_zt, log_z1, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix,
                       mass_below, mass_above, coef_kd, coef_ce, nan_if_bad_label, w_small, log_w_small, jsd_c,
                       jsd_split, w_student, DIVERGENCE, HARD, TEACHER_IS_A, CAP_S, CAP_T, True)


@triton.jit
def _kd_rows_kernel(
    s_ptr, t_ptr, g_ptr, labels_ptr, coefs_ptr, kd_out_ptr, ce_out_ptr,
    rows_per_batch, s_stride_b, s_stride_m, t_stride_b, t_stride_m, g_stride_b, g_stride_m,
    vocab, inv_temp, inv_temp_t, ignore_index,  # inv_temp_t: 1 / the teacher's temperature
    w_small, log_w_small, jsd_c, jsd_split, w_teacher, w_student,  # jsd: kdfast.backends.JsdWeights
    s_scale, s_cap, t_scale, t_cap,  # the logit transforms of each side (CAP_S, CAP_T: caps on)
    s_misalign,  # PEEL: the student's first entry's distance from a 16-byte boundary below it, in entries
    DIVERGENCE: tl.constexpr, HARD: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr,
    TEACHER_IS_A: tl.constexpr, CAP_S: tl.constexpr, CAP_T: tl.constexpr, BLOCK: tl.constexpr,
    NUM_STAGES: tl.constexpr,  # the sweeps' software pipelining (tl.range), None: the compiler's choice
    PEEL: tl.constexpr = False,  # rows read from the 16-byte boundary below their start (kd_forward's peel_rows)
    ALIGN: tl.constexpr = 8,  # entries per 16 bytes
):
    row = tl.program_id(0).to(tl.int64)
    batch, pos = row // rows_per_batch, row % rows_per_batch
    s_row = s_ptr + batch * s_stride_b + pos * s_stride_m
    t_row = t_ptr + batch * t_stride_b + pos * t_stride_m
    g_row = g_ptr + batch * g_stride_b + pos * g_stride_m
    label, ignored = row_label(labels_ptr, row, ignore_index, HAS_LABELS)
    if ignored:  # ignored rows are not read at all
        store_ignored_row(kd_out_ptr, ce_out_ptr, row, g_row, vocab, WRITE_GRAD, BLOCK)
    else:
        # The sweeps read entries lo .. lo + vocab - 1 from the span pointers: with PEEL, those of the 16-byte
        # boundary below the row's start, which the teacher's and the gradient's rows share (peel_rows).
        lo = 0
        s_span, t_span, g_span = s_row, t_row, g_row
        if PEEL:
            lo = ((s_misalign + batch * s_stride_b + pos * s_stride_m) % ALIGN).to(tl.int32)
            s_span = tl.multiple_of(s_row - lo, 16)
            t_span = tl.multiple_of(t_row - lo, 16)
            g_span = tl.multiple_of(g_row - lo, 16)
        shift_s, shift_t, z_s, z_t, w, z1 = online_softmax(s_span, t_span, lo, lo + vocab, inv_temp, inv_temp_t,
                                                           s_scale, s_cap, t_scale, t_cap, DIVERGENCE, HARD, CAP_S,
                                                           CAP_T, BLOCK, NUM_STAGES, PEEL)
        # A side that saw only -inf has no softmax: NaN, like torch.
        nan_if_unseen = tl.where((shift_s > float("-inf")) & (shift_t > float("-inf")), 0.0, float("nan"))
        log_zs = tl.log(z_s) + nan_if_unseen
        log_zt = tl.log(z_t) + nan_if_unseen
        kl_student_mix = 0.0
        mass_below = 0.0
        mass_above = 0.0
        if DIVERGENCE == FORWARD_KL_CODE:
            kd = w / z_t - log_zt + log_zs
        elif DIVERGENCE == REVERSE_KL_CODE:
            kd = w / z_s - log_zs + log_zt
        else:
            kd, kl_student_mix, mass_below, mass_above = mixture_terms(
                s_span, t_span, lo, lo + vocab, shift_s, shift_t, log_zs, log_zt, inv_temp, inv_temp_t, s_scale,
                s_cap, t_scale, t_cap, w_small, log_w_small, jsd_c, jsd_split, w_teacher, w_student, DIVERGENCE,
                TEACHER_IS_A, CAP_S, CAP_T, BLOCK, NUM_STAGES, PEEL)

        # Labels decide which rows count even without the hard term; on a GPU they are not
        # checked on the host (that would sync), so a label out of range makes its row NaN.
        label_ok = (label >= 0) & (label < vocab)
        if HAS_LABELS:
            nan_if_bad_label = tl.where(label_ok, 0.0, float("nan"))
        else:
            nan_if_bad_label = 0.0
        tl.store(kd_out_ptr + row, kd + nan_if_bad_label)
        log_z1 = 0.0
        if HARD:
            log_z1 = tl.log(z1) + nan_if_unseen
            x_label, _ = transform_logits(tl.load(s_row + label, mask=label_ok, other=float("nan")).to(tl.float32),
                                          s_scale, s_cap, CAP_S)
            tl.store(ce_out_ptr + row, shift_s + log_z1 - x_label)
        else:
            tl.store(ce_out_ptr + row, 0.0)

        if WRITE_GRAD:
            coef_kd = tl.load(coefs_ptr) * inv_temp  # d(s / T)/ds = 1 / T
            write_gradient(s_span, t_span, g_span, lo, lo + vocab, lo + label, shift_s, shift_t, log_zs, log_zt,
                           log_z1, inv_temp, inv_temp_t, s_scale, s_cap, t_scale, t_cap, kd, kl_student_mix,
                           mass_below, mass_above, coef_kd, tl.load(coefs_ptr + 1), nan_if_bad_label, w_small,
                           log_w_small, jsd_c, jsd_split, w_student, DIVERGENCE, HARD, TEACHER_IS_A, CAP_S, CAP_T,
                           BLOCK, NUM_STAGES, PEEL)


@triton.jit
def row_start(ptr, row, rows_per_batch, stride_b, stride_m):
    """The first entry of flat row `row` of a (B, M, V) tensor with strides (stride_b, stride_m, 1)."""
    return ptr + (row // rows_per_batch) * stride_b + (row % rows_per_batch) * stride_m


@triton.jit
def _scale_rows_kernel(g_ptr, scale_ptr, rows_per_batch, stride_b, stride_m, vocab,
                       PER_ROW: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    scale = tl.load(scale_ptr + row) if PER_ROW else tl.load(scale_ptr)
    if scale != 1.0:  # the usual loss.backward(): nothing to do, and no host sync to find out
        g_row = row_start(g_ptr, row, rows_per_batch, stride_b, stride_m)
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < vocab
        g = tl.load(g_row + offs, mask=mask).to(tl.float32)
        tl.store(g_row + offs, (g * scale).to(g_ptr.dtype.element_ty), mask=mask)


class LaunchConfig(NamedTuple):
    block: int  # logits per block of a sweep
    num_warps: int
    num_stages: Optional[int] = None  # the sweeps' tl.range pipelining; None: the compiler's default


def launch_config(vocab: int) -> LaunchConfig:
    """8 entries per thread (one 16-byte load of bf16 logits), at most 4096 per block.

    With 4096 x 16 warps the kernel takes 80 registers: one program per SM, which keeps the
    rows in flight (whose second sweep should hit L2) few. Untuned: the device run times a grid of
    the alternatives (benchmarks/triton_grid.py), from which the first GPU session picks.
    """
    block = min(4096, triton.next_power_of_2(vocab))
    return LaunchConfig(block, max(1, min(16, block // 256)))


def _misalignment(x: torch.Tensor) -> int:
    """How many entries x's first entry lies past the 16-byte boundary below it."""
    return x.data_ptr() % 16 // x.element_size()


def rows_aligned(x: torch.Tensor) -> bool:
    """Whether every row of the (B, M, V) tensor x starts at a 16-byte boundary."""
    per_16 = 16 // x.element_size()
    return _misalignment(x) == 0 and x.stride(0) % per_16 == 0 and x.stride(1) % per_16 == 0


def peel_rows(student, teacher, grad) -> bool:
    """Whether the loss kernel is to read each row from the 16-byte boundary below its start, the first block
    masked, the rest 16 bytes at a time: the student's rows do not all start at a boundary (logits[:, :-1] of
    an odd V), and the teacher's and the gradient's rows lie as the student's (dtype, strides, misalignment),
    as gradient_buffer lays the gradient out. Otherwise such rows are read 2 or 4 bytes at a time."""
    if rows_aligned(student):
        return False
    return all(x is None or (x.dtype == student.dtype and x.stride() == student.stride()
                             and _misalignment(x) == _misalignment(student)) for x in (teacher, grad))


def gradient_buffer(student: torch.Tensor) -> torch.Tensor:
    """A buffer for the student's gradient: contiguous, or laid out as the student's rows when they do not start
    at 16-byte boundaries, so that the kernel reads and writes both 16 bytes at a time (peel_rows)."""
    if rows_aligned(student) or student.numel() == 0:
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    misalignment = _misalignment(student)
    span = 1 + sum((n - 1) * stride for n, stride in zip(student.shape, student.stride()))
    storage = torch.empty(misalignment + span, dtype=student.dtype, device=student.device)
    return storage.as_strided(student.shape, student.stride(), misalignment)


def _kernel_jsd_weights(params: KernelParams):
    """The jsd weights the kernels take (unused but for jsd). Formed in double here: the kernel never rounds
    beta before taking 1 - beta."""
    return jsd_weights(params.beta if params.divergence == JSD else 0.5)


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams, config: Optional[LaunchConfig] = None):
    n_batch, rows_per_batch, vocab = student.shape
    n_rows = n_batch * rows_per_batch
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=student.device)
    ce_rows = torch.empty_like(kd_rows)
    config = config or launch_config(vocab)
    g = grad if grad is not None else student  # not written when WRITE_GRAD is False
    peel = peel_rows(student, teacher, grad) and config.block >= 16 // student.element_size()  # a whole head
    jsd = _kernel_jsd_weights(params)
    with on_device_of(student):
        _kd_rows_kernel[(n_rows,)](
            student, teacher, g, labels if labels is not None else kd_rows, coefs.float(), kd_rows, ce_rows,
            rows_per_batch, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
            g.stride(0), g.stride(1),
            vocab, 1.0 / params.temperature, 1.0 / params.teacher_temperature, params.ignore_index,
            jsd.w_small, jsd.log_w_small, jsd.c, jsd.split, jsd.teacher, jsd.student,
            params.student_scale, params.student_cap, params.teacher_scale, params.teacher_cap,
            _misalignment(student),
            DIVERGENCE=params.divergence, HARD=params.hard, HAS_LABELS=labels is not None,
            WRITE_GRAD=grad is not None, TEACHER_IS_A=jsd.teacher_is_a, CAP_S=params.student_cap > 0,
            CAP_T=params.teacher_cap > 0, BLOCK=config.block, NUM_STAGES=config.num_stages, PEEL=peel,
            ALIGN=16 // student.element_size(), num_warps=config.num_warps,
        )
    return kd_rows, ce_rows


def scale_grad_(grad, grad_output) -> None:
    """grad *= grad_output (one value, or one per row), on the device, skipping rows scaled by 1."""
    n_batch, rows_per_batch, vocab = grad.shape
    block = min(4096, triton.next_power_of_2(vocab))
    grid = (n_batch * rows_per_batch, triton.cdiv(vocab, block))
    with on_device_of(grad):
        _scale_rows_kernel[grid](grad, grad_output.float().contiguous(), rows_per_batch, grad.stride(0),
                                 grad.stride(1), vocab, PER_ROW=grad_output.numel() != 1, BLOCK=block, num_warps=4)


# --- the vocabulary-parallel loss's per-shard kernels (kdfast.distributed; the contract in kdfast.backends) ---
# The same sweeps as _kd_rows_kernel's, on a rank's slice of each row: sweep 1 gives the slice's statistics;
# once the ranks have combined them, the mixture sweep (jsd, tvd) and the gradient sweep run against the
# rows' global normalisers, given as a shift and an offset per side: log p = (x - shift) / T - offset.

# The rows' fields, as constexpr indices (a jit function reads only constexpr globals).
(SHIFT_S, SHIFT_T, OFFSET_S, OFFSET_T, OFFSET_S1, ROW_KD, KL_STUDENT_MIX, MASS_BELOW, MASS_ABOVE, COEF_KD, COEF_CE,
 IGNORED) = (tl.constexpr(SHARD_ROWS.index(name)) for name in SHARD_ROWS)


@triton.jit
def _slice_rows(s_ptr, t_ptr, rows_per_batch, s_stride_b, s_stride_m, t_stride_b, t_stride_m):
    """(row, its student slice, its teacher slice) of this program."""
    row = tl.program_id(0).to(tl.int64)
    return (row, row_start(s_ptr, row, rows_per_batch, s_stride_b, s_stride_m),
            row_start(t_ptr, row, rows_per_batch, t_stride_b, t_stride_m))


@triton.jit
def _shard_stats_kernel(s_ptr, t_ptr, out_ptr, n_rows, rows_per_batch, s_stride_b, s_stride_m, t_stride_b,
                        t_stride_m, width, inv_temp, inv_temp_t, DIVERGENCE: tl.constexpr, HARD: tl.constexpr,
                        BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    row, s_row, t_row = _slice_rows(s_ptr, t_ptr, rows_per_batch, s_stride_b, s_stride_m, t_stride_b, t_stride_m)
    m_s, m_t, z_s, z_t, cross, z1 = online_softmax(s_row, t_row, 0, width, inv_temp, inv_temp_t, 1.0, 0.0, 1.0,
                                                   0.0, DIVERGENCE, HARD, False, False, BLOCK, NUM_STAGES)
    # A NaN in the slice makes its maximum NaN, as torch's amax does (tl.maximum may skip it).
    tl.store(out_ptr + row, tl.where(z_s == z_s, m_s, float("nan")))
    tl.store(out_ptr + n_rows + row, tl.where(z_t == z_t, m_t, float("nan")))
    tl.store(out_ptr + 2 * n_rows + row, z_s)
    tl.store(out_ptr + 3 * n_rows + row, z_t)
    tl.store(out_ptr + 4 * n_rows + row, z1)
    tl.store(out_ptr + 5 * n_rows + row, cross)


@triton.jit
def _shard_mixture_kernel(s_ptr, t_ptr, rows_ptr, out_ptr, n_rows, rows_per_batch, s_stride_b, s_stride_m,
                          t_stride_b, t_stride_m, width, inv_temp, inv_temp_t, w_small, log_w_small, jsd_c, jsd_split,
                          DIVERGENCE: tl.constexpr, TEACHER_IS_A: tl.constexpr, BLOCK: tl.constexpr,
                          NUM_STAGES: tl.constexpr):
    row, s_row, t_row = _slice_rows(s_ptr, t_ptr, rows_per_batch, s_stride_b, s_stride_m, t_stride_b, t_stride_m)
    row_values = rows_ptr + row
    # With weights (1, 0) mixture_terms's kd is the slice's KL(p_t || m); tvd's kd is its 0.5 sum |p_t - p_s|.
    kd, kl_student_mix, mass_below, mass_above = mixture_terms(
        s_row, t_row, 0, width, tl.load(row_values + SHIFT_S * n_rows), tl.load(row_values + SHIFT_T * n_rows),
        tl.load(row_values + OFFSET_S * n_rows), tl.load(row_values + OFFSET_T * n_rows), inv_temp,
        inv_temp_t, 1.0, 0.0, 1.0, 0.0, w_small, log_w_small, jsd_c, jsd_split, 1.0, 0.0, DIVERGENCE, TEACHER_IS_A,
        False, False, BLOCK, NUM_STAGES)
    tl.store(out_ptr + row, kd)
    tl.store(out_ptr + n_rows + row, kl_student_mix + mass_below)  # one of them is 0
    tl.store(out_ptr + 2 * n_rows + row, mass_above)


@triton.jit
def _shard_gradient_kernel(s_ptr, t_ptr, g_ptr, labels_ptr, rows_ptr, n_rows, rows_per_batch, s_stride_b, s_stride_m,
                           t_stride_b, t_stride_m, g_stride_b, g_stride_m, width, inv_temp, inv_temp_t, w_small,
                           log_w_small, jsd_c, jsd_split, w_student, DIVERGENCE: tl.constexpr, HARD: tl.constexpr,
                           TEACHER_IS_A: tl.constexpr, BLOCK: tl.constexpr, NUM_STAGES: tl.constexpr):
    row, s_row, t_row = _slice_rows(s_ptr, t_ptr, rows_per_batch, s_stride_b, s_stride_m, t_stride_b, t_stride_m)
    g_row = row_start(g_ptr, row, rows_per_batch, g_stride_b, g_stride_m)
    if tl.load(rows_ptr + IGNORED * n_rows + row) != 0:  # not read: a zero gradient, whatever the row holds
        fill_row(g_row, width, BLOCK)
    else:
        row_values = rows_ptr + row
        write_gradient(s_row, t_row, g_row, 0, width, tl.load(labels_ptr + row),
                       tl.load(row_values + SHIFT_S * n_rows), tl.load(row_values + SHIFT_T * n_rows),
                       tl.load(row_values + OFFSET_S * n_rows), tl.load(row_values + OFFSET_T * n_rows),
                       tl.load(row_values + OFFSET_S1 * n_rows), inv_temp, inv_temp_t, 1.0, 0.0, 1.0, 0.0,
                       tl.load(row_values + ROW_KD * n_rows), tl.load(row_values + KL_STUDENT_MIX * n_rows),
                       tl.load(row_values + MASS_BELOW * n_rows), tl.load(row_values + MASS_ABOVE * n_rows),
                       tl.load(row_values + COEF_KD * n_rows), tl.load(row_values + COEF_CE * n_rows), 0.0, w_small,
                       log_w_small, jsd_c, jsd_split, w_student, DIVERGENCE, HARD, TEACHER_IS_A, False, False, BLOCK,
                       NUM_STAGES)


def _slice_args(student, teacher) -> tuple:
    n_batch, rows_per_batch, width = student.shape
    return (n_batch * rows_per_batch, rows_per_batch, student.stride(0), student.stride(1), teacher.stride(0),
            teacher.stride(1))


def vocab_shard_stats(student, teacher, params: KernelParams):
    n_rows, width = student.shape[0] * student.shape[1], student.shape[2]
    out = torch.empty(len(SHARD_STATS), n_rows, dtype=torch.float32, device=student.device)
    config = launch_config(width)
    with on_device_of(student):
        _shard_stats_kernel[(n_rows,)](
            student, teacher, out, *_slice_args(student, teacher), width, 1.0 / params.temperature,
            1.0 / params.teacher_temperature, DIVERGENCE=params.divergence, HARD=params.hard, BLOCK=config.block,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    return out


def vocab_shard_mixture(student, teacher, rows, params: KernelParams):
    n_rows, width = student.shape[0] * student.shape[1], student.shape[2]
    out = torch.empty(3, n_rows, dtype=torch.float32, device=student.device)
    config = launch_config(width)
    jsd = _kernel_jsd_weights(params)
    with on_device_of(student):
        _shard_mixture_kernel[(n_rows,)](
            student, teacher, rows.float().contiguous(), out, *_slice_args(student, teacher), width,
            1.0 / params.temperature, 1.0 / params.teacher_temperature, jsd.w_small, jsd.log_w_small, jsd.c,
            jsd.split, DIVERGENCE=params.divergence, TEACHER_IS_A=jsd.teacher_is_a, BLOCK=config.block,
            NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    return out


def vocab_shard_gradient(student, teacher, labels, grad, rows, params: KernelParams) -> None:
    n_rows, width = student.shape[0] * student.shape[1], student.shape[2]
    config = launch_config(width)
    jsd = _kernel_jsd_weights(params)
    with on_device_of(student):
        _shard_gradient_kernel[(n_rows,)](
            student, teacher, grad, labels, rows.float().contiguous(), *_slice_args(student, teacher),
            grad.stride(0), grad.stride(1), width, 1.0 / params.temperature, 1.0 / params.teacher_temperature,
            jsd.w_small, jsd.log_w_small, jsd.c, jsd.split, jsd.student, DIVERGENCE=params.divergence,
            HARD=params.hard, TEACHER_IS_A=jsd.teacher_is_a, BLOCK=config.block, NUM_STAGES=config.num_stages,
            num_warps=config.num_warps)


# Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors: the CPU test-suite's way in.
BACKEND = Backend("triton", ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",),
                  (torch.float32, torch.bfloat16, torch.float16), unavailable_reason, kd_forward,
                  sparse_kd_forward=sparse_kd_forward, scale_grad_=scale_grad_, gradient_buffer=gradient_buffer,
                  vocab_shard=VocabShardKernels(vocab_shard_stats, vocab_shard_mixture, vocab_shard_gradient))
