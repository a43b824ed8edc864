"""kdfast inside TRL: GKDTrainer's loss against TRL's own, as a staticmethod and over training steps."""

import sys
from pathlib import Path

import pytest
import torch

trl = pytest.importorskip("trl", reason="TRL is not installed (pip install 'kdfast[trl]')")
pytest.importorskip("transformers")

from helpers_trainer import VOCAB, tiny_llama  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/ is not installed: from the checkout
from benchmarks.trl_step import word_tokenizer  # noqa: E402

import kdfast.integrations.trl as kdfast_trl  # noqa: E402
from trl.experimental.gkd import GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer  # noqa: E402

REDUCTIONS = ["batchmean", "sum", "mean", "none"]


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("with_labels,num_items", [(True, None), (False, None), (True, 7)])
def test_generalized_jsd_loss_equals_trl(gen, reduction, beta, with_labels, num_items):
    s = torch.randn(2, 5, 37, generator=gen, requires_grad=True)
    t = torch.randn(2, 5, 37, generator=gen)
    labels = torch.randint(0, 37, (2, 5), generator=gen) if with_labels else None
    if with_labels:
        labels[0, :2] = -100
    args = dict(labels=labels, beta=beta, temperature=2.0, reduction=reduction, num_items_in_batch=num_items)
    ours = kdfast_trl.GKDTrainer.generalized_jsd_loss(s, t, **args)
    (g_ours,) = torch.autograd.grad(ours.sum(), s)
    theirs = TRLGKDTrainer.generalized_jsd_loss(s, t, **args)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), s)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)


def dataset(n: int, seed: int):
    """Rows of prompt + completion token ids (GKDTrainer takes a datasets.Dataset)."""
    import datasets

    gen = torch.Generator().manual_seed(seed)
    return datasets.Dataset.from_dict({"ids": torch.randint(3, VOCAB, (n, 12), generator=gen).tolist()})


def collate(rows):
    ids = torch.tensor([row["ids"] for row in rows])
    labels = ids.clone()
    labels[:, :4] = -100  # the prompt is not learnt
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "prompts": ids[:, :4], "prompt_attention_mask": torch.ones_like(ids[:, :4])}


def run_steps(trainer_class, tmp_path, lmbda, steps, bf16=False, **kwargs):
    torch.manual_seed(0)
    student, teacher = tiny_llama(1), tiny_llama(2, width=32)
    args = GKDConfig(output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=2, learning_rate=1e-2,
                     logging_steps=1, report_to=[], save_strategy="no", lmbda=lmbda, beta=0.5, max_new_tokens=4,
                     use_cpu=True, seed=0, disable_dropout=True, bf16=bf16)
    trainer = trainer_class(model=student, teacher_model=teacher, args=args, train_dataset=dataset(8, seed=3),
                            data_collator=collate, processing_class=word_tokenizer(VOCAB), **kwargs)
    trainer.train()
    return trainer, [log["loss"] for log in trainer.state.log_history if "loss" in log]


@pytest.mark.parametrize("loss_path", ["fused_linear", "logits"])
def test_training_steps_match_trl(tmp_path, loss_path):
    ours, our_losses = run_steps(kdfast_trl.GKDTrainer, tmp_path / "ours", lmbda=0.0, steps=3, loss_path=loss_path)
    assert ours.distill_loss.path == loss_path
    _, their_losses = run_steps(TRLGKDTrainer, tmp_path / "trl", lmbda=0.0, steps=3)
    assert len(our_losses) == len(their_losses) == 3
    assert all(loss > 0 for loss in our_losses)
    torch.testing.assert_close(our_losses, their_losses, rtol=1e-4, atol=1e-6)


def test_on_policy_step_runs_in_mixed_precision(tmp_path):
    # accelerate computes the logits in bf16 autocast: still the output layer applied to the hidden states
    trainer, losses = run_steps(kdfast_trl.GKDTrainer, tmp_path, lmbda=1.0, steps=1, bf16=True)
    assert trainer.distill_loss.path == "fused_linear"
    assert len(losses) == 1 and losses[0] > 0 and losses[0] == losses[0]


def test_unknown_loss_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_path"):
        run_steps(kdfast_trl.GKDTrainer, tmp_path, lmbda=0.0, steps=1, loss_path="fused")

