"""sparse_kd_loss, its fused-linear form and the capture helpers against the float64 reference
(kdfast.reference.sparse_kd_loss_reference), gradients included, for every backend with a sparse
kernel; the awkward inputs; the refusals; and the sampled teacher's unbiased gradient."""

import math

import pytest
import torch

from helpers import interpreted, make_inputs, make_labels, make_logits, rel_err, runnable_backends

import kdfast
from kdfast.backends import registry
from kdfast.reference import sparse_kd_loss_reference

BACKENDS = [(b, d) for b, d in runnable_backends() if registry.backend(b).sparse_kd_forward is not None]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# A bf16/fp16 gradient is rounded when stored and again when backward scales it: at most a unit
# of its last place per entry in all, a bound on the relative L2 error however few entries dominate.
GRADIENT_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
CASES = [("forward_kl", 0.5, "bucket"), ("forward_kl", 0.5, "renorm"), ("forward_kl", 0.5, "raw"),
         ("reverse_kl", 0.5, "bucket"), ("jsd", 0.5, "bucket"), ("jsd", 0.2, "bucket"), ("jsd", 0.0, "bucket"),
         ("jsd", 1.0, "bucket")]


def sparse_teacher(gen, student, k, temperature=1.0, pad_fraction=0.0):
    """A teacher's top-k (ids, log-probs) near the student, with some slots emptied (-1)."""
    teacher = student.double() + torch.randn(student.shape, generator=gen, dtype=torch.float64) * 2.0
    ids, logprobs = kdfast.teacher_topk(teacher, k, temperature)
    empty = torch.rand(ids.shape, generator=gen) < pad_fraction
    return ids.masked_fill(empty, -1), logprobs.masked_fill(empty, -math.inf)


