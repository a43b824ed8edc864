"""fused_linear_kd_loss against matmuls + the float64 reference: loss and the gradients of
the student's hidden states, lm_head weight and bias."""

import pytest
import torch

from helpers import interpreted, make_inputs, make_labels, rel_err, runnable_backends

import kdfast
from kdfast.reference import kd_loss_reference

BACKENDS = runnable_backends()


def check(inputs, labels, backend, tol, **options):
    """Loss and gradients of fused_linear_kd_loss vs the float64 reference on torch's own logits."""
    leaves = {k: v.detach().clone().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    loss = kdfast.fused_linear_kd_loss(**leaves, labels=labels, backend=backend, **options)
    upstream = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    (loss.double().cpu() * upstream).sum().backward()

    ref_leaves = {k: v.detach().cpu().double().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    vocab = options.get("vocab_size")
    student_logits = torch.nn.functional.linear(ref_leaves["student_hidden"], ref_leaves["student_weight"],
                                                ref_leaves["student_bias"])
    teacher_logits = torch.nn.functional.linear(ref_leaves["teacher_hidden"], ref_leaves["teacher_weight"],
                                                ref_leaves["teacher_bias"])
    ref_options = {k: v for k, v in options.items() if k != "chunk_size"}
    ref = kd_loss_reference(student_logits[..., :vocab] if vocab else student_logits, teacher_logits,
                            labels=None if labels is None else labels.cpu(), **ref_options)
    (ref * upstream).sum().backward()
    assert rel_err(loss, ref) < tol, (loss, ref)
    for name in ("student_hidden", "student_weight", "student_bias"):
        err = rel_err(leaves[name].grad, ref_leaves[name].grad)
        assert err < tol, f"{name} gradient: relative error {err:.2e}"
        assert leaves[name].grad.dtype == inputs[name].dtype


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_matches_matmul_and_reference(gen, backend, device, divergence, reduction):
    n, vocab = (19, 131) if interpreted(backend, device) else (53, 517)
    inputs = make_inputs(gen, n, 24, 40, vocab, device=device)
    labels = make_labels(gen, (n,), vocab, device)
    check(inputs, labels, backend, 1e-5, chunk_size=8, temperature=2.0, divergence=divergence, beta=0.3,
          reduction=reduction, hard_weight=0.25)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_teacher_temperature(gen, backend, device, divergence):
    n, vocab = (19, 131) if interpreted(backend, device) else (53, 517)
    inputs = make_inputs(gen, n, 24, 40, vocab, device=device)
    labels = make_labels(gen, (n,), vocab, device)
    check(inputs, labels, backend, 1e-5, chunk_size=8, temperature=2.0, teacher_temperature=0.8,
          divergence=divergence, beta=0.3, hard_weight=0.25)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_teacher_vocabulary_padded(gen, backend, device):
    inputs = make_inputs(gen, 21, 16, 16, 200, teacher_vocab=208, device=device)
    check(inputs, None, backend, 1e-5, chunk_size=5, temperature=1.5, vocab_size=200)
    with pytest.raises(ValueError, match=r"student_weight has V=200, teacher_weight has V=208.*vocab_size=200"):
        kdfast.fused_linear_kd_loss(**inputs)


def test_student_vocabulary_larger_than_shared_gets_zero_gradient_there(gen):
    inputs = make_inputs(gen, 9, 16, 16, 210, teacher_vocab=200)
    weight = inputs["student_weight"].requires_grad_()
    kdfast.fused_linear_kd_loss(**inputs, vocab_size=200).backward()
    assert torch.equal(weight.grad[200:], torch.zeros(10, 16))
    assert weight.grad[:200].abs().sum() > 0


@pytest.mark.parametrize("chunk_size", [1, 7, None, 1000])
def test_chunk_sizes_agree(gen, chunk_size):
    inputs = make_inputs(gen, 33, 16, 24, 300)
    labels = make_labels(gen, (33,), 300)
    check(inputs, labels, "cpu", 1e-5, chunk_size=chunk_size, temperature=2.0, hard_weight=0.5)


def test_leading_dimensions_and_module_form(gen):
    inputs = make_inputs(gen, 24, 16, 24, 150)
    shaped = {k: (v.view(2, 3, 4, -1) if k.endswith("hidden") else v) for k, v in inputs.items()}
    labels = make_labels(gen, (2, 3, 4), 150)
    flat = kdfast.fused_linear_kd_loss(**inputs, labels=labels.view(-1), reduction="none", temperature=2.0)
    module = kdfast.FusedLinearKDLoss(reduction="none", temperature=2.0, chunk_size=5)
    torch.testing.assert_close(module(**shaped, labels=labels), flat.view(2, 3, 4))


def test_bf16_inputs(gen):
    inputs = make_inputs(gen, 40, 32, 32, 400, dtype=torch.bfloat16)
    check(inputs, None, "cpu", 1.5e-2, chunk_size=16, temperature=2.0)


def test_autocast_with_fp32_master_weights(gen):
    """Under autocast the matmuls run in bf16, the weight gradient is accumulated in fp32."""
    inputs = make_inputs(gen, 40, 32, 32, 400)
    leaves = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = kdfast.fused_linear_kd_loss(**leaves, chunk_size=16, temperature=2.0)
    loss.backward()
    assert leaves["student_weight"].grad.dtype == torch.float32
    check(inputs, None, "cpu", 1e-5, chunk_size=16, temperature=2.0)  # same inputs without autocast
    fp32 = {k: v.clone().requires_grad_(k.startswith("student")) for k, v in inputs.items()}
    kdfast.fused_linear_kd_loss(**fp32, chunk_size=16, temperature=2.0).backward()
    assert rel_err(leaves["student_weight"].grad, fp32["student_weight"].grad) < 3e-2


def test_frozen_lm_head_and_no_grad(gen):
    inputs = make_inputs(gen, 12, 16, 16, 100)
    hidden = inputs["student_hidden"].requires_grad_()
    kdfast.fused_linear_kd_loss(**inputs).backward()
    assert hidden.grad is not None and inputs["student_weight"].grad is None
    with torch.no_grad():
        assert not kdfast.fused_linear_kd_loss(**inputs).requires_grad


@pytest.mark.parametrize("change,exception,pattern", [
    ({"student_weight": torch.randn(100, 17)}, ValueError, r"student_weight must have shape \(V, 16\)"),
    ({"teacher_hidden": torch.randn(11, 16)}, ValueError, "leading \\(token\\) dimensions must match"),
    ({"student_bias": torch.randn(99)}, ValueError, r"student_bias must be None or a tensor of shape \(100,\)"),
    ({"student_hidden": torch.randn(12, 16).bfloat16()}, TypeError, "student_hidden is torch.bfloat16 but"),
    ({"teacher_weight": torch.randint(0, 3, (100, 16))}, TypeError, "teacher_weight must be a floating-point"),
])
def test_bad_input(gen, change, exception, pattern):
    inputs = {**make_inputs(gen, 12, 16, 16, 100), **change}
    with pytest.raises(exception, match=pattern):
        kdfast.fused_linear_kd_loss(**inputs)


def test_bad_chunk_size(gen):
    with pytest.raises(ValueError, match="chunk_size must be None or a positive int, got 0"):
        kdfast.fused_linear_kd_loss(**make_inputs(gen, 12, 16, 16, 100), chunk_size=0)
