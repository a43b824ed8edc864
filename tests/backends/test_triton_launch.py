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