def compare(student, ids, logprobs, *, backend, tol=2e-5, **options):
    """Loss and gradient against the float64 reference on the same (rounded) inputs."""
    leaf = student.detach().clone().requires_grad_()
    loss = kdfast.sparse_kd_loss(leaf, ids, logprobs, backend=backend, **options)
    upstream = torch.rand(loss.shape, dtype=torch.float64) + 0.5
    (loss.double().cpu() * upstream).sum().backward()
    ref_leaf = student.detach().cpu().double().requires_grad_()
    tolerance = kdfast.sparse.MASS_TOLERANCE[logprobs.dtype]
    ref = sparse_kd_loss_reference(ref_leaf, ids.cpu(), logprobs.cpu(), mass_tolerance=tolerance,
                                   **{k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in options.items()})
    (ref * upstream).sum().backward()
    assert leaf.grad.dtype == student.dtype
    assert rel_err(loss, ref) < tol, (loss, ref)
    assert rel_err(leaf.grad, ref_leaf.grad) < tol + GRADIENT_ROUNDING[student.dtype]
    return loss, ref


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("divergence,beta,tail", CASES)
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_matches_reference(gen, backend, device, dtype, divergence, beta, tail, reduction):
    shape, k = ((2, 5, 193), 16) if interpreted(backend, device) else ((3, 7, 1531), 64)
    s, _ = make_logits(gen, shape, dtype, device)
    ids, logprobs = sparse_teacher(gen, s, k, temperature=2.0, pad_fraction=0.1)
    labels = make_labels(gen, shape[:-1], shape[-1], device)
    compare(s, ids.to(device), logprobs.to(device), backend=backend, labels=labels, temperature=2.0,
            divergence=divergence, beta=beta, tail=tail, reduction=reduction, hard_weight=0.3)


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("k", [1, 2, 7, 64, 200])
def test_any_number_of_ids(gen, backend, device, k):
    s, _ = make_logits(gen, (9, 211), torch.float32, device)
    ids, logprobs = sparse_teacher(gen, s, k)
    # (Reverse KL is infinite where the teacher's rest is within the tolerance, as with many ids it can be.)
    for divergence in ("forward_kl", "jsd") if k > 7 else ("forward_kl", "reverse_kl", "jsd"):
        compare(s, ids.to(device), logprobs.to(device), backend=backend, divergence=divergence, temperature=1.5)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_reverse_kl_is_infinite_where_only_the_student_has_a_rest(gen, backend, device):
    s, _ = make_logits(gen, (2, 30), torch.float32, device)
    ids = torch.tensor([[0, 1], [0, 1]], device=device)
    logprobs = torch.log(torch.tensor([[0.5, 0.5], [0.5, 0.25]], device=device))  # no rest, then a rest of 1/4
    rows = kdfast.sparse_kd_loss(s, ids, logprobs, divergence="reverse_kl", backend=backend, reduction="none")
    assert rows[0].item() == math.inf and math.isfinite(rows[1].item())


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_thousand_ids(gen, backend, device):
    s, _ = make_logits(gen, (3, 1500), torch.float32, device)
    ids, logprobs = sparse_teacher(gen, s, 1024)
    compare(s, ids.to(device), logprobs.to(device), backend=backend, divergence="jsd")


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3)])
def test_ids_covering_the_vocabulary_are_kd_loss(gen, backend, device, divergence, beta):
    """K = V: no rest on either side, whatever the rounding of the teacher's mass."""
    s, t = make_logits(gen, (4, 6, 97), torch.float32, device)
    ids, logprobs = kdfast.teacher_topk(t, 97, temperature=2.0)
    labels = make_labels(gen, (4, 6), 97, device)
    options = dict(labels=labels, temperature=2.0, divergence=divergence, beta=beta, hard_weight=0.4)
    a, b = s.clone().requires_grad_(), s.clone().requires_grad_()
    sparse = kdfast.sparse_kd_loss(a, ids, logprobs, backend=backend, **options)
    dense = kdfast.kd_loss(b, t, backend="torch", **options)
    torch.testing.assert_close(sparse, dense, rtol=2e-5, atol=1e-7)
    sparse.backward()
    dense.backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=2e-4, atol=1e-7)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_minus_inf_logits_and_rows_of_empty_slots(gen, backend, device):
    s, _ = make_logits(gen, (6, 150), torch.float32, device)
    ids, logprobs = sparse_teacher(gen, s, 10)
    s[:, 140:] = -math.inf  # a padded vocabulary
    ids[ids >= 140] = -1
    ids[2], logprobs[2] = -1, -math.inf  # no teacher mass at all: no divergence, the hard part counts
    labels = make_labels(gen, (6,), 140, device, ignore_fraction=0.0)
    loss, _ = compare(s, ids.to(device), logprobs.to(device), backend=backend, labels=labels, hard_weight=0.5,
                      reduction="none")
    assert torch.isfinite(loss).all()
    rows = kdfast.sparse_kd_loss(s, ids, logprobs, backend=backend, reduction="none")
    assert rows[2].item() == 0.0


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_strided_student_and_int32_ids(gen, backend, device):
    s, _ = make_logits(gen, (3, 9, 120), torch.bfloat16, device)
    ids, logprobs = sparse_teacher(gen, s[:, :-1], 12)
    compare(s[:, :-1], ids.int().to(device), logprobs.to(device), backend=backend, temperature=2.0)


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_a_tiny_student_rest_keeps_its_precision(gen, backend, device):
    """The ids hold all but ~1e-9 of the student's mass, where 1 - p_S in float32 is noise: the rest,
    and the gradient of the rest's tokens (p_j / p_r times the teacher's rest), keep their precision."""
    s, _ = make_logits(gen, (4, 700), torch.float32, device, scale=1.0)
    ids = torch.stack([torch.randperm(700, generator=gen)[:8] for _ in range(4)]).to(device)
    s = s.scatter(-1, ids, 25.0 + torch.rand(4, 8, generator=gen).to(device))
    logprobs = torch.log(torch.full((4, 8), 0.9 / 8, device=device))  # the teacher's rest: 0.1
    leaf = s.clone().requires_grad_()
    loss = kdfast.sparse_kd_loss(leaf, ids, logprobs, backend=backend)
    loss.backward()
    ref_leaf = s.cpu().double().requires_grad_()
    ref = sparse_kd_loss_reference(ref_leaf, ids.cpu(), logprobs.cpu())
    ref.backward()
    rest = torch.ones_like(ref_leaf, dtype=torch.bool).scatter(-1, ids.cpu(), False)
    assert rel_err(loss, ref) < 2e-5
    assert rel_err(leaf.grad.cpu()[rest], ref_leaf.grad[rest]) < 2e-5


