"""kdfast.distributed.vocab_parallel_kd_loss and vocab_parallel_sparse_kd_loss with 2 and 3 gloo
processes on the CPU.

Each world runs once (vocab_parallel_worker.py, one process per rank, uneven widths; with 3,
also the sub-group of ranks {0, 2}), with backend "auto" (the cpu backend's per-shard kernels,
the torch backend's for float64) and "triton" (in its interpreter; the cases' names carry
"triton-" after the prefix); every case's loss and every rank's gradient slice is checked there
against the float64 reference on the full logits (1e-5 relative in fp32; a bf16 student's
gradient may differ by three times what rounding the reference to bf16 costs, on top: to
nearest, or toward zero as Triton's interpreter rounds), and the tests here read the results:
per divergence, the edge cases, the same loss on every rank, and the collective calls counted in
forward and backward. The sparse loss's cases
("sparse-" after the prefix) are checked the same way against sparse_kd_loss_reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from helpers import make_labels, make_logits, rel_err, runnable_backends

from kdfast import distributed
from kdfast.backends.registry import backend
from kdfast.distributed import vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss
from kdfast.reference import kd_loss_reference

WORKER = Path(__file__).resolve().parent / "vocab_parallel_worker.py"
SEED = int(os.environ.get("KDFAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
SPARSE = "sparse-"  # the sparse loss's cases: prefix + SPARSE + name
DIVERGENCES = ["forward_kl-0.5", "reverse_kl-0.5", "jsd-0.5", "jsd-0.1", "jsd-0.0", "jsd-1.0", "tvd-0.5"]
BACKENDS = {"auto": "", "triton": "triton-"}  # the per-shard kernels' backend: its cases' part of the name
# (world size, case-name prefix, the group's global ranks)
GROUPS = [(2, "world-", (0, 1)), (3, "world-", (0, 1, 2)), (3, "subgroup-", (0, 2))]
GROUP_IDS = ["2-ranks", "3-ranks", "ranks-0-2-of-3"]


def _launch(world: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), str(world), str(out / "store"), str(out),
                               str(SEED)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=240)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    failed = [(rank, proc.returncode, text[-3000:]) for rank, (proc, text) in enumerate(zip(procs, outputs))
              if proc.returncode != 0]
    assert not failed, f"worker(s) failed (KDFAST_TEST_SEED={SEED}): {failed}"
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(world)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world size: [results of rank 0, 1, ...]}, each {case: {error, loss, forward_calls, backward_calls}}."""
    return {world: _launch(world, tmp_path_factory.mktemp(f"vocab_parallel_{world}")) for world in (2, 3)}


def _cases(runs, world, prefix, ranks, backend=None):
    """{(global rank, case): result} of the group's cases (of the dense loss on backend, when given)."""
    cases = {(rank, case): result for rank in ranks for case, result in runs[world][rank].items()
             if case.startswith(prefix)}
    if backend is None:
        return cases
    others = tuple(prefix + part for part in [*BACKENDS.values(), SPARSE] if part and part != BACKENDS[backend])
    return {key: result for key, result in cases.items()
            if key[1].startswith(prefix + BACKENDS[backend]) and not key[1].startswith(others)}


def _assert_no_errors(cases):
    errors = {f"rank {rank} {case}": result["error"] for (rank, case), result in cases.items() if result["error"]}
    assert not errors, f"KDFAST_TEST_SEED={SEED}: " + "\n".join(f"{k}: {v}" for k, v in errors.items())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_reduction_and_hard_labels_match_reference(runs, world, prefix, ranks, divergence, backend):
    """Every reduction, hard labels at T = 1.5 and 1 with ignored rows, no labels, a bf16 student."""
    named = prefix + BACKENDS[backend] + divergence
    cases = {key: r for key, r in _cases(runs, world, prefix, ranks, backend).items() if key[1].startswith(named)}
    assert len(cases) == 8 * len(ranks)
    _assert_no_errors(cases)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_edge_cases_match_reference(runs, world, prefix, ranks, backend):
    """Labels only on one rank's columns, all rows ignored (exactly 0), -inf padding (a teacher's
    columns; a whole slice of both), strided and flat rows, expected_grad_output,
    num_items_in_batch, inplace_backward, an empty slice, float64, a width mismatch on one rank
    that every rank reports, return_parts against kd_loss, and a NaN logit on one rank making its
    row NaN on every rank (float64: with "auto" only, which runs it on the torch backend)."""
    named = prefix + BACKENDS[backend]
    cases = {key: r for key, r in _cases(runs, world, prefix, ranks, backend).items()
             if not any(key[1].startswith(named + d) for d in DIVERGENCES)}
    names = {case[len(named):] for _, case in cases}
    assert {"labels-on-last-rank", "all-ignored-mean", "padded-last-rank-jsd", "teacher-padding-forward_kl", "strided",
            "inplace-backward", "empty-slice", "width-mismatch", "parts-and-kd-loss"} <= names
    assert ("float64" in names) == (backend == "auto")
    _assert_no_errors(cases)


