"""Each backend's per-shard kernels of the vocabulary-parallel loss (the ``vocab_shard`` record of
kdfast.backends) against float64 definitions, in one process: the full rows are cut into slices,
and each slice's statistics, mixture sums and gradient are checked against what the float64 math
on the full rows says they are. The gradient is that of sum_r (coef_kd_r T kd_r + coef_ce_r ce_r)
restricted to the slice's columns (zero on ignored rows), from the rows' global normalisers given
as the kernels take them. Then the same slice-by-slice path on a GPU at a tensor-parallel shape
(128256 columns over 8 ranks)."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import make_labels, make_logits, rel_err, runnable_backends, stored_as

from kdfast.backends import DIVERGENCE_CODES, SHARD_ROWS, SHARD_STATS, KernelParams
from kdfast.backends.registry import backend as backend_record
from kdfast.reference import _divergence_over_categories

PAIRS = [(name, device) for name, device in runnable_backends() if backend_record(name).vocab_shard is not None]
DIVERGENCES = [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.8), ("tvd", 0.5)]
FP32_TOL = 2e-5


def _shift(row_max):
    return torch.where(row_max == -math.inf, 0.0, row_max)


def _expected_stats(s, t, temperature, divergence):
    """SHARD_STATS of (rows, W) float64 slices."""
    max_s, max_t = s.amax(-1), t.amax(-1)
    a_s, a_t = (s - _shift(max_s)[:, None]) / temperature, (t - _shift(max_t)[:, None]) / temperature
    e_s, e_t = a_s.exp(), a_t.exp()
    cross = torch.zeros_like(max_s)
    if divergence == "forward_kl":
        cross = torch.where(e_t > 0, e_t * (a_t - a_s), 0.0).sum(-1)
    elif divergence == "reverse_kl":
        cross = torch.where(e_s > 0, e_s * (a_s - a_t), 0.0).sum(-1)
    return torch.stack([max_s, max_t, e_s.sum(-1), e_t.sum(-1), (s - _shift(max_s)[:, None]).exp().sum(-1), cross])


def _rows_values(s, t, lo, hi, temperature, divergence, beta, gen):
    """The SHARD_ROWS of slice lo:hi from the float64 full rows, with random gradient weights and ignored rows."""
    n = s.shape[0]
    log_ps, log_pt = (s / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    ps, pt = log_ps.exp(), log_pt.exp()
    shift_s, shift_t = _shift(s[:, lo:hi].amax(-1)), _shift(t[:, lo:hi].amax(-1))
    row = {name: torch.zeros(n, dtype=torch.float64) for name in SHARD_ROWS}
    row.update(shift_s=shift_s, shift_t=shift_t,
               offset_s=(s / temperature).logsumexp(-1) - shift_s / temperature,
               offset_t=(t / temperature).logsumexp(-1) - shift_t / temperature,
               offset_s1=s.logsumexp(-1) - shift_s,
               kd=_divergence_over_categories(log_ps, log_pt, divergence, beta),
               coef_kd=torch.rand(n, generator=gen, dtype=torch.float64) + 0.5,
               coef_ce=torch.full((n,), 0.7, dtype=torch.float64),
               ignored=(torch.rand(n, generator=gen) < 0.25).double())
    if divergence == "jsd":
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        row["kl_student_mix"] = (ps * (log_ps - log_m)).sum(-1)
    if divergence == "tvd":
        half_tied = torch.where(ps == pt, 0.5 * ps, 0.0)
        row["mass_below"] = torch.where(ps < pt, ps, half_tied).sum(-1)
        row["mass_above"] = torch.where(ps > pt, ps, half_tied).sum(-1)
    return torch.stack([row[name] for name in SHARD_ROWS])


def _expected_mixture(s, t, lo, hi, temperature, divergence, beta):
    log_ps = (s / temperature).log_softmax(-1)[:, lo:hi]
    log_pt = (t / temperature).log_softmax(-1)[:, lo:hi]
    ps, pt = log_ps.exp(), log_pt.exp()
    if divergence == "jsd":
        log_m = torch.logaddexp(log_pt + math.log(beta), log_ps + math.log(1 - beta))
        kl_t = torch.where(pt > 0, pt * (log_pt - log_m), 0.0).sum(-1)  # 0 log 0 = 0 at the teacher's -inf
        return torch.stack([kl_t, (ps * (log_ps - log_m)).sum(-1), torch.zeros_like(kl_t)])
    half_tied = torch.where(ps == pt, 0.5 * ps, 0.0)
    return torch.stack([0.5 * (pt - ps).abs().sum(-1), torch.where(ps < pt, ps, half_tied).sum(-1),
                        torch.where(ps > pt, ps, half_tied).sum(-1)])


def _expected_gradient(s, t, labels, rows, lo, hi, temperature, divergence, beta, hard):
    """d/ds of sum_r coef_kd_r T kd_r + coef_ce_r ce_r on columns lo:hi, zero on ignored rows."""
    row = dict(zip(SHARD_ROWS, rows))
    leaf = s.clone().requires_grad_()
    log_ps, log_pt = (leaf / temperature).log_softmax(-1), (t / temperature).log_softmax(-1)
    total = (row["coef_kd"] * temperature * _divergence_over_categories(log_ps, log_pt, divergence, beta)).sum()
    if hard:
        total = total + (row["coef_ce"] * F.cross_entropy(leaf, labels, reduction="none")).sum()
    total.backward()
    return leaf.grad[:, lo:hi].masked_fill(row["ignored"][:, None] != 0, 0.0)


def _check_slices(name, device, s, t, widths, labels, divergence, beta, hard, temperature, gen, dtype):
    """Every slice of (rows, V) logits in dtype through backend name's kernels, against float64."""
    kernels = backend_record(name).vocab_shard
    code = DIVERGENCE_CODES[divergence]
    s64, t64 = s.double().cpu(), t.double().cpu()
    errors = []
    lo = 0
    for width in widths:
        hi = lo + width
        params = KernelParams(temperature, temperature, code, beta, -100, hard)
        s_part, t_part = s[:, lo:hi].view(1, *s[:, lo:hi].shape), t[:, lo:hi].view(1, *t[:, lo:hi].shape)
        stats = kernels.stats(s_part, t_part, params).double().cpu()
        want = _expected_stats(s64[:, lo:hi], t64[:, lo:hi], temperature, divergence)
        for i, stat in enumerate(SHARD_STATS):
            if (stat != "sum_s1" or hard) and rel_err(stats[i], want[i]) > FP32_TOL:
                errors.append(f"slice {lo}:{hi} {stat}: {rel_err(stats[i], want[i]):.2e}")
        rows = _rows_values(s64, t64, lo, hi, temperature, divergence, beta, gen)
        if divergence in ("jsd", "tvd"):
            mixture = kernels.mixture(s_part, t_part, rows.to(device), params).double().cpu()
            want = _expected_mixture(s64, t64, lo, hi, temperature, divergence, beta)
            for i in range(3):
                if rel_err(mixture[i], want[i]) > FP32_TOL:
                    errors.append(f"slice {lo}:{hi} mixture[{i}]: {rel_err(mixture[i], want[i]):.2e}")
        owned = (labels >= lo) & (labels < hi)
        columns = torch.where(owned, labels - lo, width).to(device)
        grad = torch.full_like(s_part, math.nan)
        kernels.gradient(s_part, t_part, columns, grad, rows.to(device), params)
        want = _expected_gradient(s64, t64, labels.cpu(), rows, lo, hi, temperature, divergence, beta, hard)
        tol = FP32_TOL if dtype == torch.float32 else \
            FP32_TOL + 3 * rel_err(stored_as(want, dtype, truncated=name == "triton" and device == "cpu"), want)
        if rel_err(grad[0].cpu(), want) > tol:
            errors.append(f"slice {lo}:{hi} gradient: {rel_err(grad[0].cpu(), want):.2e} > {tol:.1e}")
        lo = hi
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("hard", [False, True], ids=["soft", "hard"])
@pytest.mark.parametrize("divergence,beta", DIVERGENCES, ids=[f"{d}-{b}" for d, b in DIVERGENCES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,device", PAIRS, ids=[f"{n}-{d}" for n, d in PAIRS])
def test_slices_match_the_float64_definitions(name, device, dtype, divergence, beta, hard):
    """Uneven slices of a vocabulary that is not a power of two, one of them a single column; -inf in
    the teacher (0 log 0 = 0 in the sums), a huge logit, rows with a stride other than the slice's width."""
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))  # the test's seed (conftest)
    n, vocab = 12, 53
    s, t = make_logits(gen, (n, vocab))
    if divergence != "reverse_kl":  # KL(p_s || p_t) is infinite where only the teacher is -inf
        t[2, 5:9] = -math.inf
    s[3, 40] += 1e4  # a huge logit, centred away: no overflow
    labels = make_labels(gen, (n,), vocab).clamp(min=0)
    s, t = s.to(device=device, dtype=dtype), t.to(device=device, dtype=dtype)
    _check_slices(name, device, s, t, [17, 1, 35], labels, divergence, beta, hard, 2.0, gen, dtype)


GPU_PAIRS = [(name, device) for name, device in PAIRS if device == "cuda"]


@pytest.mark.skipif(not GPU_PAIRS, reason="needs a CUDA device")
@pytest.mark.parametrize("name,device", GPU_PAIRS, ids=[name for name, _ in GPU_PAIRS])
def test_a_tensor_parallel_slice_on_the_gpu(name, device):
    """One rank's slice of 128256 columns over 8 ranks (16032), bf16, forward KL with hard labels and jsd."""
    gen = torch.Generator().manual_seed(0)
    s, t = make_logits(gen, (64, 128256))
    labels = make_labels(gen, (64,), 128256).clamp(min=0)
    s, t = s.to(device=device, dtype=torch.bfloat16), t.to(device=device, dtype=torch.bfloat16)
    for divergence, beta, hard in (("forward_kl", 0.5, True), ("jsd", 0.5, False)):
        _check_slices(name, device, s, t, [16032] * 8, labels, divergence, beta, hard, 1.0, gen, torch.bfloat16)

