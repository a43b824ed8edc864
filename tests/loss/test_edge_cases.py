"""Awkward inputs: -inf and huge logits, ignored rows, tiny and odd vocabularies, strided
views, NaN/+inf, empty batches, in-place backward, vocabulary slicing, module form."""

import math
import sys

import pytest
import torch

from helpers import make_labels, make_logits, rel_err, run_and_compare, runnable_backends

import kdfast
from kdfast.reference import kd_loss_reference

BACKENDS = runnable_backends()
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.4), ("tvd", 0.5)]


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_padded_vocabulary_with_minus_inf_on_both_sides(gen, backend, device, divergence, beta):
    s, t = make_logits(gen, (2, 5, 300), torch.float32, device)
    s[..., 280:] = -math.inf
    t[..., 280:] = -math.inf
    loss, ref, _, _ = run_and_compare(s, t, backend=backend, temperature=2.0, divergence=divergence, beta=beta)
    assert torch.isfinite(loss)
    unpadded = kdfast.kd_loss(s[..., :280], t[..., :280], backend=backend, temperature=2.0, divergence=divergence,
                              beta=beta)
    torch.testing.assert_close(loss, unpadded, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minus_inf_teacher_entries_keep_forward_kl_finite(gen, backend, device):
    s, t = make_logits(gen, (6, 257), torch.float32, device)
    t[:, ::3] = -math.inf  # the teacher rules these tokens out; the student does not
    loss, _, _, _ = run_and_compare(s, t, backend=backend, temperature=1.0)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_student_ruling_out_a_teacher_token_gives_infinite_forward_kl(gen, backend, device):
    s, t = make_logits(gen, (4, 100), torch.float32, device)
    s[1, 7] = -math.inf
    rows = kdfast.kd_loss(s, t, backend=backend, reduction="none")
    assert rows[1].item() == math.inf
    assert torch.isfinite(rows[[0, 2, 3]]).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
@pytest.mark.parametrize("offset,scale", [(3e4, 40.0), (-1e4, 1.0), (0.0, 30.0)])
def test_huge_logits(gen, backend, device, divergence, beta, offset, scale):
    s, t = make_logits(gen, (3, 4, 333), torch.float32, device, scale=scale)
    run_and_compare(s + offset, t - offset, backend=backend, temperature=2.0, divergence=divergence, beta=beta,
                    math_tol=1e-4 if scale > 10 else None)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_extreme_spread(gen, backend, device, divergence, beta):
    """Logits spread over thousands make each softmax one-hot in fp32: the gradients are
    then differences of log-probabilities in the thousands and can be ~1e-30, so only an
    absolute bound, a few fp32 ulps of those log-probabilities, is meaningful; the loss is
    still accurate and nothing is NaN."""
    s, t = make_logits(gen, (6, 200), torch.float32, device, scale=1000.0)
    leaf = s.clone().requires_grad_()
    loss = kdfast.kd_loss(leaf, t, backend=backend, divergence=divergence, beta=beta)
    loss.backward()
    s64 = s.double().requires_grad_()
    ref = kd_loss_reference(s64, t.double(), divergence=divergence, beta=beta)
    ref.backward()
    assert rel_err(loss, ref) < 1e-5
    log_prob_range = (s.abs().max() + t.abs().max()).item() * 2  # T = 1
    bound = 8 * 2.0**-24 * log_prob_range / s.shape[0]  # batchmean divides by the rows
    assert (leaf.grad.double().cpu() - s64.grad).abs().max() < bound


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_maximum_jumping_far_after_a_minus_inf_entry(gen, backend, device, divergence, beta):
    """A side -inf where the other has mass makes a block's weighted sum infinite; when a later
    block raises the maximum by more than the exponent range, the sum's rescale factor underflows
    to 0, and what was summed carries no weight: 0, not 0 * inf = NaN."""
    s, t = make_logits(gen, (2, 8192), torch.float32, device)
    s[:, 5] = -math.inf  # forward KL's sum e_t (a_t - a_s) is +inf
    t[:, 6] = -math.inf  # reverse KL's sum e_s (a_s - a_t) is +inf
    s[:, 4096:4160] += 1000.0  # in a later block, at any block size up to 4096
    t[:, 4096:4160] += 1000.0
    loss, ref, _, _ = run_and_compare(s, t, backend=backend, divergence=divergence, beta=beta, reduction="none")
    assert torch.isfinite(loss).all() and (ref > 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab", [2, 101])
@pytest.mark.parametrize("beta", [1.5e-22, 1e-6, 1e-3, 0.5, 1 - 1e-3, 1 - 1e-6])
def test_jsd_is_accurate_at_any_beta(gen, backend, device, vocab, beta):
    """With beta (or 1 - beta) tiny, log m - log p of the heavier side is tiny: computed as a
    difference of fp32 logarithms it would be all rounding error (the loss at beta = 1.5e-22,
    V = 2 was 1e-8 instead of 4e-24). A row whose two distributions nearly agree keeps an error
    of about eps_fp32 * |p_t - p_s| per weight: the fp32 logits themselves carry it, so an
    absolute allowance of that size (scaled by beta (1 - beta)) is not slack in the kernel."""
    s, t = make_logits(gen, (4, vocab), torch.float32, device)
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, divergence="jsd", beta=beta, temperature=1.5, reduction="none")
    rows.sum().backward()
    s64 = s.double().cpu().requires_grad_()
    ref = kd_loss_reference(s64, t.double().cpu(), divergence="jsd", beta=beta, temperature=1.5, reduction="none")
    ref.sum().backward()
    torch.testing.assert_close(rows.double().cpu(), ref.detach(), rtol=1e-4, atol=1e-6 * beta * (1 - beta))
    assert rel_err(leaf.grad, s64.grad) < 1e-4


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("hard", [False, True])
def test_out_of_range_labels_give_nan_rows_in_the_kernels(gen, backend, device, divergence, hard):
    """The Python layer rejects such labels only for CPU tensors (a GPU check would sync); the
    kernels themselves make those rows NaN, loss and gradient, even without the hard term."""
    from kdfast.backends import DIVERGENCE_CODES, KernelParams
    from kdfast.backends import registry

    vocab = 37
    s, t = make_logits(gen, (1, 6, vocab), torch.float32, device)
    labels = torch.tensor([3, -1, vocab, -100, 0, vocab - 1], device=device)
    bad, ignored, good = [1, 2], [3], [0, 4, 5]
    grad = torch.empty_like(s)
    coefs = torch.tensor([0.7, 0.3 if hard else 0.0], device=device)
    params = KernelParams(1.5, 0.8, DIVERGENCE_CODES[divergence], 0.4, -100, hard)
    kd, ce = registry.backend(backend).kd_forward(s, t, labels, grad, coefs, params)
    assert kd[bad].isnan().all() and torch.isfinite(kd[good]).all() and (kd[ignored] == 0).all()
    assert ce[bad].isnan().all() if hard else (ce[bad] == 0).all()
    assert torch.isfinite(ce[good]).all() and (ce[ignored] == 0).all()
    assert grad[0, bad].isnan().all() and torch.isfinite(grad[0, good]).all() and (grad[0, ignored] == 0).all()


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_all_rows_ignored(gen, backend, device, reduction):
    s, t = make_logits(gen, (3, 50), torch.float32, device)
    s.requires_grad_()
    labels = torch.full((3,), -100, device=device)
    loss = kdfast.kd_loss(s, t, labels=labels, backend=backend, reduction=reduction, hard_weight=0.5)
    assert torch.equal(loss.detach().cpu(), torch.zeros_like(loss).cpu())
    loss.sum().backward()
    assert torch.equal(s.grad.cpu(), torch.zeros(3, 50))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 2, 5, 17, 1023, 1025])