@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_every_rank_returns_the_same_loss(runs, world, prefix, ranks):
    by_case = {}
    for (rank, case), result in _cases(runs, world, prefix, ranks).items():
        if "loss" in result and result["loss"]:
            by_case.setdefault(case, []).append(result["loss"])
    assert by_case
    different = [case for case, losses in by_case.items() if len(losses) != len(ranks) or
                 any(loss != losses[0] for loss in losses)]
    assert not different, different


def _expected_forward_calls(case: str) -> int:
    divergence, beta, variant = case.split("-", 2)
    # jsd at beta 0 / 1 is forward / reverse KL; tvd's sums need the global normalisers, as jsd's
    one_pass = divergence in ("forward_kl", "reverse_kl") or (divergence == "jsd" and beta in ("0.0", "1.0"))
    hard = variant.startswith("hard") or variant == "bf16"  # the bf16 cases have hard_weight > 0
    return 1 if one_pass and not hard else 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_collective_calls(runs, world, prefix, ranks, backend):
    """forward_kl and reverse_kl: 1 call in forward, 2 with hard labels; jsd and tvd: 2; none in backward."""
    counted = 0
    named = prefix + BACKENDS[backend]
    for (rank, case), result in _cases(runs, world, prefix, ranks, backend).items():
        name = case[len(named):]
        if not any(name.startswith(d) for d in DIVERGENCES):
            continue
        counted += 1
        assert result["forward_calls"] == ["all_gather_single"] * _expected_forward_calls(name), (rank, case)
        assert result["backward_calls"] == [], (rank, case)
    assert counted == len(DIVERGENCES) * 8 * len(ranks)


@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_sparse_matches_reference_in_two_collectives(runs, world, prefix, ranks):
    """vocab_parallel_sparse_kd_loss: forward_kl, reverse_kl and jsd (beta 0.5, 0.1) with the bucket
    tail at three reductions, with hard labels, and with ids covering the vocabulary; renorm and raw;
    ids only on the first rank's columns, labels only on the last's, all rows ignored, no labels,
    strided rows, num_items_in_batch, expected_grad_output, inplace_backward, an empty slice, a bf16
    and a float64 student; empty slots and an all-empty row throughout; return_parts against
    sparse_kd_loss, and a NaN logit on one rank making its row NaN on every rank. 2 collectives in
    forward, none in backward."""
    cases = _cases(runs, world, prefix + SPARSE, ranks)
    names = {case[len(prefix + SPARSE):] for _, case in cases}
    assert {f"{d}-{r}" for d in ("forward_kl-0.5", "reverse_kl-0.5", "jsd-0.5", "jsd-0.1")
            for r in ("batchmean", "sum", "none", "hard", "covering")} <= names
    assert {"renorm", "raw-hard-T1", "ids-on-first-rank", "labels-on-last-rank", "all-ignored", "strided",
            "inplace-backward", "empty-slice", "bf16", "float64", "parts-and-sparse-kd-loss"} <= names
    _assert_no_errors(cases)
    for (rank, case), result in cases.items():
        if case.endswith("parts-and-sparse-kd-loss"):  # several calls, no counts
            continue
        assert result["forward_calls"] == ["all_gather_single"] * 2, (rank, case)
        assert result["backward_calls"] == [], (rank, case)


