"""The loss implementations the suites time: kdfast's backends and the peers it must beat.

Every implementation is a function of the problem's tensors, the temperature and the divergence
that returns the scalar batchmean loss times T**2 (the kd_loss defaults):
``(student, teacher, T, divergence)`` for logits, ``(student_hidden, student_weight, teacher_hidden,
teacher_weight, T, divergence)`` for the fused-linear problem, ``(student, teacher_ids,
teacher_logprobs, T, divergence)`` for the sparse teacher (tail "bucket"). ``implementations`` lists those that
can run on a device, and why the others cannot.
"""

from __future__ import annotations

import functools
import importlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kdfast
from kdfast.backends.registry import BACKENDS, backend, kernel_unavailable_reason
from kdfast.sparse import MASS_TOLERANCE

from .problems import MODES

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
JSD_BETA = 0.5  # kd_loss's default: the mixture weight of the teacher in jsd
LIGER_BETA = {"forward_kl": 0.0, "reverse_kl": 1.0, "jsd": JSD_BETA}  # Liger's JSD: beta 0 / 1 = forward / reverse KL


@dataclass(frozen=True)
class Impl:
    name: str
    kind: str  # "kdfast": a wrong result fails the run; "peer": what kdfast is compared with
    label: str
    loss: Callable
    divergences: tuple[str, ...] = DIVERGENCES
    modes: tuple[str, ...] = MODES
    inplace: bool = False  # overwrites its student inputs, so each run gets a fresh copy


# --- peers on logits ------------------------------------------------------------------------------

def classic(student, teacher, temperature, divergence):
    """The recipe found in most KD code: softmax, then log, in the logits' dtype (forward KL only)."""
    assert divergence == "forward_kl"
    log_ps = torch.log(torch.softmax(student / temperature, dim=-1))
    return F.kl_div(log_ps, torch.softmax(teacher / temperature, dim=-1), reduction="batchmean") * temperature**2


def _kl(log_p, log_q):
    """KL(p || q), batchmean, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def divergence_of_log_probs(log_ps, log_pt, divergence):
    if divergence == "forward_kl":
        return _kl(log_pt, log_ps)
    if divergence == "reverse_kl":
        return _kl(log_ps, log_pt)
    log_mix = torch.logaddexp(log_pt + math.log(JSD_BETA), log_ps + math.log1p(-JSD_BETA))
    return JSD_BETA * _kl(log_pt, log_mix) + (1 - JSD_BETA) * _kl(log_ps, log_mix)


def careful_eager(student, teacher, temperature, divergence):
    """The careful recipe: fp32 upcast, log_softmax on both sides, kl_div(log_target=True)."""
    log_ps = torch.log_softmax(student.float() / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher.float() / temperature, dim=-1)
    return divergence_of_log_probs(log_ps, log_pt, divergence) * temperature**2


@functools.cache
def compiled_careful_eager():
    # Static shapes, as a training run has; the runner calls torch._dynamo.reset() between input
    # sets, so the recompile limit is never reached (past it torch.compile falls back to eager).
    return torch.compile(careful_eager, dynamic=False)


def compiled(student, teacher, temperature, divergence):
    return compiled_careful_eager()(student, teacher, temperature, divergence)


def _liger():
    return importlib.import_module("liger_kernel.transformers")


@functools.cache
def _liger_module(name: str, **kwargs):
    return getattr(_liger(), name)(**kwargs)


def liger_kldiv(student, teacher, temperature, divergence):
    """LigerKLDIVLoss on torch's log_softmax outputs, in the logits' dtype (forward KL only)."""
    assert divergence == "forward_kl"
    log_ps = torch.log_softmax(student / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher / temperature, dim=-1)
    return _liger_module("LigerKLDIVLoss", reduction="batchmean", log_target=True)(log_ps, log_pt) * temperature**2


def liger_jsd(student, teacher, temperature, divergence):
    """LigerJSD(beta) on torch's log_softmax outputs: beta 0 is forward KL, 1 reverse KL."""
    log_ps = torch.log_softmax(student / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher / temperature, dim=-1)
    return _liger_module("LigerJSD", beta=LIGER_BETA[divergence])(log_ps, log_pt) * temperature**2


