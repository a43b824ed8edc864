"""Pure PyTorch backend: the closed-form loss and gradient, a chunk of rows at a time.

It runs on any device and in float64, and it is the CPU fallback when the C++ extension
cannot be built. Working on chunks of rows keeps the extra memory near one chunk of
temporaries instead of several N x V float32 tensors.
"""

from __future__ import annotations

import math

import torch

from . import FORWARD_KL, JSD, REVERSE_KL, KernelParams

DEVICE_TYPES = None  # any device torch supports
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
CHUNK_ELEMENTS = 1 << 20  # elements per temporary; about ten temporaries are alive at once


def unavailable_reason() -> str | None:
    return None


def _masked_sum(weight: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """sum(weight * values) over the last dim, with 0 * anything = 0 (so 0 * log 0 = 0)."""
    return torch.where(weight > 0, weight * values, 0.0).sum(-1)


def _chunk(s, t, labels, coefs, params: KernelParams, want_grad: bool):
    """Row losses (and the weighted gradient) of a (rows, V) chunk already in the compute dtype."""
    inv_temp = 1.0 / params.temperature
    # Centre before dividing by T: x - max is exact where it matters, even for huge logits.
    log_ps = torch.log_softmax((s - s.amax(-1, keepdim=True)) * inv_temp, dim=-1)
    log_pt = torch.log_softmax((t - t.amax(-1, keepdim=True)) * inv_temp, dim=-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    if params.divergence == FORWARD_KL:
        kd = _masked_sum(pt, log_pt - log_ps)
        d_kd = ps - pt
    elif params.divergence == REVERSE_KL:
        kd = _masked_sum(ps, log_ps - log_pt)
        d_kd = torch.where(ps > 0, ps * (log_ps - log_pt - kd[:, None]), 0.0)
    else:
        assert params.divergence == JSD and 0.0 < params.beta < 1.0
        beta = params.beta
        log_mix = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log1p(-beta))
        kl_student_mix = _masked_sum(ps, log_ps - log_mix)
        kd = beta * _masked_sum(pt, log_pt - log_mix) + (1.0 - beta) * kl_student_mix
        d_kd = (1.0 - beta) * torch.where(ps > 0, ps * (log_ps - log_mix - kl_student_mix[:, None]), 0.0)

    # NaN, +inf, or an all -inf row: the softmax is undefined, so the row loss is NaN.
    undefined = ~(torch.isfinite(s.amax(-1)) & torch.isfinite(t.amax(-1)))
    kd = torch.where(undefined, torch.nan, kd)
    ignored = torch.zeros_like(undefined) if labels is None else labels == params.ignore_index
    kd = torch.where(ignored, 0.0, kd)

    ce = torch.zeros_like(kd)
    d_ce = None
    if params.hard:
        in_range = (labels >= 0) & (labels < s.shape[-1])
        index = torch.where(in_range, labels, 0)[:, None]
        log_p1 = torch.log_softmax(s, dim=-1)
        ce = torch.where(in_range, -log_p1.gather(-1, index)[:, 0], torch.nan)
        ce = torch.where(undefined & ~ignored, torch.nan, torch.where(ignored, 0.0, ce))
        if want_grad:
            d_ce = log_p1.exp().scatter_add(-1, index, -in_range[:, None].to(s.dtype))
            d_ce = torch.where(in_range[:, None], d_ce, torch.nan)

    grad = None
    if want_grad:
        grad = coefs[0] * inv_temp * d_kd
        if d_ce is not None:
            grad = grad + coefs[1] * d_ce
        grad = torch.where(undefined[:, None], torch.nan, grad)
        grad = torch.where(ignored[:, None], 0.0, grad)
    return kd, ce, grad


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    n_batch, n_rows, vocab = student.shape
    dtype = torch.float64 if torch.float64 in (student.dtype, teacher.dtype) else torch.float32
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
