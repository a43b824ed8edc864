"""Exact normalisation over the counted targets of an optimizer step (issue 17 item 3): on masked data whose
micro-batches and processes count very different numbers of targets, DistillTrainer's gradient accumulation
and DDP give the gradient of the one big batch, and the logged loss is the mean over the step's counted
targets; MaskedWindows, the masked data source."""

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers_trainer import CONTEXT, make_pair, markov_tokens
from token_worker import KD, TEACHERS, masked_windows, one_step

import kdfast
from kdfast.train.data import MaskedWindows, TokenWindows
from kdfast.train.lm import LMDistillLoss
from kdfast.train.trainer import DistillTrainer, TrainConfig

WORKER = Path(__file__).with_name("token_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent), "OMP_NUM_THREADS": "1"}


def counted(targets: torch.Tensor) -> int:
    return int(targets.ne(KD.ignore_index).sum())


def assert_same_step(got: dict, want: dict) -> None:
    """The same gradient, weights after the step and logged loss parts, to fp32 rounding."""
    assert got["grads"].keys() == want["grads"].keys() and want["grads"]
    for name in want["grads"]:
        torch.testing.assert_close(got["grads"][name], want["grads"][name], rtol=1e-5, atol=1e-7)
    for name in want["weights"]:
        torch.testing.assert_close(got["weights"][name], want["weights"][name], rtol=1e-5, atol=1e-7)
    for part in ("loss", "kd", "hard"):
        assert got["record"][part] == pytest.approx(want["record"][part], rel=1e-5)


# --- the data ---

def test_masked_windows_mask_the_targets_that_do_not_count():
    data = MaskedWindows.from_pairs([([1, 2, 3], [4, 5]), ([6], [7, 8, 9])], context=3)
    assert data.tokens.tolist() == list(range(1, 10))
    inputs, targets = data.rows(torch.tensor([0, 1]))
    assert inputs.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert targets.tolist() == [[-100, -100, 4], [5, -100, 7]]  # the prompts 2, 3 and 6 are not learnt
    plain = TokenWindows(data.tokens, 3, seed=5)
    masked = MaskedWindows(data.tokens, data.counted, 3, seed=5, ignore_index=-1)
    assert torch.equal(masked.batch(1, 1)[0], plain.batch(1, 1)[0]) and masked.sha256() == plain.sha256()
    assert masked.batch(0, 2)[1].min() == -1
    with pytest.raises(ValueError, match="counted must be a bool tensor"):
        MaskedWindows(data.tokens, data.counted[1:], 3)


def test_data_that_marks_uncounted_targets_otherwise_than_the_loss_is_refused(tmp_path):
    tokens = markov_tokens(CONTEXT * 4 + 1, seed=1)
    data = MaskedWindows(tokens, torch.ones_like(tokens, dtype=torch.bool), CONTEXT, ignore_index=-1)
    teacher, student = make_pair(seed=0)
    with pytest.raises(ValueError, match="with -1, the loss's ignore_index is -100"):
        DistillTrainer(student, data, TrainConfig(out_dir=str(tmp_path)), teacher=teacher, loss_options=KD)


# --- one process ---

@pytest.mark.parametrize("teacher_kind, seeds, counts", [
    *(pytest.param(kind, (1, 1), [1, 23, 29], id=kind) for kind in TEACHERS),
    *(pytest.param(kind, (0, 4), [6, 0, 0], id=f"{kind}-empty-micro-batches") for kind in ("fused_linear", "plain"))])
def test_accumulated_micro_batches_give_the_step_of_the_one_big_batch(tmp_path, teacher_kind, seeds, counts):
    data = masked_windows(seeds)
    assert [counted(data.batch(i, 2)[1]) for i in range(3)] == counts  # very different micro-batches
    big = one_step(tmp_path / "big", 6, 1, teacher_kind, seeds)
    accumulated = one_step(tmp_path / "accumulated", 2, 3, teacher_kind, seeds)
    assert accumulated["path"] == ("logits" if teacher_kind in ("logits", "plain") else "fused_linear")
    assert_same_step(accumulated, big)
    assert set(accumulated["scales"]) == ({1.0} if teacher_kind != "plain" else set())  # no pass in backward


def test_the_logged_loss_is_the_mean_over_the_steps_counted_targets(tmp_path):
    data = masked_windows()
    teacher, student = make_pair(seed=0)  # the weights one_step starts from
    summed = LMDistillLoss(replace(KD, reduction="sum"), "logits")
    averaged = LMDistillLoss(KD, "logits")
    with torch.no_grad():
        sums = torch.stack([torch.stack(summed(student, teacher, *data.batch(i, 2))) for i in range(3)])
        means = torch.stack([torch.stack(averaged(student, teacher, *data.batch(i, 2))) for i in range(3)])
    tokens = sum(counted(data.batch(i, 2)[1]) for i in range(3))
    expected = (sums.sum(0) / tokens).tolist()
    logged = one_step(tmp_path, 2, 3, "logits")["record"]
    assert [logged["loss"], logged["kd"], logged["hard"]] == pytest.approx(expected, rel=1e-5)
    # The mean of the micro-batches' means, as the trainer logged before, is told apart: at initialisation the
    # micro-batches' means are close, but it is off by more than 5 times the tolerance above.
    biased = means.mean(0).tolist()
    assert all(abs(b - e) > 5e-5 * e for b, e in zip(biased, expected))


def test_reduction_sum_averages_the_micro_batches_sums(tmp_path):
    teacher, student = make_pair(seed=0)
    summed = replace(KD, reduction="sum")
    trainer = DistillTrainer(student, masked_windows(), TrainConfig(out_dir=str(tmp_path), grad_accum=4),
                             teacher=teacher, loss_options=summed)
    assert (trainer.grad_scale, trainer.distill_loss.loss_options.expected_grad_output) == (0.25, 0.25)
    assert trainer.distill_loss.loss_options == replace(summed, expected_grad_output=0.25)


# --- two processes ---

@pytest.mark.slow
def test_two_processes_counting_different_targets_take_the_step_of_one_with_the_global_batch(tmp_path):
    seeds = (0, 4)
    data = masked_windows(seeds)
    per_rank = [[counted(data.batch(micro, 2, rank, 2)[1]) for micro in range(2)] for rank in range(2)]
    assert per_rank == [[6, 0], [0, 16]]  # 6 and 16 targets, and a micro-batch of none on each rank
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(tmp_path / "ddp"), "--batch-size", "2", "--grad-accum", "2",
                    "--seeds", *map(str, seeds)], check=True, env=ENV, timeout=300)
    ranks = [torch.load(tmp_path / "ddp" / f"rank{rank}.pt") for rank in range(2)]
    single = one_step(tmp_path / "single", 8, 1, "fused_linear", seeds)
    assert ranks[0]["path"] == "fused_linear"
    for name, grad in ranks[0]["grads"].items():
        assert torch.equal(grad, ranks[1]["grads"][name])
    assert_same_step(ranks[0], single)
    # backward received the expected_grad_output the trainer gave the losses (the world size): no pass over it
    assert all(set(rank["scales"]) == {1.0} for rank in ranks)
