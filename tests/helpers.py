"""Input generators and the comparison against kdfast.reference used across the tests."""

from __future__ import annotations

import math
import os

import torch

import kdfast
from kdfast.reference import kd_loss_reference, transformed_logits

# Relative error allowed for fp32 math (1e-10 for float64 inputs), or ten times the error
# of the textbook formulas evaluated in fp32 on the same inputs when that is larger (an
# ill-conditioned case: a tiny divergence, a one-hot softmax). A bf16/fp16 student's
# gradient is stored in its dtype, and rounded again when backward scales it by a
# grad_output other than 1: on top, twice what those two roundings cost the reference
# (run_and_compare; fp16 gradients of a batch mean are often subnormal).
MATH_TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


def make_logits(gen, shape, dtype=torch.float32, device="cpu", scale=3.0, teacher_noise=0.7):
    """Student and teacher logits of a realistic spread; the teacher is a perturbed student,
    so the divergence is small and cancellation errors would show."""
    s = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    t = s + torch.randn(shape, generator=gen, dtype=torch.float64) * scale * teacher_noise
    return s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)


def make_labels(gen, lead_shape, vocab, device="cpu", ignore_fraction=0.25, ignore_index=-100):
    labels = torch.randint(0, vocab, lead_shape, generator=gen)
    labels[torch.rand(lead_shape, generator=gen) < ignore_fraction] = ignore_index
    return labels.to(device)


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert torch.isfinite(x).all(), f"non-finite values: {x}"
    scale = ref.norm().item()
    return (x - ref).norm().item() / (scale if scale > 0 else 1.0)


def stored_as(x: torch.Tensor, dtype: torch.dtype, truncated: bool = False) -> torch.Tensor:
    """x rounded to dtype as a kernel stores it: to nearest, or toward zero as Triton's interpreter
    converts fp32 to bf16/fp16 (GPUs round to nearest)."""
    rounded = x.to(dtype)
    if not truncated or dtype not in (torch.bfloat16, torch.float16):
        return rounded
    away = rounded.to(x.dtype).abs() > x.abs()
    return torch.where(away, torch.nextafter(rounded, torch.zeros_like(rounded)), rounded)


def tvd_undecided_rows(student, teacher, temperature=1.0, teacher_temperature=None, softcap=None, logit_scale=None,
                       vocab_size=None, **_) -> torch.Tensor:
    """The rows (a mask over the leading dims) where some entry's p_s and p_t differ, but by less than fp32
    resolves: TVD's gradient jumps with the sign of p_s - p_t, and a kernel's fp32 probabilities may fall
    on the other side of the float64 ones (measured: p_s, p_t = 5.696057e-4 apart by 6e-8 relative)."""
    temperature_t = temperature if teacher_temperature is None else teacher_temperature
    z_s = transformed_logits(student.detach().cpu().double(), softcap, logit_scale, side=0)[..., :vocab_size]
    z_t = transformed_logits(teacher.detach().cpu().double(), softcap, logit_scale, side=1)[..., :vocab_size]
    z_s, z_t = z_s / temperature, z_t / temperature_t
    log_ps, log_pt = z_s.log_softmax(-1), z_t.log_softmax(-1)
    # exp of (z - max - log Z) in fp32: a relative error of a few ulps of its exponent, and of z where z is
    # rounded (a transform); z - max itself is exact.
    resolution = 2.0**-20 * (1 + log_ps.abs() + log_pt.abs())
    if softcap is not None or logit_scale is not None:
        resolution = resolution + 2.0**-20 * (z_s.abs() + z_t.abs())
    gap = (log_ps.exp() - log_pt.exp()).abs()
    undecided = (gap > 0) & (gap <= resolution * torch.maximum(log_ps, log_pt).exp())
    return (undecided & (log_ps > -math.inf) & (log_pt > -math.inf)).any(-1)  # an exact 0 is decided