def test_sparse_refuses_unsupported_options():
    s, ids, logprobs = torch.randn(2, 5), torch.tensor([[0, 1], [2, -1]]), torch.full((2, 2), -1.0)
    with pytest.raises(ValueError, match=r"vocab_parallel_sparse_kd_loss\(\) does not support softcap="):
        vocab_parallel_sparse_kd_loss(s, ids, logprobs, softcap=2.0)
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch'"):
        vocab_parallel_sparse_kd_loss(s, ids, logprobs, backend="cpu")
    with pytest.raises(ValueError, match="tail='raw' is defined for divergence='forward_kl' only"):
        vocab_parallel_sparse_kd_loss(s, ids, logprobs, tail="raw", divergence="jsd")
    with pytest.raises(ValueError, match="reduction"):
        vocab_parallel_sparse_kd_loss(s, ids, logprobs, reduction="mean")
    with pytest.raises(RuntimeError, match=r"vocab_parallel_sparse_kd_loss\(\) needs an initialised"):
        vocab_parallel_sparse_kd_loss(s, ids, logprobs)


def test_refuses_vocab_size_and_other_backends():
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match="does not take vocab_size"):
        vocab_parallel_kd_loss(s, t, vocab_size=5)
    # the CUDA extension has no per-shard kernels (where it is built; elsewhere it is unavailable)
    with pytest.raises((ValueError, RuntimeError), match="backend='cuda' (has no vocab_shard kernel|is unavailable)"):
        vocab_parallel_kd_loss(s, t, backend="cuda")
    with pytest.raises(TypeError, match="unexpected keyword argument 'temprature'; did you mean 'temperature'"):
        vocab_parallel_kd_loss(s, t, temprature=2.0)


def test_refuses_an_option_it_does_not_support_unless_at_its_default(monkeypatch):
    """Options added to LossOptions later are refused by name until supported here."""
    monkeypatch.setattr(distributed, "SUPPORTED_OPTIONS",
                        tuple(o for o in distributed.SUPPORTED_OPTIONS if o != "scale_t2"))
    s, t = torch.randn(2, 5), torch.randn(2, 5)
    with pytest.raises(ValueError, match=r"does not support scale_t2=False"):
        vocab_parallel_kd_loss(s, t, scale_t2=False)
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        vocab_parallel_kd_loss(s, t, scale_t2=True)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs an initialised torch.distributed process group"):
        vocab_parallel_kd_loss(torch.randn(2, 5), torch.randn(2, 5))


SHARD_PAIRS = [(name, device) for name, device in runnable_backends() if backend(name).vocab_shard is not None]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_a_group_of_one_is_kd_loss_on_each_backend_with_per_shard_kernels(device, tmp_path):
    """In this process, a group of one rank holding the whole vocabulary: every backend with per-shard
    kernels (and "auto": Triton on a GPU) against the float64 reference, each divergence with hard
    labels; on a GPU, GPT-2's unaligned vocabulary (50257) in bf16 with strided rows."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    shape, dtype = ((2, 64, 50257), torch.bfloat16) if device == "cuda" else ((2, 3, 301), torch.float32)
    s, t = make_logits(gen, (shape[0], shape[1] + 1, shape[2]))
    s, t = s.to(device=device, dtype=dtype)[:, :-1], t.to(device=device, dtype=dtype)[:, :-1]
    labels = make_labels(gen, shape[:2], shape[2], device=device)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", init_method=f"file://{tmp_path / 'store'}",
                            rank=0, world_size=1)
    try:
        for name in ["auto"] + [name for name, d in SHARD_PAIRS if d == device]:
            for divergence in ("forward_kl", "reverse_kl", "jsd", "tvd"):
                options = dict(labels=labels, temperature=2.0, divergence=divergence, beta=0.3, hard_weight=0.5)
                leaf = s.detach().clone().requires_grad_()
                loss = vocab_parallel_kd_loss(leaf, t, backend=name, **options)
                loss.backward()
                ref_leaf = s.detach().double().requires_grad_()
                ref = kd_loss_reference(ref_leaf, t, **options)
                ref.backward()
                tol = 2e-5 + (0 if dtype == torch.float32 else 3 * rel_err(ref_leaf.grad.to(dtype), ref_leaf.grad))
                assert rel_err(loss, ref) < 2e-5, (name, divergence)
                assert rel_err(leaf.grad, ref_leaf.grad) < tol, (name, divergence)
    finally:
        dist.destroy_process_group()
