"""Every divergence x reduction x dtype x backend against the float64 reference, gradients included."""

import math

import pytest
import torch

from helpers import interpreted, make_labels, make_logits, run_and_compare, runnable_backends, tvd_undecided_rows

import kdfast

BACKENDS = runnable_backends()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.0), ("jsd", 1.0),
               ("tvd", 0.5)]
REDUCTIONS = ["batchmean", "sum", "mean", "none"]


def shape_for(backend, device):
    """Vocabularies that are not powers of two; a real LM vocabulary on a GPU."""
    if interpreted(backend, device):
        return (3, 7, 389)
    return (2, 64, 50257) if device == "cuda" else (4, 37, 1531)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_matches_reference(gen, backend, device, dtype, divergence, beta, reduction):
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, dtype, device)
    labels = make_labels(gen, shape[:-1], shape[-1], device)
    run_and_compare(s, t, labels=labels, backend=backend, temperature=2.0, divergence=divergence, beta=beta,
                    reduction=reduction)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("temperature,scale_t2", [(1.0, True), (0.5, False), (4.0, True)])
def test_hard_label_mixing(gen, backend, device, divergence, temperature, scale_t2):
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, torch.float32, device)
    labels = make_labels(gen, shape[:-1], shape[-1], device)
    run_and_compare(s, t, labels=labels, backend=backend, temperature=temperature, divergence=divergence,
                    scale_t2=scale_t2, hard_weight=0.7, soft_weight=0.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("tvd", 0.5)])
@pytest.mark.parametrize("temperature,teacher_temperature,scale_t2", [(2.0, 1.0, True), (0.7, 3.0, False)])
def test_teacher_temperature(gen, backend, device, dtype, divergence, beta, temperature, teacher_temperature,
                             scale_t2):
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, dtype, device)
    labels = make_labels(gen, shape[:-1], shape[-1], device)
    # grad_output 1: a bf16 gradient rounded a second time by backward's scaling can pass the harness's
    # 3x-rounding budget (the fp32 gradients here are within 1e-6 of the reference; test_backward_scaling_of_
    # scalar_loss covers the scaling).
    run_and_compare(s, t, labels=labels, backend=backend, temperature=temperature,
                    teacher_temperature=teacher_temperature, divergence=divergence, beta=beta, scale_t2=scale_t2,
                    hard_weight=0.2, grad_scale=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_teacher_given_as_log_probabilities_at_the_temperature(gen, backend, device, divergence):
    """A teacher's log-probabilities at T are teacher_temperature=1: the same loss and gradient as its logits."""
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, torch.float32, device)
    t_logprobs = torch.log_softmax(t / 2.5, dim=-1)
    run_and_compare(s, t_logprobs, backend=backend, temperature=2.5, teacher_temperature=1.0, divergence=divergence)
    from_logits, from_logprobs = (s.detach().clone().requires_grad_() for _ in range(2))
    kdfast.kd_loss(from_logits, t, backend=backend, temperature=2.5, divergence=divergence).backward()
    kdfast.kd_loss(from_logprobs, t_logprobs, backend=backend, temperature=2.5, teacher_temperature=1,
                   divergence=divergence).backward()
    torch.testing.assert_close(from_logprobs.grad, from_logits.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_teacher_temperature_none_is_temperature(gen, backend, device):
    s, t = make_logits(gen, (3, 40), torch.float32, device)
    default = kdfast.kd_loss(s, t, backend=backend, temperature=1.7, reduction="none")
    same = kdfast.kd_loss(s, t, backend=backend, temperature=1.7, teacher_temperature=1.7, reduction="none")
    assert torch.equal(default, same)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tvd_is_half_the_l1_distance_and_zero_with_zero_gradient_at_equal_distributions(gen, backend, device):
    """sign(0) = 0: where p_s = p_t entry by entry (equal rows, or -inf on both sides) the subgradient is 0."""
    s, t = make_logits(gen, (4, 97), torch.float32, device)
    t[0] = s[0]
    s[1, 50:] = t[1, 50:] = -math.inf
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, divergence="tvd", temperature=1.5, reduction="none")
    rows.sum().backward()
    expected = 1.5**2 * 0.5 * (torch.softmax(s.double() / 1.5, -1) - torch.softmax(t.double() / 1.5, -1)).abs().sum(-1)
    torch.testing.assert_close(rows.double().cpu(), expected.cpu(), rtol=1e-5, atol=1e-7)
    assert rows[0].item() == 0.0 and torch.equal(leaf.grad[0].cpu(), torch.zeros(97))
    assert torch.isfinite(leaf.grad).all() and (leaf.grad[1, 50:] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_tvd_gradient_keeps_its_precision_against_a_near_one_hot_teacher(gen, backend, device):
    """Against a teacher near one-hot on a token where the student has little mass, every other
    entry's gradient is p_s,j times the student's mass below its teacher (~1e-4 here): a sum of
    that mass, not 0.5 minus a sum near 0.5, which loses it in fp32."""
    s, t = make_logits(gen, (8, 389), torch.float32, device)
    token = torch.randint(0, 389, (8,), generator=gen).to(device)
    t[torch.arange(8), token] = 40.0
    s[torch.arange(8), token] = -6.0
    leaf = s.clone().requires_grad_()
    kdfast.kd_loss(leaf, t, backend=backend, divergence="tvd", reduction="sum").backward()
    s64 = s.double().cpu().requires_grad_()
    kdfast.reference.kd_loss_reference(s64, t.double().cpu(), divergence="tvd", reduction="sum").backward()
    # Every entry to a few fp32 roundings of itself: the loss is fp32 arithmetic on fp32 logits.
    decided = ~tvd_undecided_rows(s, t)
    torch.testing.assert_close(leaf.grad.double().cpu()[decided], s64.grad[decided], rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_mixed_student_teacher_dtypes(gen, backend, device):
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, torch.bfloat16, device)
    run_and_compare(s, t.float(), backend=backend, temperature=2.0)
    run_and_compare(s.float(), t.half(), backend=backend, temperature=2.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("grad_scale", [1.0, 0.25])
def test_backward_scaling_of_scalar_loss(gen, backend, device, grad_scale):
    """The gradient computed in forward is used as is for grad_output == 1 and scaled otherwise."""
    shape = shape_for(backend, device)
    s, t = make_logits(gen, shape, torch.float32, device)
    run_and_compare(s, t, backend=backend, temperature=2.0, grad_scale=torch.tensor(grad_scale, dtype=torch.float64))


def test_backends_agree_with_each_other(gen):
    """All backends compute the same numbers (not only each close to the reference)."""
    s, t = make_logits(gen, (2, 9, 700), torch.float32)
    labels = make_labels(gen, (2, 9), 700)
    results = {}
    for backend, device in BACKENDS:
        loss = kdfast.kd_loss(s.to(device), t.to(device), labels=labels.to(device), backend=backend,
                              temperature=1.5, reduction="none", divergence="jsd", beta=0.3)
        results[(backend, device)] = loss.cpu()
    first = next(iter(results.values()))
    for key, value in results.items():
        torch.testing.assert_close(value, first, rtol=2e-5, atol=1e-6, msg=f"{key} differs")