def run_and_compare(student, teacher, *, labels=None, backend, grad_scale=None, math_tol=None, **options):
    """kd_loss and its gradient against the float64 reference on the same (rounded) inputs.

    grad_scale: the upstream gradient (default: random, so the backward scaling is exercised).
    math_tol: the relative error allowed for fp32 math (default MATH_TOLERANCE by dtype).
    Returns (loss, reference loss, loss error, gradient error).
    """
    s = student.detach().clone().requires_grad_()
    loss = kdfast.kd_loss(s, teacher, labels=labels, backend=backend, **options)
    if grad_scale is None:
        grad_scale = torch.rand(loss.shape, dtype=torch.float64) + 0.5  # global RNG, seeded per test
    (loss.double().cpu() * grad_scale).sum().backward()

    references = {}
    for dtype in (torch.float64, torch.float32):
        leaf = student.detach().cpu().to(dtype).requires_grad_()
        ref = kd_loss_reference(leaf, teacher.cpu(), labels=None if labels is None else labels.cpu(), dtype=dtype,
                                **options)
        (ref * grad_scale.to(dtype)).sum().backward()
        references[dtype] = (ref.detach(), leaf.grad)
    (ref, ref_grad), (ref32, ref32_grad) = references[torch.float64], references[torch.float32]

    assert s.grad is not None and s.grad.dtype == student.dtype and s.grad.shape == student.shape
    grad, unscaled = s.grad, ref_grad / (grad_scale[..., None] if grad_scale.dim() else grad_scale)
    if options.get("divergence") == "tvd":  # the gradients of the rows fp32 cannot decide are not compared
        decided = ~tvd_undecided_rows(student, teacher, **options)
        assert decided.float().mean() > 0.5, "most rows are near a tie of p_s and p_t: not a test of the gradient"
        grad, ref_grad, ref32_grad, unscaled = (grad[decided.to(grad.device)], ref_grad[decided],
                                                ref32_grad[decided], unscaled[decided])
    base_tol = math_tol or MATH_TOLERANCE[student.dtype]
    fp32_floor = student.dtype != torch.float64
    loss_tol = max(base_tol, 10 * rel_err(ref32, ref)) if fp32_floor else base_tol
    grad_tol = max(base_tol, 10 * rel_err(ref32_grad, ref_grad)) if fp32_floor else base_tol
    # The kernel stores the gradient for grad_output 1, and backward rounds it again once scaled: twice
    # what each of those roundings costs the reference.
    truncated = interpreted(backend, student.device.type)
    grad_tol += 2 * (rel_err(stored_as(unscaled, student.dtype, truncated), unscaled)
                     + rel_err(stored_as(ref_grad, student.dtype, truncated), ref_grad))
    loss_err, grad_err = rel_err(loss, ref), rel_err(grad, ref_grad)
    assert loss_err <= loss_tol, f"loss {loss.tolist()} vs reference {ref.tolist()}: relative error {loss_err:.2e}"
    assert grad_err <= grad_tol, f"gradient relative error {grad_err:.2e} > {grad_tol:.2e}"
    return loss, ref, loss_err, grad_err


def make_inputs(gen, n, hs, ht, vocab, teacher_vocab=None, dtype=torch.float32, device="cpu"):
    """Hidden states and lm_heads whose logits have a realistic spread (std ~ 3)."""
    teacher_vocab = teacher_vocab or vocab

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(device=device, dtype=dtype)

    return dict(student_hidden=randn(n, hs), student_weight=randn(vocab, hs, scale=3 / hs**0.5),
                teacher_hidden=randn(n, ht), teacher_weight=randn(teacher_vocab, ht, scale=3 / ht**0.5),
                student_bias=randn(vocab, scale=0.5), teacher_bias=randn(teacher_vocab, scale=0.5))


def runnable_backends():
    """(backend, device) pairs that work in this process."""
    status = kdfast.available_backends()
    pairs = []
    for name in ("torch", "cpu", "triton", "cuda"):
        if not status[name].available:
            continue
        if name in ("torch", "cpu") or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            pairs.append((name, "cpu"))
        if name != "cpu" and torch.cuda.is_available():
            pairs.append((name, "cuda"))
    return pairs


def interpreted(backend: str, device: str) -> bool:
    """Triton's interpreter is slow: such tests use small shapes."""
    return backend == "triton" and device == "cpu"