@pytest.mark.parametrize("backend,device", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward_gives_the_same_gradient(gen, backend, device, dtype):
    s, _ = make_logits(gen, (3, 5, 300), dtype, device)
    ids, logprobs = sparse_teacher(gen, s, 12, temperature=2.0, pad_fraction=0.1)
    labels = make_labels(gen, (3, 5), 300, device)
    grads = []
    for inplace in (False, True):
        leaf = s.detach().clone().requires_grad_()
        logits = leaf * 1.0  # inplace_backward overwrites a non-leaf, as an lm_head's output is
        loss = kdfast.sparse_kd_loss(logits, ids.to(device), logprobs.to(device), labels=labels, temperature=2.0,
                                     hard_weight=0.3, inplace_backward=inplace, backend=backend)
        loss.backward()
        grads.append(leaf.grad)
    assert torch.equal(grads[1], grads[0])


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_nan_student_rows_give_nan_and_ignored_rows_are_not_read(gen, backend, device):
    s, _ = make_logits(gen, (4, 64), torch.float32, device)
    ids, logprobs = sparse_teacher(gen, s, 8)
    s[1, 3] = math.nan
    rows = kdfast.sparse_kd_loss(s, ids, logprobs, backend=backend, reduction="none")
    assert math.isnan(rows[1].item()) and torch.isfinite(rows[[0, 2, 3]]).all()
    labels = torch.tensor([3, -100, 5, 7], device=device)
    assert torch.isfinite(kdfast.sparse_kd_loss(s, ids, logprobs, labels=labels, backend=backend))


@pytest.mark.parametrize("backend,device", BACKENDS)
def test_out_of_range_ids_make_nan_rows_in_the_kernel(gen, backend, device):
    """What a GPU does without the host-side check: the row becomes NaN, nothing is read outside it."""
    from kdfast.backends import SparseKernelParams

    s, _ = make_logits(gen, (1, 3, 40), torch.float32, device)
    ids, logprobs = sparse_teacher(gen, s[0], 4)
    ids[1, 0] = 40
    params = SparseKernelParams(1.0, 0, 0.5, 0, 1e-4, -100, False)
    coefs = torch.tensor([1.0, 0.0], device=device)
    grad = torch.empty_like(s)
    kd, _ = registry.backend(backend).sparse_kd_forward(s, ids.to(device), logprobs.to(device), None, grad, coefs,
                                                      params)
    assert math.isnan(kd[1].item()) and torch.isfinite(kd[[0, 2]]).all()
    assert torch.isnan(grad[0, 1]).all() and torch.isfinite(grad[0, [0, 2]]).all()


@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_num_items_in_batch(gen, reduction):
    s, _ = make_logits(gen, (5, 60))
    ids, logprobs = sparse_teacher(gen, s, 6)
    if reduction == "sum":
        with pytest.raises(ValueError, match="num_items_in_batch"):
            kdfast.sparse_kd_loss(s, ids, logprobs, reduction=reduction, num_items_in_batch=3)
        return
    torch.testing.assert_close(kdfast.sparse_kd_loss(s, ids, logprobs, num_items_in_batch=3),
                               kdfast.sparse_kd_loss(s, ids, logprobs, reduction="sum") / 3)


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
@pytest.mark.parametrize("tail", ["bucket", "raw"])
def test_fused_linear_sparse_matches_logits_then_sparse_kd_loss(gen, reduction, tail):
    i = make_inputs(gen, 19, 16, 8, 97)
    ids, logprobs = sparse_teacher(gen, torch.randn(19, 97, generator=gen), 9, temperature=2.0)
    labels = make_labels(gen, (19,), 97)
    options = dict(labels=labels, temperature=2.0, hard_weight=0.3, reduction=reduction, tail=tail)
    fused = {k: i[k].clone().requires_grad_() for k in ("student_hidden", "student_weight", "student_bias")}
    plain = {k: i[k].clone().requires_grad_() for k in ("student_hidden", "student_weight", "student_bias")}
    loss = kdfast.fused_linear_sparse_kd_loss(*[fused[k] for k in ("student_hidden", "student_weight")], ids,
                                              logprobs, student_bias=fused["student_bias"], chunk_size=5, **options)
    logits = torch.nn.functional.linear(plain["student_hidden"], plain["student_weight"], plain["student_bias"])
    expected = kdfast.sparse_kd_loss(logits, ids, logprobs, **options)
    torch.testing.assert_close(loss, expected)
    upstream = torch.rand(loss.shape, generator=gen) + 0.5
    (loss * upstream).sum().backward()
    (expected * upstream).sum().backward()
    for name in fused:
        torch.testing.assert_close(fused[name].grad, plain[name].grad, rtol=1e-5, atol=1e-6)


def test_fused_linear_teacher_topk_matches_teacher_topk(gen):
    i = make_inputs(gen, 30, 8, 12, 101)
    ids, logprobs = kdfast.fused_linear_teacher_topk(i["teacher_hidden"], i["teacher_weight"], 7,
                                                     teacher_bias=i["teacher_bias"], temperature=1.5, chunk_size=8)
    logits = torch.nn.functional.linear(i["teacher_hidden"], i["teacher_weight"], i["teacher_bias"])
    expected_ids, expected_logprobs = kdfast.teacher_topk(logits, 7, temperature=1.5)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(logprobs, expected_logprobs)


def test_teacher_topk_is_most_likely_first_at_the_temperature(gen):
    t = torch.randn(3, 4, 50, generator=gen) * 3
    ids, logprobs = kdfast.teacher_topk(t, 5, temperature=2.0)
    assert ids.shape == logprobs.shape == (3, 4, 5)
    expected = torch.log_softmax(t / 2.0, -1).topk(5, -1)
    assert torch.equal(ids, expected.indices)
    torch.testing.assert_close(logprobs, expected.values)


def test_teacher_sample_counts_the_draws(gen):
    t = torch.randn(5, 30, generator=gen)
    ids, logweights = kdfast.teacher_sample(t, 64, generator=gen)
    weights = logweights.exp()
    torch.testing.assert_close(weights.sum(-1), torch.ones(5))
    for row_ids, row_weights in zip(ids, weights):
        real = row_ids >= 0
        assert real[: real.sum()].all() and not real[real.sum():].any()  # distinct ids first
        assert len(set(row_ids[real].tolist())) == int(real.sum())
        assert torch.allclose(row_weights[real] * 64, (row_weights[real] * 64).round())


def test_sampled_teacher_gradient_is_unbiased_and_top_k_is_not(gen):
    """The mean forward-KL gradient over many sampled teachers (tail="raw") matches the dense one
    within Monte-Carlo error; the top-k teacher's (renormalised) gradient does not. A row's gradient
    entry is (p_s - count / n) / rows, whose standard deviation over draws is known exactly."""
    rows, vocab, n, draws = 4, 40, 8, 400
    s, t = make_logits(gen, (rows, vocab), torch.float64, scale=1.0)
    dense = s.clone().requires_grad_()
    kdfast.kd_loss(dense, t).backward()
    mean = torch.zeros_like(s)
    for _ in range(draws):
        ids, logweights = kdfast.teacher_sample(t, n, generator=gen)
        leaf = s.clone().requires_grad_()
        kdfast.sparse_kd_loss(leaf, ids, logweights, tail="raw").backward()
        mean += leaf.grad / draws
    p_t = torch.softmax(t, -1)
    stderr = (p_t * (1 - p_t) / (n * draws)).sqrt() / rows
    assert ((mean - dense.grad).abs() <= 5 * stderr + 1e-12).all()
    ids, logprobs = kdfast.teacher_topk(t, n)
    biased = s.clone().requires_grad_()
    kdfast.sparse_kd_loss(biased, ids, logprobs, tail="renorm").backward()
    assert (biased.grad - dense.grad).norm() > 4 * stderr.norm()  # far beyond what sampling noise explains


# --- refusals ---

S = torch.randn(4, 10)
IDS = torch.tensor([[1, 2, 3]] * 4)
LOGPROBS = torch.log(torch.tensor([[0.5, 0.25, 0.125]] * 4))

REFUSALS = [
    ("id out of range", (S, IDS.masked_fill(IDS == 3, 10), LOGPROBS), {}, ValueError,
     r"teacher_ids must lie in \[0, 10\) or be -1.*found 10 in row 0"),
    ("negative id", (S, IDS.masked_fill(IDS == 3, -2), LOGPROBS), {}, ValueError, "found -2"),
    ("repeated id", (S, IDS.masked_fill(IDS == 3, 2), LOGPROBS), {}, ValueError, "teacher_ids repeats id 2 in row 0"),
    ("probabilities for log-probs", (S, IDS, LOGPROBS.exp()), {}, ValueError,
     r"must be log-probabilities \(<= 0\); found 0.5"),
    ("mass above one", (S, IDS, LOGPROBS + 0.5), {}, ValueError, r"sum to 1.4.*exceeding 1 by 0.4"),
    ("NaN log-prob", (S, IDS, LOGPROBS.masked_fill(IDS == 1, math.nan)), {}, ValueError, "NaN in row 0"),
    ("shapes differ", (S, IDS, LOGPROBS[:, :2]), {}, ValueError, "they must match"),
    ("wrong leading shape", (S, IDS[:3], LOGPROBS[:3]), {}, ValueError, r"teacher_ids must have shape \(4, 'K'\)"),
    ("no ids", (S, IDS[:, :0], LOGPROBS[:, :0]), {}, ValueError, "K = 0"),
    ("float ids", (S, IDS.float(), LOGPROBS), {}, TypeError, "teacher_ids must be an int64 or int32"),
    ("int log-probs", (S, IDS, IDS), {}, TypeError, "teacher_logprobs must be a float32"),
    ("renorm with reverse KL", (S, IDS, LOGPROBS), {"tail": "renorm", "divergence": "reverse_kl"}, ValueError,
     "tail='renorm' is defined for divergence='forward_kl' only"),
    ("raw with jsd", (S, IDS, LOGPROBS), {"tail": "raw", "divergence": "jsd"}, ValueError, "tail='raw'"),
    ("unknown tail", (S, IDS, LOGPROBS), {"tail": "rest"}, ValueError, "tail must be one of 'bucket'"),
    ("mean reduction", (S, IDS, LOGPROBS), {"reduction": "mean"}, ValueError, "reduction must be one of 'batchmean'"),
]


@pytest.mark.parametrize("description,args,kwargs,exception,pattern", REFUSALS, ids=[c[0] for c in REFUSALS])
def test_bad_input_is_named_before_any_kernel_runs(description, args, kwargs, exception, pattern):
    with pytest.raises(exception, match=pattern):
        kdfast.sparse_kd_loss(*args, **kwargs)


def test_ids_of_ignored_rows_are_checked_too():
    labels = torch.tensor([1, -100, 2, 3])
    ids = IDS.clone()
    ids[1, 0] = 99
    with pytest.raises(ValueError, match="found 99 in row 1"):
        kdfast.sparse_kd_loss(S, ids, LOGPROBS, labels=labels)



@pytest.mark.parametrize("bad_row", [0, 255, 256, 700])
def test_errors_name_the_row_of_the_call_whatever_block_checks_it(gen, bad_row):
    s = torch.randn(800, 20, generator=gen)
    ids, logprobs = kdfast.teacher_topk(torch.randn(800, 20, generator=gen), 4)
    ids[bad_row, 1] = ids[bad_row, 2]
    with pytest.raises(ValueError, match=f"teacher_ids repeats id {int(ids[bad_row, 1])} in row {bad_row}:"):
        kdfast.sparse_kd_loss(s, ids, logprobs)
    ids[bad_row, 1] = 20
    with pytest.raises(ValueError, match=f"found 20 in row {bad_row}$"):
        kdfast.sparse_kd_loss(s, ids, logprobs)

def test_bf16_log_probs_get_a_bf16_tolerance():
    ids = torch.tensor([[1, 2]] * 4)
    logprobs = torch.log(torch.tensor([[0.6, 0.402]] * 4)).bfloat16()  # 1.002 after bf16 rounding: fine
    assert torch.isfinite(kdfast.sparse_kd_loss(S, ids, logprobs))
    with pytest.raises(ValueError, match=r"tolerance 0.0001 for torch.float32"):
        kdfast.sparse_kd_loss(S, ids, torch.log(torch.tensor([[0.6, 0.41]] * 4)))