def test_small_and_odd_vocabularies(gen, backend, device, vocab):
    s, t = make_logits(gen, (5, vocab), torch.float32, device)
    labels = make_labels(gen, (5,), vocab, device)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        loss, _, _, _ = run_and_compare(s, t, labels=labels, backend=backend, divergence=divergence,
                                        hard_weight=0.3, temperature=1.3)
        if vocab == 1:
            assert loss.item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_inputs(gen, backend, device):
    s, t = make_logits(gen, (3, 9, 211), torch.bfloat16, device)
    labels = make_labels(gen, (3, 8), 211, device)
    # the usual causal-LM shift: logits[:, :-1] is not contiguous (an odd V: rows off 16-byte boundaries, which
    # Triton reads from the boundary below when the teacher's rows lie as the student's)
    run_and_compare(s[:, :-1], t[:, 1:], labels=labels, backend=backend, temperature=2.0, hard_weight=0.2)
    run_and_compare(s[:, :-1], t[:, :-1], labels=labels, backend=backend, divergence="jsd", hard_weight=0.2)
    # vocabulary not the innermost dimension in memory
    st = s.transpose(0, 2).contiguous().transpose(0, 2)
    run_and_compare(st, t, backend=backend, divergence="reverse_kl")
    # every other row
    run_and_compare(s[:, ::2], t[:, ::2], backend=backend, divergence="jsd")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", DIVERGENCES)
