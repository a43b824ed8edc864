"""kdfast with Hugging Face transformers models (random init from small configs) and its Trainer."""

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers_trainer import VOCAB, markov_tokens  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, TrainingArguments  # noqa: E402

import kdfast  # noqa: E402
from kdfast import LossOptions  # noqa: E402
from kdfast.data import TokenWindows  # noqa: E402
from kdfast.integrations.hf import KDTrainer  # noqa: E402
from kdfast.lm import choose_loss_path  # noqa: E402
from kdfast.trainer import DistillTrainer, TrainConfig  # noqa: E402

KD = LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
LENGTH = 24


def llama(width: int, layers: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=1))


def gpt2(width: int, layers: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=1))


def dataset(n: int, seed: int) -> list[dict]:
    tokens = markov_tokens(n * LENGTH, seed).view(n, LENGTH)
    return [{"input_ids": row} for row in tokens]


def expected_paths():
    return ("fused_linear" if hasattr(kdfast, "fused_linear_kd_loss") else "logits", "logits")


@pytest.mark.slow
@pytest.mark.parametrize("make", [llama, gpt2])
@pytest.mark.parametrize("loss_path", ["auto", "logits"])
def test_kd_trainer_lowers_the_loss(make, loss_path, tmp_path):
    torch.manual_seed(0)
    teacher, student = make(32, 2), make(16, 1)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=8, learning_rate=1e-2,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, train_dataset=dataset(96, seed=1),
                        loss_options={"temperature": 2.0, "hard_weight": 0.5, "soft_weight": 0.5},
                        loss_path=loss_path)
    assert trainer.kd.path == expected_paths()[loss_path == "logits"]
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 12 and {"kd", "hard"} <= logs[0].keys()
    assert sum(e["loss"] for e in logs[-3:]) < sum(e["loss"] for e in logs[:3])


@pytest.mark.parametrize("make", [llama, gpt2])
def test_kd_trainer_loss_is_kd_loss_on_shifted_logits_without_padding(make, tmp_path):
    torch.manual_seed(0)
    teacher, student = make(32, 2), make(16, 1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, loss_options=KD)
    student.eval()  # no dropout: the same forward twice
    input_ids = torch.randint(0, VOCAB, (3, LENGTH))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -5:] = 0  # right padding
    loss = trainer.compute_loss(student, {"input_ids": input_ids, "attention_mask": attention_mask})
    labels = input_ids.masked_fill(attention_mask == 0, -100)[:, 1:]
    expected = kdfast.kd_loss(student(input_ids, attention_mask=attention_mask).logits[:, :-1],
                              teacher(input_ids, attention_mask=attention_mask).logits[:, :-1].detach(),
                              labels=labels, temperature=2.0, hard_weight=0.5, soft_weight=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)


def test_hf_models_train_in_the_kdfast_trainer(tmp_path):
    torch.manual_seed(0)
    teacher, student = gpt2(32, 2), llama(16, 1)  # any pair of architectures with one vocabulary
    data = TokenWindows(markov_tokens(3000, seed=1), 16, seed=1)
    config = TrainConfig(out_dir=str(tmp_path), steps=4, batch_size=4, eval_windows=8, progress=False)
    summary = DistillTrainer(student, data, config, teacher=teacher, eval_data=data, loss=KD).train()
    assert summary["loss_path"] == expected_paths()[0]
    assert 0 <= summary["eval"]["agreement"] <= 1


def test_hf_vocabulary_mismatch_is_named():
    with pytest.raises(ValueError, match=f"the student's output has V={VOCAB}, the teacher's output has V={VOCAB + 8}"):
        choose_loss_path(llama(16, 1), llama(16, 1, vocab=VOCAB + 8), KD)
    assert choose_loss_path(llama(16, 1), llama(16, 1, vocab=VOCAB + 8), LossOptions(vocab_size=VOCAB)) in \
        expected_paths()


def test_logits_after_the_head_rule_out_the_fused_path():
    class Scaled(LlamaForCausalLM):  # like Cohere's logit_scale: logits change after the output embedding
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = 2.0 * out.logits
            return out

    capped = Scaled(llama(16, 1).config)
    assert choose_loss_path(capped, llama(16, 1), KD) == "logits"
    if hasattr(kdfast, "fused_linear_kd_loss"):
        with pytest.raises(ValueError, match="not its output embedding applied to its last hidden state"):
            choose_loss_path(capped, llama(16, 1), KD, "fused_linear")

