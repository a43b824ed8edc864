"""GPU-only checks at full size: real vocabularies, the benchmark shape, 64-bit offsets, streams,
the sparse loss, and the small edge cases of scripts/gpu_cases.py. They run wherever a CUDA device
is available (skipped elsewhere); scripts/device_check.sh selects them with ``-m gpu``.

Inputs are made on the GPU and the float64 reference runs there too, a block of rows at a time:
no host float64 tensor the size of the benchmark shape (~25 GB) is ever built."""

import sys
from pathlib import Path

import pytest
import torch
from helpers import rel_err

import kdfast
from kdfast.reference import kd_loss_reference, sparse_kd_loss_reference

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import gpu_cases  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

# Both always parametrized (not only the available ones): a backend that fails to build must fail
# these tests, not silently drop them. The ids are the backends' names, so -k triton / -k cuda work.
GPU_BACKENDS = ["triton", "cuda"]


@pytest.fixture
def backend(request):
    name = request.param
    status = kdfast.available_backends()[name]
    if not status.available:
        pytest.fail(f"backend {name!r} is unavailable on a machine with a GPU: {status.reason}")
    return name


def gpu_logits(shape, dtype, seed=0, scale=3.0, teacher_noise=0.7):
    """helpers.make_logits' distribution, drawn on the GPU in float32."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(shape, generator=gen, device="cuda") * scale
    t = s + torch.randn(shape, generator=gen, device="cuda") * (scale * teacher_noise)
    return s.to(dtype), t.to(dtype)


def check_rows(student, teacher, grad, loss_rows, rows, block=64, **options):
    """The float64 reference on the GPU over a subset of rows, a block at a time; returns the gradient error."""
    loss_parts, ref_parts, grad_parts, ref_grad_parts = [], [], [], []
    for chunk in rows.to("cuda").split(block):
        s64 = student[chunk].double().requires_grad_()
        ref = kd_loss_reference(s64, teacher[chunk].double(), reduction="none", **options)
        ref.sum().backward()
        loss_parts.append(loss_rows[chunk].double())
        ref_parts.append(ref.detach())
        grad_parts.append(grad[chunk].double())
        ref_grad_parts.append(s64.grad)
    assert rel_err(torch.cat(loss_parts), torch.cat(ref_parts)) < 2e-5
    return rel_err(torch.cat(grad_parts), torch.cat(ref_grad_parts))


def test_gpu_backends_are_available():
    """With a GPU present, triton and cuda must both be there: a failed nvcc build fails here, loudly."""
    status = kdfast.available_backends()
    missing = {name: status[name].reason for name in GPU_BACKENDS if not status[name].available}
    assert not missing, f"GPU backends unavailable: {missing}"


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("vocab", [32000, 50257, 128256, 151936, 152064, 262144])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_real_vocabularies(backend, vocab, divergence):
    s, t = gpu_logits((64, vocab), torch.bfloat16, seed=vocab)
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, temperature=2.0, divergence=divergence, reduction="none")
    rows.sum().backward()
    assert check_rows(s, t, leaf.grad, rows, torch.arange(64), temperature=2.0, divergence=divergence) < 4e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
def test_benchmark_shape(backend):
    """N=8192, V=128256, bf16: 256 random rows against the reference, no NaN anywhere."""
    s, t = gpu_logits((8192, 128256), torch.bfloat16, seed=1)
    leaf = s.clone().requires_grad_()
    rows = kdfast.kd_loss(leaf, t, backend=backend, temperature=2.0, reduction="none")
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(leaf.grad).all()
    sample = torch.randperm(8192, generator=torch.Generator().manual_seed(2))[:256]
    assert check_rows(s, t, leaf.grad, rows, sample, temperature=2.0) < 4e-3


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
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


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_inplace_on_a_sequence_slice_beyond_one_block(backend, divergence):
    """inplace_backward on logits[:, :-1] (rows not evenly spaced) at V > 4096: the gradient written over
    the view equals the out-of-place one, and the dropped last position keeps its zero gradient."""
    s, t = gpu_logits((4, 65, 50257), torch.bfloat16, seed=3)
    options = dict(backend=backend, temperature=2.0, divergence=divergence, reduction="sum")
    expected = s.clone().requires_grad_()
    want = kdfast.kd_loss(expected[:, :-1], t[:, :-1], **options)
    want.backward()
    leaf = s.clone().requires_grad_()
    logits = leaf * 1.0  # a non-leaf, as an lm_head's output
    loss = kdfast.kd_loss(logits[:, :-1], t[:, :-1], inplace_backward=True, **options)
    loss.backward()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(leaf.grad, expected.grad)
    assert (leaf.grad[:, -1] == 0).all()


@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
def test_logits_from_a_side_stream(backend):
    """Logits made on a side stream behind a long kernel, the loss called inside torch.cuda.stream(s):
    the kernels must launch on the current stream, so they wait for the logits."""
    s_ref, t_ref = gpu_logits((256, 32000), torch.bfloat16, seed=4)
    want_leaf = s_ref.clone().requires_grad_()
    want = kdfast.kd_loss(want_leaf, t_ref, backend=backend, temperature=2.0, reduction="none")
    want.sum().backward()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # ~0.1 s of spinning ahead of the logits
        student = s_ref.clone().requires_grad_()
        teacher = t_ref * 1  # written on the side stream, after the sleep
        rows = kdfast.kd_loss(student, teacher, backend=backend, temperature=2.0, reduction="none")
        rows.sum().backward()
    torch.cuda.current_stream().wait_stream(side)
    torch.testing.assert_close(rows, want)
    torch.testing.assert_close(student.grad, want_leaf.grad)


@pytest.mark.parametrize("vocab,k", [(128256, 64), (151936, 256), (262144, 16)])
def test_sparse_at_real_sizes(vocab, k):
    """sparse_kd_loss (the Triton kernel of kdfast/backends/triton_sparse.py) at N=4096 on real
    vocabularies, against the float64 reference on a sample of rows."""
    n = 4096
    s, t = gpu_logits((n, vocab), torch.bfloat16, seed=vocab + k)
    ids, logprobs = kdfast.teacher_topk(t, k, temperature=2.0)
    del t
    leaf = s.clone().requires_grad_()
    rows = kdfast.sparse_kd_loss(leaf, ids, logprobs, backend="triton", temperature=2.0, reduction="none")
    rows.sum().backward()
    assert torch.isfinite(rows).all() and torch.isfinite(leaf.grad).all()
    sample = torch.randperm(n, generator=torch.Generator().manual_seed(5))[:128].cuda()
    s64 = s[sample].double().requires_grad_()
    ref = sparse_kd_loss_reference(s64, ids[sample], logprobs[sample], temperature=2.0, reduction="none")
    ref.sum().backward()
    assert rel_err(rows[sample], ref) < 2e-5
    assert rel_err(leaf.grad[sample], s64.grad) < 4e-3


@pytest.mark.parametrize("case", gpu_cases.cases(), ids=lambda c: c.name.replace(" ", "-"))
@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
def test_small_edge_cases(case, backend):
    """The cases that device_check.sh also runs under compute-sanitizer."""
    if backend not in case.backends:
        pytest.skip(f"no {backend} kernel for this case")
    loss_err, grad_err = case.run(backend, "cuda")
    assert loss_err < 1e-4 and grad_err < gpu_cases.TOLERANCE


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("backend", GPU_BACKENDS, indirect=True)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_logits_on_another_device_than_the_current_one(backend, divergence):
    """Triton launches on the current device: the kernels must switch to the tensors' own."""
    s, t = (x.to("cuda:1") for x in gpu_logits((16, 3001), torch.float32, seed=6))
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

