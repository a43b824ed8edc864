"""kdfast.distributed.vocab_parallel_kd_loss and vocab_parallel_sparse_kd_loss with 2 and 3 gloo
processes on the CPU.

Each world runs once (vocab_parallel_worker.py, one process per rank, uneven widths; with 3,
also the sub-group of ranks {0, 2}); every case's loss and every rank's gradient slice is
checked there against the float64 reference on the full logits (1e-5 relative in fp32; a bf16
student's gradient may differ by three times what rounding the reference to bf16 costs, on
top), and the tests here read the results: per divergence, the edge cases, the same loss on
every rank, and the collective calls counted in forward and backward. The sparse loss's cases
("sparse-" after the prefix) are checked the same way against sparse_kd_loss_reference.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kdfast import distributed
from kdfast.distributed import vocab_parallel_kd_loss, vocab_parallel_sparse_kd_loss

WORKER = Path(__file__).resolve().parent / "vocab_parallel_worker.py"
SEED = int(os.environ.get("KDFAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))
SPARSE = "sparse-"  # the sparse loss's cases: prefix + SPARSE + name
DIVERGENCES = ["forward_kl-0.5", "reverse_kl-0.5", "jsd-0.5", "jsd-0.1", "jsd-0.0", "jsd-1.0"]
# (world size, case-name prefix, the group's global ranks)
GROUPS = [(2, "world-", (0, 1)), (3, "world-", (0, 1, 2)), (3, "subgroup-", (0, 2))]
GROUP_IDS = ["2-ranks", "3-ranks", "ranks-0-2-of-3"]


def _launch(world: int, out: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
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


def _cases(runs, world, prefix, ranks):
    """{(global rank, case): result} of the group's cases."""
    return {(rank, case): result for rank in ranks for case, result in runs[world][rank].items()
            if case.startswith(prefix)}


def _assert_no_errors(cases):
    errors = {f"rank {rank} {case}": result["error"] for (rank, case), result in cases.items() if result["error"]}
    assert not errors, f"KDFAST_TEST_SEED={SEED}: " + "\n".join(f"{k}: {v}" for k, v in errors.items())


@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_every_reduction_and_hard_labels_match_reference(runs, world, prefix, ranks, divergence):
    """Every reduction, hard labels at T = 1.5 and 1 with ignored rows, no labels, a bf16 student."""
    cases = {key: r for key, r in _cases(runs, world, prefix, ranks).items() if key[1].startswith(prefix + divergence)}
    assert len(cases) == 8 * len(ranks)
    _assert_no_errors(cases)


@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_edge_cases_match_reference(runs, world, prefix, ranks):
    """Labels only on one rank's columns, all rows ignored (exactly 0), -inf padding (a teacher's
    columns; a whole slice of both), strided and flat rows, expected_grad_output,
    num_items_in_batch, inplace_backward, an empty slice, float64, a width mismatch on one rank
    that every rank reports, return_parts against kd_loss, and a NaN logit on one rank making its
    row NaN on every rank."""
    cases = {key: r for key, r in _cases(runs, world, prefix, ranks).items()
             if not any(key[1].startswith(prefix + d) for d in DIVERGENCES + [SPARSE])}
    names = {case[len(prefix):] for _, case in cases}
    assert {"labels-on-last-rank", "all-ignored-mean", "padded-last-rank-jsd", "teacher-padding-forward_kl", "strided",
            "inplace-backward", "empty-slice", "width-mismatch", "float64", "parts-and-kd-loss"} <= names
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
    one_pass = divergence != "jsd" or beta in ("0.0", "1.0")  # jsd at beta 0 / 1 is forward / reverse KL
    hard = variant.startswith("hard") or variant == "bf16"  # the bf16 cases have hard_weight > 0
    return 1 if one_pass and not hard else 2


@pytest.mark.parametrize("world,prefix,ranks", GROUPS, ids=GROUP_IDS)
def test_collective_calls(runs, world, prefix, ranks):
    """forward_kl and reverse_kl: 1 call in forward, 2 with hard labels; jsd: 2; none in backward."""
    counted = 0
    for (rank, case), result in _cases(runs, world, prefix, ranks).items():
        name = case[len(prefix):]
        if not any(name.startswith(d) for d in DIVERGENCES):
            continue
        counted += 1
        assert result["forward_calls"] == ["all_gather_single"] * _expected_forward_calls(name), (rank, case)
        assert result["backward_calls"] == [], (rank, case)
    assert counted == 6 * 8 * len(ranks)


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
    with pytest.raises(ValueError, match="backend must be 'auto' or 'torch', got 'cpu'"):
        vocab_parallel_kd_loss(s, t, backend="cpu")
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