def test_teacher_temperature_on_awkward_inputs(gen, backend, device, divergence, beta):
    """-inf on both sides and in the teacher alone, huge logits, an odd vocabulary, strided fp16 views."""
    s, t = make_logits(gen, (2, 6, 263), torch.float32, device, scale=20.0)
    s[..., 250:] = -math.inf
    t[..., 250:] = -math.inf
    if divergence != "reverse_kl":  # where only the teacher is -inf, reverse KL is +inf
        t[:, :, ::7] = -math.inf
    options = dict(backend=backend, divergence=divergence, beta=beta, teacher_temperature=0.5)
    loss, _, _, _ = run_and_compare(s + 1e4, t - 1e4, temperature=3.0, math_tol=1e-4, **options)
    assert torch.isfinite(loss)
    labels = make_labels(gen, (2, 5), 250, device)  # a label at a -inf logit: an infinite cross-entropy
    h, ht = (s / 4).half(), (t / 4).half()  # logits of an ordinary spread: fp16 rounding of 80 is 0.03
    run_and_compare(h[:, :-1], ht[:, 1:], labels=labels, temperature=0.9, hard_weight=0.3, **options)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_one_dimensional_logits_are_one_row(gen, backend, device):
    s, t = make_logits(gen, (77,), torch.float32, device)
    run_and_compare(s, t, backend=backend, temperature=2.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nan_and_plus_inf_give_nan(gen, backend, device, bad):
    s, t = make_logits(gen, (4, 64), torch.float32, device)
    for poisoned in (s, t):
        poisoned = poisoned.clone()
        poisoned[2, 5] = bad
        args = (poisoned, t) if poisoned.shape == s.shape and poisoned is not t else (s, poisoned)
        rows = kdfast.kd_loss(*args, backend=backend, reduction="none")
        assert math.isnan(rows[2].item())
        assert torch.isfinite(rows[[0, 1, 3]]).all()
        assert math.isnan(kdfast.kd_loss(*args, backend=backend).item())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_in_an_ignored_row_is_not_counted(gen, backend, device):
    s, t = make_logits(gen, (4, 64), torch.float32, device)
    s[1] = math.nan
    labels = torch.tensor([3, -100, 5, 7], device=device)
    assert torch.isfinite(kdfast.kd_loss(s, t, labels=labels, backend=backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "mean", "none"])
def test_empty_batch(backend, device, reduction):
    s = torch.zeros(0, 5, 32, device=device, requires_grad=True)
    loss = kdfast.kd_loss(s, torch.zeros(0, 5, 32, device=device), backend=backend, reduction=reduction)
    assert loss.shape == ((0, 5) if reduction == "none" else ())
    loss.sum().backward()
    assert s.grad.shape == s.shape


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_writes_the_gradient_over_the_logits(gen, backend, device, dtype):
    s, t = make_logits(gen, (6, 301), dtype, device)
    expected_loss, _, _, _ = run_and_compare(s, t, backend=backend, temperature=2.0)
    reference = s.detach().clone().requires_grad_()
    kdfast.kd_loss(reference, t, backend=backend, temperature=2.0).backward()

    leaf = s.detach().clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as the output of an lm_head would be
    loss = kdfast.kd_loss(logits, t, backend=backend, temperature=2.0, inplace_backward=True)
    torch.testing.assert_close(loss, expected_loss)
    torch.testing.assert_close(logits.detach(), reference.grad)  # consumed: it now holds the gradient
    loss.backward()
    torch.testing.assert_close(leaf.grad, reference.grad)


# --- the cpu backend's recycled gradient buffer ---

needs_cpu_backend = pytest.mark.skipif(not kdfast.available_backends()["cpu"].available,
                                       reason="the cpu extension is not available")


def cpu_gradient(s, t, **options):
    leaf = s.detach().clone().requires_grad_()
    kdfast.kd_loss(leaf, t, backend="cpu", **options).backward()
    return leaf.grad


def reference_gradient(s, t, **options):
    leaf = s.detach().double().requires_grad_()
    kd_loss_reference(leaf, t.double(), **options).backward()
    return leaf.grad


@needs_cpu_backend
def test_the_gradient_buffer_is_reused_only_once_nothing_refers_to_it():
    from kdfast.backends import cpu_ext

    like = torch.empty(3, 5, 700, dtype=torch.bfloat16)
    first = cpu_ext.gradient_buffer(like)
    address = first.data_ptr()
    del first
    second = cpu_ext.gradient_buffer(like)
    assert second.data_ptr() == address and second.shape == like.shape and second.dtype == like.dtype
    view = second[1:]  # a view keeps the buffer in use
    del second
    third = cpu_ext.gradient_buffer(like)
    assert third.data_ptr() != view.untyped_storage().data_ptr()


@needs_cpu_backend
def test_a_recycled_gradient_buffer_is_rewritten_everywhere(gen):
    s, t = make_logits(gen, (8, 515))
    cpu_gradient(s, t, temperature=2.0)  # leaves its buffer, full of that gradient, for the next call
    labels = make_labels(gen, (8,), 515, ignore_fraction=0.3)
    labels[0] = -100
    labels[1] = 4
    s[1, 3] = math.nan
    options = dict(labels=labels, hard_weight=0.5, temperature=1.5)
    grad = cpu_gradient(s, t, **options)
    assert torch.isnan(grad[1]).all()
    assert torch.equal(grad[labels == -100], torch.zeros_like(grad[labels == -100]))
    rows = (labels != -100) & (torch.arange(8) != 1)
    expected = reference_gradient(s[rows], t[rows], **{**options, "labels": labels[rows]})
    expected *= rows.sum() / (labels != -100).sum()  # the reference averages over its own rows
    assert rel_err(grad[rows], expected) < 1e-5


@needs_cpu_backend
def test_gradients_in_use_are_never_overwritten(gen):
    s, t = make_logits(gen, (4, 300))
    s2, t2 = make_logits(gen, (4, 300))
    a, b = s.clone().requires_grad_(), s2.clone().requires_grad_()
    (kdfast.kd_loss(a, t, backend="cpu") + kdfast.kd_loss(b, t2, backend="cpu")).backward()  # two buffers at once
    kept = a.grad.clone()
    for _ in range(2):
        cpu_gradient(*make_logits(gen, (4, 300)))
    assert torch.equal(a.grad, kept)
    assert rel_err(a.grad, reference_gradient(s, t)) < 1e-5
    assert rel_err(b.grad, reference_gradient(s2, t2)) < 1e-5


def _rss_bytes() -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) * 1024


