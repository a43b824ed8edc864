"""KDTrainer from a teacher cache (TeacherCacheCollator), its refusals, and gradient accumulation averaging over
the tokens of the optimizer step (num_items_in_batch) on both paths."""

import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers_trainer import CONTEXT, markov_tokens, tiny_llama  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import kdfast  # noqa: E402
from kdfast.integrations.hf import KDTrainer, TeacherCacheCollator, WindowExamples  # noqa: E402
from kdfast.train.data import TokenWindows  # noqa: E402
from kdfast.train.teacher_cache import TeacherCache, capture_teacher  # noqa: E402

KD = dict(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
K = 6


class Recording(KDTrainer):
    """Records each training micro-batch's loss, inputs, targets and num_items_in_batch."""

    record: list

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if model.training:
            self.record.append({"loss": loss.item(), "input_ids": inputs["input_ids"].cpu(),
                                "targets": self._targets(inputs).cpu(), "num_items": num_items_in_batch})
        return loss


def sgd_args(tmp_path, **overrides) -> TrainingArguments:
    """Plain SGD at a constant rate, no clipping: an update is -lr times the gradient of the loss."""
    settings = dict(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=4, learning_rate=0.5,
                    optim="sgd", lr_scheduler_type="constant", max_grad_norm=0.0, weight_decay=0.0, logging_steps=1,
                    report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=3)
    return TrainingArguments(**{**settings, **overrides})


def recording(**kwargs) -> Recording:
    trainer = Recording(**kwargs)
    trainer.record = []
    return trainer


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """(teacher, windows, cache): a tiny Llama's top-K at T = 2 on 12 windows, log-probs in fp32."""
    teacher = tiny_llama(seed=0, width=32).eval()
    windows = TokenWindows(markov_tokens(CONTEXT * 12 + 1, seed=5), CONTEXT)
    directory = tmp_path_factory.mktemp("cache")
    capture_teacher(teacher, windows, directory, k=K, temperature=2.0, dtype="fp32", progress=False,
                    log=lambda _: None)
    return teacher, windows, TeacherCache(directory)


def window_of(windows: TokenWindows, row: torch.Tensor) -> int:
    inputs = windows.rows(torch.arange(windows.n_windows))[0]
    (match,) = (inputs == row).all(-1).nonzero().flatten().tolist()
    return match


@pytest.mark.parametrize("loss_path", ["logits", "fused_linear"])
def test_kd_trainer_from_a_cache_equals_sparse_kd_loss_on_the_live_teachers_topk(cached, loss_path, tmp_path):
    teacher, windows, cache = cached
    student = tiny_llama(seed=1)
    reference = copy.deepcopy(student)
    trainer = recording(model=student, args=sgd_args(tmp_path), train_dataset=WindowExamples(windows),
                        data_collator=TeacherCacheCollator(cache, windows), loss_options=KD, loss_path=loss_path)
    trainer.train()
    assert trainer.distill_loss.path == loss_path and trainer.distill_loss.tail == "bucket"
    assert len(trainer.record) == 3
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.5)
    for step in trainer.record:
        inputs = step["input_ids"]
        # The batch is the windows named, with their targets: position t predicts token t + 1, the last position
        # the token after the window (as the cache is aligned).
        expected_targets = windows.rows(torch.tensor([window_of(windows, row) for row in inputs]))[1]
        assert torch.equal(step["targets"], expected_targets)
        assert int(step["num_items"]) == inputs.numel()
        with torch.no_grad():
            ids, logprobs = kdfast.teacher_topk(teacher(inputs).logits, K, 2.0)
        loss = kdfast.sparse_kd_loss(reference(inputs).logits, ids, logprobs, labels=expected_targets, **KD)
        assert step["loss"] == pytest.approx(loss.item(), rel=1e-5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for (name, got), expected in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3 and logs[0]["kd"] > 0 and logs[0]["hard"] > 0
    assert 0 < trainer.evaluate(WindowExamples(windows))["eval_loss"] < 20  # evaluation reads the cache too


def test_a_data_set_of_other_sequences_is_refused(cached):
    _, windows, cache = cached
    other = TokenWindows(markov_tokens(CONTEXT * 12 + 1, seed=6), CONTEXT)
    with pytest.raises(ValueError, match="does not match this run:\n  data_sha256: '[0-9a-f]+' .cache. vs"):
        TeacherCacheCollator(cache, other)
    collator = TeacherCacheCollator(cache, windows)
    examples = WindowExamples(windows)
    batch = collator([examples[4], examples[0]])
    assert batch["teacher_ids"].shape == (2, CONTEXT, K) and torch.equal(batch["teacher_ids"], cache.lookup([4, 0])[0])
    assert torch.equal(batch["labels"][:, 1:], batch["shift_labels"][:, :-1]) and (batch["labels"][:, 0] == -100).all()
    swapped = {**examples[4], "sequence_index": 5}  # window 4's tokens under window 5's teacher
    with pytest.raises(ValueError, match="sequence_index 5 has input_ids .* other than the teacher cache's "
                                         "sequence 5 .*: the data set is not the cache's sequences"):
        collator([examples[0], swapped])
    longer = {"input_ids": torch.cat([examples[2]["input_ids"], torch.tensor([1])]), "sequence_index": 2}
    with pytest.raises(ValueError, match=r"shape \(17,\)\) other than"):
        collator([longer])
    with pytest.raises(ValueError, match="lacks 'sequence_index'"):
        collator([{"input_ids": examples[1]["input_ids"]}])
    with pytest.raises(ValueError, match="sequence_index 12 is not a sequence of the teacher cache, which holds 12"):
        collator([{"input_ids": examples[1]["input_ids"], "sequence_index": 12}])


def test_missing_or_doubled_teacher_data_is_refused_naming_the_keys(cached, tmp_path):
    teacher, windows, cache = cached
    args = sgd_args(tmp_path)
    with pytest.raises(ValueError, match="KDTrainer needs one teacher: teacher_model=..., or .* teacher_ids / "
                                         "teacher_logprobs from a teacher cache"):
        KDTrainer(model=tiny_llama(seed=1), args=args, loss_options=KD)
    with pytest.raises(ValueError, match="given a teacher_model and a teacher cache"):
        KDTrainer(model=tiny_llama(seed=1), teacher_model=teacher, args=args,
                  data_collator=TeacherCacheCollator(cache, windows), loss_options=KD)
    with pytest.raises(ValueError, match="temperature: 2.0 .cache. vs 1.0 .now."):
        KDTrainer(model=tiny_llama(seed=1), args=args, teacher_cache=cache, loss_options={"temperature": 1.0})
    batch = TeacherCacheCollator(cache, windows)([WindowExamples(windows)[0]])
    student = tiny_llama(seed=1)
    from_cache = KDTrainer(model=student, args=args, teacher_cache=cache, loss_options=KD)
    plain = {"input_ids": batch["input_ids"]}
    with pytest.raises(ValueError, match="no teacher_model, so every batch must carry teacher_ids and "
                                         r"teacher_logprobs .*; this one has \['input_ids'\]"):
        from_cache.compute_loss(student, plain)
    with pytest.raises(ValueError, match="this one has .'input_ids', 'teacher_ids'."):
        from_cache.compute_loss(student, {**plain, "teacher_ids": batch["teacher_ids"]})
    live = KDTrainer(model=student, teacher_model=teacher, args=args, loss_options=KD)
    with pytest.raises(ValueError, match="the batch carries teacher_ids and teacher_logprobs but KDTrainer has a "
                                         "teacher_model"):
        live.compute_loss(student, batch)


def padded_examples(n: int) -> list[dict]:
    """n sequences right-padded to different lengths (labels -100 and attention 0 on the padding)."""
    tokens = markov_tokens(n * 20, seed=2).view(n, 20)
    examples = []
    for i, row in enumerate(tokens):
        mask = torch.ones_like(row)
        mask[20 - 5 * i:] = 0  # 20, 15, 10, 5 real tokens
        examples.append({"input_ids": row, "attention_mask": mask, "labels": row.masked_fill(mask == 0, -100)})
    return examples


def test_gradient_accumulation_averages_over_the_optimizer_steps_tokens(tmp_path):
    """Two micro-batches of 2 padded sequences make one step whose loss and update are those of the
    token-weighted mean over the 4 sequences (the mean of the micro-batches' means would weigh the short ones
    more)."""
    teacher, student = tiny_llama(seed=0, width=32).eval(), tiny_llama(seed=1)
    reference = copy.deepcopy(student)
    examples = padded_examples(4)
    trainer = recording(model=student, teacher_model=teacher, train_dataset=examples, loss_options=KD,
                        args=sgd_args(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                      gradient_accumulation_steps=2))
    trainer.train()
    counted = sum(int(e["labels"][1:].ne(-100).sum()) for e in examples)  # 19 + 14 + 9 + 4
    assert [int(step["num_items"]) for step in trainer.record] == [counted, counted]
    input_ids, mask, labels = (torch.stack([e[key] for e in examples]) for key in ("input_ids", "attention_mask",
                                                                                   "labels"))
    with torch.no_grad():
        teacher_logits = teacher(input_ids, attention_mask=mask).logits[:, :-1]
    whole = kdfast.kd_loss(reference(input_ids, attention_mask=mask).logits[:, :-1], teacher_logits,
                           labels=labels[:, 1:], **KD)
    assert sum(step["loss"] for step in trainer.record) == pytest.approx(whole.item(), rel=1e-5)
    means = [kdfast.kd_loss(reference(input_ids[p], attention_mask=mask[p]).logits[:, :-1], teacher_logits[p],
                            labels=labels[p, 1:], **KD).item()
             for p in (torch.tensor([0, 1]), torch.tensor([2, 3]))]
    assert abs(sum(means) / 2 - whole.item()) > 1e-3  # the normalisation matters for this data
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(whole.item(), abs=1e-4)  # the Trainer rounds to 4 decimals
    whole.backward()
    with torch.no_grad():
        for (name, got), (_, start) in zip(student.named_parameters(), reference.named_parameters()):
            torch.testing.assert_close(got, start - 0.5 * start.grad, atol=1e-6, rtol=1e-4, msg=name)


def test_gradient_accumulation_from_a_cache_passes_the_steps_count(cached, tmp_path):
    _, windows, cache = cached
    trainer = recording(model=tiny_llama(seed=1), args=sgd_args(tmp_path, max_steps=1, per_device_train_batch_size=2,
                                                                  gradient_accumulation_steps=3),
                        train_dataset=WindowExamples(windows), data_collator=TeacherCacheCollator(cache, windows),
                        loss_options=KD)
    trainer.train()
    assert [int(step["num_items"]) for step in trainer.record] == [6 * CONTEXT] * 3
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[0]["loss"] == pytest.approx(sum(step["loss"] for step in trainer.record), abs=1e-4)
