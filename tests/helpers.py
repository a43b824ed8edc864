"""Input generators and the comparison against kdfast.reference used across the tests."""

from __future__ import annotations

import os

import torch

import kdfast
from kdfast.reference import kd_loss_reference

# Relative error allowed for fp32 math (1e-10 for float64 inputs), or ten times the error
# of the textbook formulas evaluated in fp32 on the same inputs when that is larger (an
# ill-conditioned case: a tiny divergence, a one-hot softmax). A bf16/fp16 student's
# gradient is stored in its dtype, and rounded again when backward scales it by a
# grad_output other than 1, so it may differ by three times what rounding the reference
# itself to that dtype costs on top (fp16 gradients of a batch mean are often subnormal).
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
    base_tol = math_tol or MATH_TOLERANCE[student.dtype]
    fp32_floor = student.dtype != torch.float64
    loss_tol = max(base_tol, 10 * rel_err(ref32, ref)) if fp32_floor else base_tol
    grad_tol = max(base_tol, 10 * rel_err(ref32_grad, ref_grad)) if fp32_floor else base_tol
    # Triton's interpreter converts fp32 to bf16/fp16 by truncation, not round-to-nearest
    # as GPUs do: twice the rounding error.
    rounding_factor = 6 if backend == "triton" and student.device.type == "cpu" else 3
    grad_tol += rounding_factor * rel_err(ref_grad.to(student.dtype), ref_grad)
    loss_err, grad_err = rel_err(loss, ref), rel_err(s.grad, ref_grad)
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
