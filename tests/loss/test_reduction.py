"""How losses are averaged: num_items_in_batch (exact averages over the tokens of a whole optimizer
step) and expected_grad_output (a known backward scale folded into the gradient computed in forward)."""

import pytest
import torch

from helpers import make_inputs, make_labels, make_logits, runnable_backends

import kdfast

BACKENDS = runnable_backends()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("n", [7, torch.tensor(7), torch.tensor(7.0)], ids=["int", "int-tensor", "float-tensor"])
def test_num_items_in_batch_divides_the_sum(gen, backend, device, n):
    s, t = make_logits(gen, (3, 4, 50), device=device)
    labels = make_labels(gen, (3, 4), 50, device)
    options = dict(labels=labels, temperature=2.0, hard_weight=0.3, backend=backend)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    loss = kdfast.kd_loss(a, t, num_items_in_batch=n.to(device) if isinstance(n, torch.Tensor) else n, **options)
    total = kdfast.kd_loss(b, t, reduction="sum", **options)
    torch.testing.assert_close(loss, total / 7)
    loss.backward()
    (total / 7).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_num_items_in_batch_of_the_fused_linear_loss(gen):
    i = make_inputs(gen, 9, 8, 8, 40)
    labels = make_labels(gen, (9,), 40)
    loss = kdfast.fused_linear_kd_loss(**i, labels=labels, num_items_in_batch=20, hard_weight=0.5)
    total = kdfast.fused_linear_kd_loss(**i, labels=labels, reduction="sum", hard_weight=0.5)
    torch.testing.assert_close(loss, total / 20)


def test_micro_batches_with_num_items_in_batch_sum_to_the_whole_batch(gen):
    """Gradient accumulation over micro-batches with very different counted tokens."""
    s, t = make_logits(gen, (4, 30))
    labels = torch.tensor([1, -100, -100, 2])
    whole = s.clone().requires_grad_()
    kdfast.kd_loss(whole, t, labels=labels).backward()
    parts = s.clone().requires_grad_()
    for rows in (slice(0, 1), slice(1, 4)):  # 1 counted token, then 1 of 3
        kdfast.kd_loss(parts[rows], t[rows], labels=labels[rows], num_items_in_batch=2).backward()
    torch.testing.assert_close(parts.grad, whole.grad)


@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_num_items_in_batch_with_a_reduction_that_does_not_average_is_an_error(gen, reduction):
    s, t = make_logits(gen, (4, 30))
    with pytest.raises(ValueError, match=f"num_items_in_batch sets the divisor.*reduction='{reduction}'"):
        kdfast.kd_loss(s, t, reduction=reduction, num_items_in_batch=4)


@pytest.mark.parametrize("bad", [-1, 2.5, True, torch.ones(2)])
def test_bad_num_items_in_batch(gen, bad):
    s, t = make_logits(gen, (4, 30))
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        kdfast.kd_loss(s, t, num_items_in_batch=bad)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("received", [0.25, 0.5])
def test_expected_grad_output_gives_the_exact_gradient_whatever_backward_receives(gen, backend, device, received):
    s, t = make_logits(gen, (3, 5, 60), device=device)
    expected, got = s.clone().requires_grad_(), s.clone().requires_grad_()
    (kdfast.kd_loss(expected, t, temperature=2.0, backend=backend) * received).backward()
    loss = kdfast.kd_loss(got, t, temperature=2.0, backend=backend, expected_grad_output=0.25)
    (loss * received).backward()
    torch.testing.assert_close(got.grad, expected.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(loss, kdfast.kd_loss(s, t, temperature=2.0, backend=backend))  # the loss is unscaled


def test_expected_grad_output_makes_backward_skip_its_pass(gen, monkeypatch):
    """When backward receives the expected grad_output, the gradient is used as computed."""
    from kdfast import ops

    scales = []
    original = ops.scale_grad_

    def spy(grad, grad_output, backend):
        scales.append(float(grad_output))
        return original(grad, grad_output, backend)

    monkeypatch.setattr(ops, "scale_grad_", spy)
    s, t = make_logits(gen, (4, 60))
    leaf = s.clone().requires_grad_()
    (kdfast.kd_loss(leaf, t, expected_grad_output=0.5) / 2).backward()
    assert scales == [1.0]


def test_expected_grad_output_of_the_fused_linear_loss(gen):
    i = make_inputs(gen, 9, 8, 8, 40)
    leaves = [{k: v.clone().requires_grad_(k.startswith("student")) for k, v in i.items()} for _ in range(2)]
    (kdfast.fused_linear_kd_loss(**leaves[0]) / 4).backward()
    (kdfast.fused_linear_kd_loss(**leaves[1], expected_grad_output=0.25) / 4).backward()
    for name in ("student_hidden", "student_weight", "student_bias"):
        torch.testing.assert_close(leaves[1][name].grad, leaves[0][name].grad, rtol=1e-5, atol=1e-8)


def test_expected_grad_output_must_be_positive():
    with pytest.raises(ValueError, match="expected_grad_output must be finite and > 0"):
        kdfast.KDLoss(expected_grad_output=0.0)