# --- sparse teachers: the teacher's top-k ids and log-probabilities in ------------------------------

def sparse_careful_eager(student, ids, logprobs, temperature, divergence):
    """sparse_kd_loss's "bucket" tail, carefully: fp32 log_softmax, the ids gathered, the student's rest
    from the logsumexp of the complement (no cancellation), the teacher's rest 1 - sum q (none within
    the log-probs' rounding), then the divergence over the K + 1 categories."""
    log_p = torch.log_softmax(student.float() / temperature, dim=-1)
    log_rest = torch.logsumexp(log_p.scatter(-1, ids, -math.inf), dim=-1, keepdim=True)
    log_q = logprobs.float()
    rest = 1.0 - log_q.exp().sum(-1, keepdim=True)
    log_teacher_rest = torch.where(rest > MASS_TOLERANCE[logprobs.dtype], rest, 0.0).log()
    return divergence_of_log_probs(torch.cat([log_p.gather(-1, ids), log_rest], -1),
                                   torch.cat([log_q, log_teacher_rest], -1), divergence) * temperature**2


@functools.cache
def compiled_sparse_careful_eager():
    return torch.compile(sparse_careful_eager, dynamic=False)


def sparse_compiled(student, ids, logprobs, temperature, divergence):
    return compiled_sparse_careful_eager()(student, ids, logprobs, temperature, divergence)


# --- fused linear: hidden states and lm_head weights in -------------------------------------------

def _logits(student_hidden, student_weight, teacher_hidden, teacher_weight):
    with torch.no_grad():
        teacher = teacher_hidden @ teacher_weight.T
    return student_hidden @ student_weight.T, teacher


def matmuls_then(loss: Callable) -> Callable:
    """The unfused pipeline: both lm_head matmuls, then ``loss`` on the full logits."""
    def fused_signature(sh, sw, th, tw, temperature, divergence):
        return loss(*_logits(sh, sw, th, tw), temperature, divergence)
    return fused_signature


def kdfast_fused(sh, sw, th, tw, temperature, divergence):
    extra = {"beta": JSD_BETA} if divergence == "jsd" else {}
    return kdfast.fused_linear_kd_loss(sh, sw, th, tw, temperature=temperature, divergence=divergence,
                                       reduction="batchmean", **extra)


def liger_fused_jsd(sh, sw, th, tw, temperature, divergence):
    # Liger's loss is not multiplied by T**2.
    module = _liger_module("LigerFusedLinearJSD", jsd_beta=LIGER_BETA[divergence], temperature=temperature)
    return module(sh, sw, th, tw) * temperature**2


# --- what can run where ---------------------------------------------------------------------------

def _kdfast_logits(backend: str, inplace: bool) -> Callable:
    def loss(student, teacher, temperature, divergence, **options):  # options: a variant's (problems.VARIANTS)
        return kdfast.kd_loss(student, teacher, temperature=temperature, divergence=divergence, beta=JSD_BETA,
                              backend=backend, inplace_backward=inplace, **options)
    return loss


def _kdfast_sparse(backend: str, inplace: bool) -> Callable:
    def loss(student, ids, logprobs, temperature, divergence):
        return kdfast.sparse_kd_loss(student, ids, logprobs, temperature=temperature, divergence=divergence,
                                     beta=JSD_BETA, backend=backend, inplace_backward=inplace)
    return loss