@needs_cpu_backend
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_empty_cache_returns_the_kept_buffer_to_the_os():
    from kdfast.backends import cpu_ext

    buffer = cpu_ext.gradient_buffer(torch.empty(64, 2**18))  # 64 MiB
    buffer.fill_(1.0)
    del buffer
    kept = _rss_bytes()
    kdfast.empty_cache()
    assert _rss_bytes() < kept - 48 * 2**20


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_vocab_size_compares_the_shared_vocabulary(gen, backend, device):
    s, t = make_logits(gen, (5, 230), torch.float32, device)
    t_padded = torch.cat([t, torch.randn(5, 26, device=device)], dim=-1)
    s_padded = torch.cat([s, torch.randn(5, 10, device=device)], dim=-1).requires_grad_()
    loss = kdfast.kd_loss(s_padded, t_padded, vocab_size=230, backend=backend, temperature=2.0)
    ref = kd_loss_reference(s.double(), t.double(), temperature=2.0)
    assert rel_err(loss, ref) < 2e-5
    loss.backward()
    assert torch.equal(s_padded.grad[:, 230:].cpu(), torch.zeros(5, 10))


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("reduction", ["batchmean", "mean", "none"])
def test_return_parts_and_module_form(gen, backend, device, reduction):
    s, t = make_logits(gen, (2, 6, 120), torch.float32, device)
    labels = make_labels(gen, (2, 6), 120, device)
    options = dict(temperature=3.0, divergence="reverse_kl", hard_weight=0.4, soft_weight=0.6, reduction=reduction)
    parts = kdfast.kd_loss(s, t, labels=labels, backend=backend, return_parts=True, **options)
    ref = kd_loss_reference(s.double(), t.double(), labels=labels, return_parts=True, **options)
    for got, want in zip(parts, ref):
        assert rel_err(got, want) < 2e-5
    assert not parts.kd.requires_grad and not parts.hard.requires_grad
    module = kdfast.KDLoss(backend=backend, **options)
    torch.testing.assert_close(module(s, t, labels), parts.loss)
    assert "reverse_kl" in repr(module)


