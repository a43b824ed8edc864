"""The Triton loss kernel gives the same rows and gradient under every launch configuration the device
run's grid tries (benchmarks/triton_grid.py): full blocks read without a mask, a partial last block with
one, and the sweeps' pipelining depth."""

import pytest
import torch

from helpers import make_labels, make_logits, rel_err, runnable_backends

pytestmark = pytest.mark.skipif(not any(b == "triton" for b, _ in runnable_backends()),
                                reason="the triton backend does not run here (no GPU, TRITON_INTERPRET unset)")


@pytest.mark.parametrize("divergence", [0, 1, 2, 3])
@pytest.mark.parametrize("vocab", [389, 512])  # a partial last block, and none
@pytest.mark.parametrize("num_stages", [None, 3])
def test_launch_configurations_agree(gen, divergence, vocab, num_stages):
    from kdfast.backends import KernelParams
    from kdfast.backends.triton_kernels import LaunchConfig, kd_forward

    device = next(d for b, d in runnable_backends() if b == "triton")
    s, t = make_logits(gen, (1, 6, vocab), torch.bfloat16, device)
    labels = make_labels(gen, (6,), vocab, device)
    params = KernelParams(1.5, 1.5, divergence, 0.3, -100, True, 1.0, 12.0, 0.5, 0.0)  # a student cap, a scale
    coefs = torch.tensor([0.7, 0.3], device=device)
    results = []
    for config in (None, LaunchConfig(128, 4, num_stages)):  # the default (one block) and four or more blocks
        grad = torch.empty_like(s)
        results.append((*kd_forward(s, t, labels, grad, coefs, params, config), grad))
    (kd, ce, grad), (blocked_kd, blocked_ce, blocked_grad) = results
    torch.testing.assert_close(blocked_kd, kd, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(blocked_ce, ce, rtol=1e-5, atol=1e-6)
    # Other blocks sum in another order: an entry at a bf16 rounding boundary may round the other way (and a
    # tvd entry with p_s ~ p_t take the other sign), so the bf16 gradients agree to their rounding, in norm.
    assert torch.isfinite(blocked_grad).all() and rel_err(blocked_grad, grad) < 4e-3


@pytest.mark.parametrize("divergence", [0, 1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rows_that_start_off_a_16_byte_boundary_are_read_from_it(gen, divergence, dtype):
    """Rows at every distance from a 16-byte boundary (an odd row stride and first entry): the kernel reads
    each from the boundary below it, the first block masked (peel_rows), and gives what it gives on the
    same rows made contiguous, with one block per row and with several."""
    from kdfast.backends import KernelParams
    from kdfast.backends.triton_kernels import LaunchConfig, gradient_buffer, kd_forward, peel_rows

    device = next(d for b, d in runnable_backends() if b == "triton")
    vocab = 389
    s_wide, t_wide = make_logits(gen, (2, 5, vocab + 4), dtype, device)
    s, t = s_wide[..., 3:3 + vocab], t_wide[..., 3:3 + vocab]  # rows start 3, 3 + 393, ... entries in
    labels = make_labels(gen, (10,), vocab, device)
    params = KernelParams(1.5, 1.5, divergence, 0.3, -100, True)
    coefs = torch.tensor([0.7, 0.3], device=device)
    grad = gradient_buffer(s)
    assert peel_rows(s, t, grad) and not peel_rows(s, t.contiguous(), grad)
    for config in (None, LaunchConfig(64, 2)):
        kd, ce = kd_forward(s, t, labels, grad, coefs, params, config)
        want_grad = torch.empty_like(s, memory_format=torch.contiguous_format)
        want_kd, want_ce = kd_forward(s.contiguous(), t.contiguous(), labels, want_grad, coefs, params, config)
        torch.testing.assert_close(kd, want_kd, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ce, want_ce, rtol=1e-5, atol=1e-6)
        assert torch.isfinite(grad).all() and rel_err(grad, want_grad) < (4e-3 if dtype == torch.bfloat16 else 1e-5)