def _kdfast_backend_reason(name: str, device: str, kernel: str) -> str | None:
    status = kdfast.available_backends()[name]
    if not status.available:
        return status.reason
    reason = kernel_unavailable_reason(name, kernel)
    if reason:
        return reason
    types = backend(name).device_types
    if name == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return "runs in Triton's interpreter here, which is not a performance path (the tests cover it)"
    if types is not None and device not in types:
        return f"runs on {' and '.join(types)} tensors only"
    return None


def _liger_reason(device: str) -> str | None:
    if device != "cuda":
        return "Liger-Kernel's kernels need a CUDA device"
    try:
        _liger()
    except Exception as exc:  # an ImportError, or Triton failing to initialise
        return f"liger_kernel is not importable ({type(exc).__name__}: {exc})"
    return None


def implementations(problem: str, device: str) -> tuple[list[Impl], dict[str, str]]:
    """(the implementations of ``problem`` that run on ``device``, {name: why not} for the others)."""
    impls, skipped = [], {}
    liger_reason = _liger_reason(device)
    if problem in ("logits", "sparse"):
        kernel, kdfast_loss = ("kd_forward", _kdfast_logits) if problem == "logits" \
            else ("sparse_kd_forward", _kdfast_sparse)
        for backend in BACKENDS:
            reason = _kdfast_backend_reason(backend, device, kernel)
            if reason:
                skipped[f"kdfast-{backend}"] = reason
                continue
            impls.append(Impl(f"kdfast-{backend}", "kdfast", f"kdfast, backend={backend!r}",
                              kdfast_loss(backend, False)))
            if backend != "torch":  # the fallback's inplace path is covered by the tests, not timed
                impls.append(Impl(f"kdfast-{backend}-inplace", "kdfast",
                                  f"kdfast, backend={backend!r}, inplace_backward=True",
                                  kdfast_loss(backend, True), modes=("fwd+bwd",), inplace=True))
    if problem == "sparse":
        impls += [
            Impl("eager", "peer", "careful eager: fp32 log_softmax, gather, the rest by logsumexp of the complement, "
                 "kl_div over the K + 1 categories", sparse_careful_eager),
            Impl("compile", "peer", "torch.compile of the careful eager", sparse_compiled),
        ]
        liger = []  # Liger has no sparse-teacher loss
    elif problem == "logits":
        impls += [
            Impl("classic", "peer", "classic recipe: kl_div(log(softmax(s/T)), softmax(t/T)), logits' dtype",
                 classic, divergences=("forward_kl",)),
            Impl("eager", "peer", "careful eager: fp32 upcast, log_softmax, kl_div(log_target=True)", careful_eager),
            Impl("compile", "peer", "torch.compile of the careful eager", compiled),
        ]
        liger = [Impl("liger-kldiv", "peer", "Liger LigerKLDIVLoss on torch log_softmax", liger_kldiv,
                      divergences=("forward_kl",)),
                 Impl("liger-jsd", "peer", "Liger LigerJSD(beta 0 / 1 / 0.5) on torch log_softmax", liger_jsd)]
    else:
        if hasattr(kdfast, "fused_linear_kd_loss"):
            impls.append(Impl("kdfast-fused", "kdfast", "kdfast.fused_linear_kd_loss", kdfast_fused))
        else:
            skipped["kdfast-fused"] = "kdfast.fused_linear_kd_loss does not exist yet"
        impls += [
            Impl("mm+kdfast", "peer", "matmuls + kdfast.kd_loss on the full logits", matmuls_then(_kdfast_logits(
                "auto", False))),
            Impl("mm+eager", "peer", "matmuls + careful eager loss", matmuls_then(careful_eager)),
            Impl("mm+compile", "peer", "matmuls + torch.compile'd careful eager loss", matmuls_then(compiled)),
        ]
        liger = [Impl("liger-fused-jsd", "peer", "Liger LigerFusedLinearJSD(jsd_beta 0 / 1 / 0.5)", liger_fused_jsd)]
    for impl in liger:
        if liger_reason:
            skipped[impl.name] = liger_reason
        else:
            impls.append(impl)
    return impls, skipped
