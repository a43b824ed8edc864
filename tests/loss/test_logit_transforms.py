"""softcap and logit_scale (the logit transforms of Gemma 2, Cohere, Granite...) in every backend, the
fused-linear and the sparse losses, against the float64 reference that applies them with autograd."""

import math

import pytest
import torch

from helpers import interpreted, make_inputs, make_labels, make_logits, rel_err, run_and_compare, runnable_backends

import kdfast
from kdfast.reference import sparse_kd_loss_reference

BACKENDS = runnable_backends()
# (softcap, logit_scale): both sides, one side each, a teacher-only cap (a Gemma-2 teacher, an uncapped
# student), and both transforms at once (the scale comes first).
TRANSFORMS = [(30.0, None), (None, 0.0625), ((5.0, None), (None, 8.0)), ((None, 20.0), None), (10.0, (0.5, 2.0))]


def shape_for(backend, device):
    if interpreted(backend, device):
        return (2, 5, 389)
    return (2, 64, 50257) if device == "cuda" else (3, 17, 1531)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
@pytest.mark.parametrize("softcap,logit_scale", TRANSFORMS)
def test_transforms_match_reference(gen, backend, device, dtype, divergence, softcap, logit_scale):
    shape = shape_for(backend, device)
    # Logits of std ~ 30, so that a cap of 5 to 30 bends them.
    s, t = make_logits(gen, shape, dtype, device, scale=30.0)
    labels = make_labels(gen, shape[:-1], shape[-1], device)
    run_and_compare(s, t, labels=labels, backend=backend, temperature=2.0, divergence=divergence, beta=0.3,
                    hard_weight=0.2, softcap=softcap, logit_scale=logit_scale,
                    grad_scale=torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd", "tvd"])
def test_infinite_logits_are_capped_as_in_the_model(gen, backend, device, divergence):
    """With a cap, -inf becomes -cap and +inf becomes +cap (the model's tanh): rows stay finite, and
    those entries get no gradient (tanh is flat there)."""
    s, t = make_logits(gen, (4, 101), torch.float32, device, scale=20.0)
    s[0, 3] = t[1, 4] = -math.inf
    s[2, 5] = t[3, 6] = math.inf
    s[3, 7] = t[3, 7] = -math.inf
    loss, _, _, _ = run_and_compare(s, t, backend=backend, divergence=divergence, softcap=15.0, reduction="none",
                                    labels=torch.tensor([1, 2, 3, 4], device=device), hard_weight=0.5)
    assert torch.isfinite(loss).all()
    leaf = s.clone().requires_grad_()
    kdfast.kd_loss(leaf, t, backend=backend, divergence=divergence, softcap=15.0).backward()
    assert leaf.grad[0, 3] == 0 and leaf.grad[2, 5] == 0 and torch.isfinite(leaf.grad).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_softcap_is_the_loss_on_capped_logits(gen, backend, device):
    """kd_loss(x, softcap=c) is kd_loss(c tanh(x / c)): what a model that caps its logits returns."""
    s, t = make_logits(gen, (3, 257), torch.float32, device, scale=40.0)
    capped = kdfast.kd_loss(s, t, backend=backend, softcap=(10.0, 30.0), logit_scale=(2.0, None), hard_weight=0.5,
                            labels=torch.tensor([0, 5, 256], device=device), reduction="none")
    by_hand = kdfast.kd_loss(10.0 * torch.tanh(2.0 * s / 10.0), 30.0 * torch.tanh(t / 30.0), backend=backend,
                             hard_weight=0.5, labels=torch.tensor([0, 5, 256], device=device), reduction="none")
    torch.testing.assert_close(capped, by_hand, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_fused_linear_applies_the_transforms_in_its_kernel(gen, backend, device, divergence):
    """A Gemma-2 teacher (capped) and a Cohere-like student (scaled): the fused-linear loss equals kd_loss
    on the two heads' logits with the same options, gradients of hidden states and weight included."""
    n, vocab = 24, 389
    inputs = make_inputs(gen, n, 16, 24, vocab, device=device)
    h, w, b = inputs["student_hidden"], inputs["student_weight"] * 10, inputs["student_bias"]
    th, tw = inputs["teacher_hidden"], inputs["teacher_weight"] * 10  # logits of std ~ 30: the caps bite
    labels = make_labels(gen, (n,), vocab, device)
    options = dict(backend=backend, divergence=divergence, temperature=1.5, softcap=(None, 30.0),
                   logit_scale=(0.25, None), hard_weight=0.3, labels=labels)
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    fused = kdfast.fused_linear_kd_loss(h1, w1, th, tw, student_bias=b, chunk_size=7, **options)
    fused.backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    on_logits = kdfast.kd_loss(h2 @ w2.T + b, th @ tw.T, **options)
    on_logits.backward()
    torch.testing.assert_close(fused, on_logits, rtol=1e-5, atol=1e-6)
    assert rel_err(h1.grad, h2.grad) < 1e-4 and rel_err(w1.grad, w2.grad) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_loss_transforms_the_student(gen, backend, device, divergence):
    vocab, k = 389, 16
    s, t = make_logits(gen, (2, 6, vocab), torch.float32, device, scale=30.0)
    logprobs, ids = torch.log_softmax(t.float() / 40.0, -1).topk(k, -1)  # flat: a teacher tail to compare
    labels = make_labels(gen, (2, 6), vocab, device)
    options = dict(temperature=2.0, divergence=divergence, softcap=12.0, logit_scale=(0.5, None), hard_weight=0.3,
                   labels=labels, reduction="none")
    leaf = s.clone().requires_grad_()
    rows = kdfast.sparse_kd_loss(leaf, ids, logprobs, backend=backend, **options)
    rows.sum().backward()
    ref_leaf = s.double().cpu().requires_grad_()
    ref = sparse_kd_loss_reference(ref_leaf, ids.cpu(), logprobs.cpu(), mass_tolerance=1e-4,
                                   **{**options, "labels": labels.cpu()})
    ref.sum().backward()
    assert rel_err(rows, ref) < 1e-5 and rel_err(leaf.grad, ref_leaf.grad) < 1e-5


@pytest.mark.parametrize("option", ["softcap", "logit_scale"])
@pytest.mark.parametrize("value,expected", [(0.0, "softcap must be finite and > 0"), (-1.0, "> 0"),
                                            (math.nan, "finite"), (math.inf, "finite"),
                                            ((30.0, 0.0), "[1] (the teacher's) must be finite and > 0"),
                                            ((1.0, 2.0, 3.0), "a (student, teacher) pair"),
                                            (True, "must be a real number")])
def test_bad_transform_values_are_refused_by_name(option, value, expected):
    s = torch.randn(2, 10)
    with pytest.raises((ValueError, TypeError), match=None) as info:
        kdfast.kd_loss(s, s, **{option: value})
    assert expected.replace("softcap", option) in str(info.value)


def test_sparse_loss_refuses_a_teacher_transform():
    s = torch.randn(2, 10)
    logprobs, ids = torch.log_softmax(s, -1).topk(3, -1)
    with pytest.raises(ValueError, match="softcap for the teacher does not apply to a sparse teacher"):
        kdfast.sparse_kd_loss(s, ids, logprobs, softcap=(None, 30.0))


def test_transforms_off_are_the_defaults(gen):
    s, t = make_logits(gen, (3, 50))
    plain = kdfast.kd_loss(s, t, reduction="none", backend="torch")
    assert torch.equal(plain, kdfast.kd_loss(s, t, reduction="none", backend="torch", softcap=(None, None),
                                             logit_scale=None))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_fused_linear_sparse_loss_transforms_the_student_head(gen, backend, device):
    n, vocab = 20, 389
    inputs = make_inputs(gen, n, 16, 16, vocab, device=device)
    h, w = inputs["student_hidden"], inputs["student_weight"] * 10
    logprobs, ids = torch.log_softmax(inputs["teacher_hidden"] @ inputs["teacher_weight"].T, -1).topk(8, -1)
    options = dict(backend=backend, temperature=1.5, softcap=12.0, logit_scale=(0.5, None), hard_weight=0.3,
                   labels=make_labels(gen, (n,), vocab, device))
    h1, w1 = h.clone().requires_grad_(), w.clone().requires_grad_()
    kdfast.fused_linear_sparse_kd_loss(h1, w1, ids, logprobs, chunk_size=6, **options).backward()
    h2, w2 = h.clone().requires_grad_(), w.clone().requires_grad_()
    kdfast.sparse_kd_loss(h2 @ w2.T, ids, logprobs, **options).backward()
    assert rel_err(h1.grad, h2.grad) < 1e-4 and rel_err(w1.grad, w2.grad) < 1e-4
