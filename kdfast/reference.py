"""A float64 oracle for kd_loss, written from the definition with plain autograd ops.

It materialises every intermediate, so it is slow and memory-hungry on purpose; the
tests and benchmarks compare each backend with it, gradients included (via autograd).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row, with 0 * log 0 = 0 (safe under autograd)."""
    p = log_p.exp()
    live = p > 0
    diff = torch.where(live, log_p, 0.0) - torch.where(live, log_q, 0.0)
    return torch.where(live, p * diff, 0.0).sum(-1)


def _side(option, side: int):
    """One side's value of a per-side option: None, one number for both, or a (student, teacher) pair."""
    return option[side] if isinstance(option, (tuple, list)) else option


def transformed_logits(x: torch.Tensor, softcap=None, logit_scale=None, side: int = 0) -> torch.Tensor:
    """A side's logits as its model outputs them: scaled by logit_scale, then soft-capped."""
    scale, cap = _side(logit_scale, side), _side(softcap, side)
    if scale is not None:
        x = x * scale
    return x if cap is None else cap * torch.tanh(x / cap)


def kd_loss_reference(student_logits, teacher_logits, *, temperature=1.0, teacher_temperature=None,
                      divergence="forward_kl", beta=0.5, labels=None, ignore_index=-100, reduction="batchmean",
                      scale_t2=True, hard_weight=0.0, soft_weight=1.0, vocab_size=None, softcap=None,
                      logit_scale=None, return_parts=False, dtype=torch.float64):
    """kd_loss computed in ``dtype`` (float64: the oracle; float32: how well plain fp32 math
    can do on these inputs); returns (loss, kd, hard) when return_parts, like kdfast.kd_loss."""
    s = transformed_logits(student_logits.to(dtype), softcap, logit_scale, side=0)
    t = transformed_logits(teacher_logits.detach().to(dtype), softcap, logit_scale, side=1)
    if vocab_size is not None:
        s, t = s[..., :vocab_size], t[..., :vocab_size]
    lead_shape, vocab = s.shape[:-1], s.shape[-1]
    s, t = s.reshape(-1, vocab), t.reshape(-1, vocab)
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / (temperature if teacher_temperature is None else teacher_temperature), dim=-1)

    kd = _divergence_over_categories(log_ps, log_pt, divergence, beta)
    # A row holding NaN or +inf, or only -inf, has no softmax: its loss is NaN.
    undefined = ~(torch.isfinite(s.detach().amax(-1)) & torch.isfinite(t.amax(-1)))
    kd = torch.where(undefined, torch.nan, kd)
    return _reduce(s, kd, labels, lead_shape, vocab, ignore_index, reduction, temperature, scale_t2, hard_weight,
                   soft_weight, None, return_parts)


def _reduce(s, kd, labels, lead_shape, vocab, ignore_index, reduction, temperature, scale_t2, hard_weight,
            soft_weight, num_items_in_batch, return_parts):
    """The loss from the per-row divergences kd of the (rows, V) student logits s, as kd_loss reduces it."""
    counted = torch.ones_like(kd, dtype=torch.bool) if labels is None else labels.reshape(-1) != ignore_index
    kd = torch.where(counted, kd, 0.0)
    ce = torch.zeros_like(kd)
    if hard_weight:
        ce = F.cross_entropy(s, labels.reshape(-1), ignore_index=ignore_index, reduction="none")

    kd_scale = temperature**2 if scale_t2 else 1.0
    n = counted.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if reduction == "none":
        kd_part, hard_part = kd_scale * kd.reshape(lead_shape), ce.reshape(lead_shape)
    elif reduction == "sum":
        kd_part, hard_part = kd_scale * kd.sum(), ce.sum()
    elif reduction == "batchmean":
        kd_part, hard_part = kd_scale * kd.sum() / n, ce.sum() / n
    else:  # "mean": torch's KLDivLoss meaning, divided by rows x V; the cross-entropy by rows
        kd_part, hard_part = kd_scale * kd.sum() / (n * vocab), ce.sum() / n
    loss = soft_weight * kd_part + hard_weight * hard_part
    return (loss, kd_part.detach(), hard_part.detach()) if return_parts else loss


