"""GPU-only checks at full size: real vocabularies, the benchmark shape, 64-bit offsets.
They run wherever a CUDA device is available (skipped elsewhere)."""

import pytest
import torch
from helpers import make_logits, rel_err

import kdfast
from kdfast.reference import kd_loss_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

GPU_BACKENDS = [name for name in ("triton", "cuda") if kdfast.available_backends()[name].available]


def check_rows(student, teacher, grad, loss_rows, rows, **options):
    """The float64 reference on a subset of rows (the whole tensor would not fit in float64)."""
    s64 = student[rows].double().cpu().requires_grad_()
    ref = kd_loss_reference(s64, teacher[rows].double().cpu(), reduction="none", **options)
    assert rel_err(loss_rows[rows], ref) < 2e-5
    ref.sum().backward()
    return rel_err(grad[rows], s64.grad)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936, 152064, 262144])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_real_vocabularies(gen, backend, vocab, divergence):
    s, t = make_logits(gen, (64, vocab), torch.bfloat16, "cuda")
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, temperature=2.0, divergence=divergence, reduction="none")
    rows.sum().backward()
    assert check_rows(s, t, leaf.grad, rows, torch.arange(64), temperature=2.0, divergence=divergence) < 4e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_benchmark_shape(gen, backend):
    """N=8192, V=128256, bf16: 256 random rows against the reference, no NaN anywhere."""
    s, t = make_logits(gen, (8192, 128256), torch.bfloat16, "cuda")
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, temperature=2.0, reduction="none")
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(leaf.grad).all()
    sample = torch.randperm(8192, generator=gen)[:256]
    assert check_rows(s, t, leaf.grad, rows, sample, temperature=2.0) < 4e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_offsets_beyond_2_pow_31(backend):
    """N x V above 2**31 elements: the last rows start beyond what 32-bit offsets reach."""
    n, vocab = 16640, 131072  # 2.18e9 elements: 4.4 GB per bf16 tensor
    gen = torch.Generator(device="cuda").manual_seed(0)
    s = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    t = torch.randn(n, vocab, device="cuda", dtype=torch.bfloat16, generator=gen) * 3
    s.requires_grad_()
    rows = kdfast.kd_loss(s, t, backend=backend, temperature=2.0, reduction="none", inplace_backward=False)
    rows.sum().backward()
    last = torch.arange(n - 8, n)
    assert check_rows(s.detach(), t, s.grad, rows, last, temperature=2.0) < 4e-3


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logits_on_another_device_than_the_current_one(gen, backend, divergence):
    """Triton launches on the current device: the kernels must switch to the tensors' own."""
    s, t = make_logits(gen, (16, 3001), torch.float32, "cuda:1")
    leaf = s.clone().requires_grad_()
    with torch.cuda.device(0):
        rows = kdfast.kd_loss(leaf, t, backend=backend, temperature=2.0, divergence=divergence, reduction="none")
        (rows * 0.5).sum().backward()  # a grad_output other than 1: the scaling kernel runs too
    torch.cuda.synchronize(1)
    assert rows.device == torch.device("cuda:1") and leaf.grad.device == torch.device("cuda:1")
    s64 = s.double().cpu().requires_grad_()
    ref = kd_loss_reference(s64, t.double().cpu(), temperature=2.0, divergence=divergence, reduction="none")
    (ref * 0.5).sum().backward()
    assert rel_err(rows, ref) < 2e-5 and rel_err(leaf.grad, s64.grad) < 2e-5