def test_teacher_gets_no_gradient_and_no_grad_mode_skips_the_gradient(gen):
    s, t = make_logits(gen, (4, 50), torch.float32)
    s.requires_grad_()
    t.requires_grad_()
    kdfast.kd_loss(s, t).backward()
    assert t.grad is None and s.grad is not None
    with torch.no_grad():
        loss = kdfast.kd_loss(s, t)
    assert not loss.requires_grad


def _no_grad_cases(gen):
    """(name, call) of each loss on inputs that require grad: a logits student and a head's weight."""
    s, t = make_logits(gen, (6, 40))
    hidden, weight = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    ids, logprobs = kdfast.teacher_topk(t, 4)
    s.requires_grad_(), hidden.requires_grad_(), weight.requires_grad_()
    return {
        "kd_loss": lambda: kdfast.kd_loss(s, t, backend="torch"),
        "sparse_kd_loss": lambda: kdfast.sparse_kd_loss(s, ids, logprobs, backend="torch"),
        "fused_linear_kd_loss": lambda: kdfast.fused_linear_kd_loss(hidden, weight, hidden.detach(), weight.detach()),
        "fused_linear_sparse_kd_loss": lambda: kdfast.fused_linear_sparse_kd_loss(hidden, weight, ids, logprobs),
    }


@pytest.mark.parametrize("loss", ["kd_loss", "sparse_kd_loss", "fused_linear_kd_loss", "fused_linear_sparse_kd_loss"])
def test_no_grad_mode_computes_no_gradient_even_for_inputs_that_require_grad(gen, monkeypatch, loss):
    # An evaluation loop under torch.no_grad() passes lm_head.weight, a parameter that requires grad.
    call = _no_grad_cases(gen)[loss]
    expected = call().detach()

    def no_gradient_wanted(*args, **kwargs):
        raise AssertionError("a gradient was computed under torch.no_grad()")

    original_pass = kdfast.chunked._chunked_pass

    def chunked_pass_without_gradients(student, teacher, labels, coefs, plan, wanted, **kwargs):
        if any(wanted):
            no_gradient_wanted()
        return original_pass(student, teacher, labels, coefs, plan, wanted, **kwargs)

    monkeypatch.setattr(kdfast.ops, "gradient_buffer", no_gradient_wanted)
    monkeypatch.setattr(kdfast.chunked, "_chunked_pass", chunked_pass_without_gradients)
    with torch.no_grad():
        loss_value = call()
    assert not loss_value.requires_grad
    torch.testing.assert_close(loss_value, expected, rtol=1e-6, atol=0)


def test_second_backward_is_a_clear_error(gen):
    s, t = make_logits(gen, (4, 50), torch.float32)
    s.requires_grad_()
    loss = kdfast.kd_loss(s, t)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran for this forward"):
        loss.backward()


@pytest.mark.parametrize("divergence,beta", DIVERGENCES + [("jsd", 0.9)])
@pytest.mark.parametrize("hard_weight", [0.0, 0.5])
def test_gradient_matches_finite_differences(gen, divergence, beta, hard_weight):
    """A gradcheck by hand, in float64: central differences along random directions.

    (torch.autograd.gradcheck itself needs several backward passes per forward, which the
    gradient-in-forward design does not allow; see test_second_backward_is_a_clear_error.)
    """
    s, t = make_logits(gen, (3, 4, 23), torch.float64, scale=1.5)
    labels = make_labels(gen, (3, 4), 23)
    options = dict(labels=labels, temperature=1.7, divergence=divergence, beta=beta, hard_weight=hard_weight,
                   backend="torch")
    leaf = s.clone().requires_grad_()
    kdfast.kd_loss(leaf, t, **options).backward()
    eps = 1e-6
    for _ in range(4):
        u = torch.randn(s.shape, generator=gen, dtype=torch.float64)
        numeric = (kdfast.kd_loss(s + eps * u, t, **options) - kdfast.kd_loss(s - eps * u, t, **options)) / (2 * eps)
        analytic = (leaf.grad * u).sum()
        assert abs(numeric.item() - analytic.item()) <= 1e-7 * max(1.0, abs(analytic.item()))


def test_float64_inputs_run_on_the_torch_backend(gen):
    s, t = make_logits(gen, (3, 40), torch.float64)
    loss, ref, loss_err, grad_err = run_and_compare(s, t, backend="auto", temperature=2.0, divergence="jsd")
    assert loss.dtype == torch.float64 and loss_err < 1e-12 and grad_err < 1e-12