def _divergence_over_categories(log_p: torch.Tensor, log_q: torch.Tensor, divergence: str, beta: float):
    """The divergence between the student's (p) and the teacher's (q) distributions over the last dim,
    given as log-probabilities."""
    if divergence == "jsd" and beta in (0.0, 1.0):  # the GKD / Liger convention
        divergence = "forward_kl" if beta == 0.0 else "reverse_kl"
    if divergence == "forward_kl":
        return _kl_rows(log_q, log_p)
    if divergence == "reverse_kl":
        return _kl_rows(log_p, log_q)
    if divergence == "tvd":  # autograd's subgradient of |x| at 0 is 0
        return 0.5 * (log_q.exp() - log_p.exp()).abs().sum(-1)
    # jsd. Where both sides are -inf the mixture is 0 and unused; a finite stand-in keeps
    # logsumexp's gradient free of NaN there.
    dead = (log_q == -math.inf) & (log_p == -math.inf)
    log_mix = torch.logsumexp(torch.stack([torch.where(dead, 0.0, log_q + math.log(beta)),
                                           torch.where(dead, 0.0, log_p + math.log(1.0 - beta))]), dim=0)
    return beta * _kl_rows(log_q, log_mix) + (1.0 - beta) * _kl_rows(log_p, log_mix)


def sparse_kd_loss_reference(student_logits, teacher_ids, teacher_logprobs, *, temperature=1.0,
                             divergence="forward_kl", beta=0.5, tail="bucket", mass_tolerance=1e-4, labels=None,
                             ignore_index=-100, reduction="batchmean", scale_t2=True, hard_weight=0.0,
                             soft_weight=1.0, num_items_in_batch=None, softcap=None, logit_scale=None,
                             return_parts=False, dtype=torch.float64):
    """sparse_kd_loss from its definition, in ``dtype``: the teacher's distribution is its
    log-probabilities at the row's ids (-1: padding) and, for tail="bucket", one more category
    holding the rest of its mass, against the student's softmax gathered at those ids and its
    own rest, computed from the complement of the ids (the tail is no category when the ids
    cover the vocabulary, and the teacher has none when its rest is within mass_tolerance)."""
    s = transformed_logits(student_logits.to(dtype), softcap, logit_scale, side=0)
    lead_shape, vocab = s.shape[:-1], s.shape[-1]
    s = s.reshape(-1, vocab)
    ids = teacher_ids.reshape(s.shape[0], -1).long()
    log_q = teacher_logprobs.reshape(ids.shape).to(dtype)
    valid = ids >= 0
    log_p = torch.log_softmax(s / temperature, dim=-1)
    log_pk = torch.where(valid, log_p.gather(-1, ids.clamp(min=0)), -math.inf)
    log_qk = torch.where(valid, log_q, -math.inf)
    if tail == "bucket":
        in_ids = torch.zeros(s.shape[0], vocab + 1, dtype=torch.bool)
        in_ids = in_ids.scatter(-1, torch.where(valid, ids, vocab), True)[:, :vocab]
        covers = in_ids.all(-1)
        # (A finite stand-in where the ids cover V keeps logsumexp's gradient free of NaN.)
        outside = torch.where(covers[:, None], 0.0, log_p.masked_fill(in_ids, -math.inf))
        log_rest = torch.where(covers, -math.inf, torch.logsumexp(outside, -1))
        rest = 1.0 - log_qk.exp().sum(-1)
        rest = torch.where(~covers & (rest > mass_tolerance), rest, 0.0)
        kd = _divergence_over_categories(torch.cat([log_pk, log_rest[:, None]], -1),
                                         torch.cat([log_qk, rest.log()[:, None]], -1), divergence, beta)
    else:
        if tail == "renorm":
            mass = log_qk.exp().sum(-1, keepdim=True)
            log_qk = torch.where(valid & (mass > 0), log_qk - mass.log(), -math.inf)
        q = log_qk.exp()
        kd = torch.where(q > 0, q * (torch.where(q > 0, log_qk, 0.0) - log_pk), 0.0).sum(-1)  # forward KL only
    kd = torch.where(valid.any(-1), kd, 0.0)  # no teacher mass at all: no divergence
    undefined = ~torch.isfinite(s.detach().amax(-1))
    kd = torch.where(undefined, torch.nan, kd)
    return _reduce(s, kd, labels, lead_shape, vocab, ignore_index, reduction, temperature, scale_t2, hard_weight,
                   soft_weight, num_items_in_batch, return_parts)
