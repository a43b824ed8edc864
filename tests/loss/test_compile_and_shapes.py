"""torch.compile(fullgraph=True) support, and property-based tests over shapes and options."""

import pytest
import torch
from helpers import make_labels, make_logits, run_and_compare
from hypothesis import given, settings
from hypothesis import strategies as st

import kdfast


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_kd_loss_compiles_with_fullgraph(gen, reduction):
    s, t = make_logits(gen, (2, 5, 129), torch.float32)
    labels = make_labels(gen, (2, 5), 129)

    def step(student, teacher, labels):
        loss = kdfast.kd_loss(student * 1.0, teacher, labels=labels, temperature=2.0, hard_weight=0.3,
                              reduction=reduction)
        return loss.sum() * 0.5  # a grad_output that is not 1

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    eager_s, compiled_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    step(eager_s, t, labels).backward()
    loss = compiled(compiled_s, t, labels)
    loss.backward()
    torch.testing.assert_close(loss, step(s, t, labels))
    torch.testing.assert_close(compiled_s.grad, eager_s.grad)


def test_kd_loss_compiles_with_inductor(gen):
    s, t = make_logits(gen, (8, 257), torch.bfloat16)
    compiled = torch.compile(lambda a, b: kdfast.kd_loss(a, b, temperature=2.0, divergence="jsd"), fullgraph=True)
    eager_s, compiled_s = s.clone().requires_grad_(), s.clone().requires_grad_()
    kdfast.kd_loss(eager_s, t, temperature=2.0, divergence="jsd").backward()
    compiled(compiled_s, t).backward()
    torch.testing.assert_close(compiled_s.grad, eager_s.grad)


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(0, 5), min_size=0, max_size=3),
    vocab=st.integers(1, 700),
    divergence=st.sampled_from(["forward_kl", "reverse_kl", "jsd"]),
    beta=st.floats(0.0, 1.0),
    temperature=st.floats(0.25, 8.0),
    reduction=st.sampled_from(["batchmean", "sum", "mean", "none"]),
    backend=st.sampled_from(["cpu", "torch"]),
    dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
    with_labels=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_and_options(lead, vocab, divergence, beta, temperature, reduction, backend, dtype, with_labels,
                               seed):
    gen = torch.Generator().manual_seed(seed)
    s, t = make_logits(gen, (*lead, vocab), dtype)
    labels = make_labels(gen, tuple(lead), vocab) if with_labels else None
    # grad_output 1: a bf16/fp16 gradient is then rounded once, and the rounding-based bound
    # holds however few entries there are; scaled gradients (rounded twice) are tested on
    # larger tensors in test_correctness.py, where the rounding errors average out.
    run_and_compare(s, t, labels=labels, backend=backend, temperature=temperature, divergence=divergence, beta=beta,
                    reduction=reduction, hard_weight=0.2 if with_labels else 0.0,
                    grad_scale=torch.tensor(1.0, dtype=torch.float64))
