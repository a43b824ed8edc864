"""Pure PyTorch backend: the closed-form loss and gradient, a chunk of rows at a time.

It runs on any device and in float64, and it is the CPU fallback when the C++ extension
cannot be built. Working on chunks of rows keeps the extra memory near one chunk of
temporaries instead of several N x V float32 tensors.
"""

from __future__ import annotations

import math

import torch

from . import FORWARD_KL, JSD, REVERSE_KL, KernelParams, compute_dtype

DEVICE_TYPES = None  # any device torch supports
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHUNK_ELEMENTS = 1 << 21  # elements per temporary; about eight temporaries are alive at once


def unavailable_reason() -> str | None:
    return None


def _weighted_sum(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(weight * values) over the last dim with 0 * inf = 0 (so 0 * log 0 = 0).

    weight is a probability and values a difference of log-probabilities, so a NaN in the
    product is 0 * inf; NaN inputs are handled per row by the caller.
    """
    return (weight * values).nan_to_num_(nan=0.0, posinf=math.inf, neginf=-math.inf).sum(-1)


def _chunk(s, t, labels, coefs, params: KernelParams, want_grad: bool):
    """Row losses (and the weighted gradient) of a (rows, V) chunk already in the compute dtype."""
    inv_temp = 1.0 / params.temperature
    max_s, max_t = s.amax(-1, keepdim=True), t.amax(-1, keepdim=True)
    # Centre before dividing by T: x - max is exact where it matters, even for huge logits.
    log_ps = torch.log_softmax((s - max_s).mul_(inv_temp), dim=-1)
    log_pt = torch.log_softmax((t - max_t).mul_(inv_temp), dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if params.divergence == FORWARD_KL:
        kd = _weighted_sum(pt, log_pt - log_ps)
        d_kd = ps - pt if want_grad else None
    elif params.divergence == REVERSE_KL:
        log_ratio = log_ps - log_pt
        kd = _weighted_sum(ps, log_ratio)
        d_kd = torch.where(ps > 0, ps * log_ratio.sub_(kd[:, None]), 0.0) if want_grad else None
    else:
        assert params.divergence == JSD and 0.0 < params.beta < 1.0
        beta = params.beta
        log_mix = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        student_vs_mix = log_ps - log_mix
        kl_student_mix = _weighted_sum(ps, student_vs_mix)
        kd = beta * _weighted_sum(pt, log_pt.sub_(log_mix)) + (1.0 - beta) * kl_student_mix
        d_kd = None
        if want_grad:
            d_kd = torch.where(ps > 0, ps * student_vs_mix.sub_(kl_student_mix[:, None]), 0.0).mul_(1.0 - beta)

    # NaN, +inf, or an all -inf row: the softmax is undefined, so the row loss is NaN.
    undefined = ~(torch.isfinite(max_s[:, 0]) & torch.isfinite(max_t[:, 0]))
    ignored = torch.zeros_like(undefined) if labels is None else labels == params.ignore_index
    kd = torch.where(ignored, 0.0, torch.where(undefined, torch.nan, kd))

    ce = torch.zeros_like(kd)
    d_ce = None
    if params.hard:
        in_range = (labels >= 0) & (labels < s.shape[-1])
        index = torch.where(in_range, labels, 0)[:, None]
        log_p1 = torch.log_softmax(s, dim=-1)
        ce = torch.where(in_range & ~undefined, -log_p1.gather(-1, index)[:, 0], torch.nan)
        ce = torch.where(ignored, 0.0, ce)
        if want_grad:
            d_ce = log_p1.exp_().scatter_add_(-1, index, -in_range[:, None].to(s.dtype))

    grad = None
    if want_grad:
        # Per-row factors: NaN for undefined rows and out-of-range labels.
        kd_scale = torch.where(undefined, torch.nan, coefs[0] * inv_temp)
        grad = d_kd.mul_(kd_scale[:, None])
        if d_ce is not None:
            grad.add_(d_ce.mul_(torch.where(in_range, coefs[1], torch.nan)[:, None]))
        grad[ignored] = 0.0  # ignored rows get no gradient, whatever their logits hold
    return kd, ce, grad


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    n_batch, n_rows, vocab = student.shape
    dtype = compute_dtype(student.dtype, teacher.dtype)
    kd_rows = torch.zeros(n_batch * n_rows, dtype=dtype, device=student.device)
    ce_rows = torch.zeros_like(kd_rows)
    coefs = coefs.to(dtype)
    step = max(1, CHUNK_ELEMENTS // vocab)
    for b in range(n_batch):
        for m0 in range(0, n_rows, step):
            m1 = min(n_rows, m0 + step)
            r0, r1 = b * n_rows + m0, b * n_rows + m1
            chunk_labels = None if labels is None else labels[r0:r1]
            kd, ce, g = _chunk(student[b, m0:m1].to(dtype), teacher[b, m0:m1].to(dtype), chunk_labels, coefs,
                               params, want_grad=grad is not None)
            kd_rows[r0:r1] = kd
            ce_rows[r0:r1] = ce
            if grad is not None:
                grad[b, m0:m1] = g
    return kd_rows, ce_rows
