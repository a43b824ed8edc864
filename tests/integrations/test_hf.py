"""kdfast with Hugging Face transformers models (random init from small configs) and its Trainer."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from helpers_trainer import VOCAB, markov_tokens  # noqa: E402
from hf_fsdp_worker import KD as FSDP_KD  # noqa: E402
from hf_fsdp_worker import models_and_batch  # noqa: E402
from transformers import (  # noqa: E402
    CohereConfig,
    CohereForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    GraniteConfig,
    GraniteForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    TrainingArguments,
)

import kdfast  # noqa: E402
from kdfast import LossOptions  # noqa: E402
from kdfast.train.data import TokenWindows  # noqa: E402
from kdfast.integrations.hf import KDTrainer  # noqa: E402
from kdfast.train.lm import choose_loss_path  # noqa: E402
from kdfast.train.trainer import DistillTrainer, TrainConfig  # noqa: E402

KD = LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
FSDP_WORKER = Path(__file__).resolve().parent / "hf_fsdp_worker.py"
LENGTH = 24


def llama(width: int, layers: int, vocab: int = VOCAB) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=width, intermediate_size=2 * width,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=1))


def gpt2(width: int, layers: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_embd=width, n_layer=layers, n_head=2, n_positions=64,
                                      bos_token_id=0, eos_token_id=1))


# Tiny models whose token 0 pads (a zero embedding, as in Gemma and Cohere checkpoints), with and without a
# transform of the logits after the output embedding.
TINY = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
ARCHITECTURES = {
    "llama": lambda: LlamaForCausalLM(LlamaConfig(**TINY)),
    "llama_tied": lambda: LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True)),
    "gpt2": lambda: GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=64,
                                               pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "gemma2": lambda: Gemma2ForCausalLM(Gemma2Config(**TINY, head_dim=8, final_logit_softcapping=3.0)),
    "cohere": lambda: CohereForCausalLM(CohereConfig(**TINY, logit_scale=0.0625)),
    "granite": lambda: GraniteForCausalLM(GraniteConfig(**TINY, logits_scaling=8.0)),
    "qwen2": lambda: Qwen2ForCausalLM(Qwen2Config(**TINY)),
}
TRANSFORMED = ("gemma2", "cohere", "granite")  # their logits are not lm_head(hidden states)


def tiny_with_big_logits(architecture: str, seed: int):
    """A tiny model in eval mode (no dropout) whose output embedding is scaled up until a soft cap or a scale of
    its logits matters."""
    torch.manual_seed(seed)
    model = ARCHITECTURES[architecture]()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(100.0)
    return model.eval()


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
    trainer.train()
    assert trainer.distill_loss.path == expected_paths()[loss_path == "logits"]
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


@pytest.mark.parametrize("architecture,student_architecture",
                         [(a, a) for a in ARCHITECTURES] + [("gemma2", "llama"), ("llama", "cohere")])
def test_kd_trainer_loss_is_kd_loss_on_the_models_own_logits(architecture, student_architecture, tmp_path):
    """Each family teaching itself, and a capped teacher for an uncapped student (and the reverse)."""
    teacher, student = tiny_with_big_logits(architecture, 0), tiny_with_big_logits(student_architecture, 1)
    input_ids = torch.randint(3, VOCAB, (2, LENGTH))
    teacher_logits = teacher(input_ids).logits.detach()
    if architecture in TRANSFORMED:  # the transform matters: the logits differ from lm_head(hidden states)
        out = teacher(input_ids, output_hidden_states=True)
        assert not torch.allclose(teacher.get_output_embeddings()(out.hidden_states[-1]), teacher_logits, rtol=0.1)
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, loss_options=KD)
    loss = trainer.compute_loss(student, {"input_ids": input_ids})
    expected = kdfast.kd_loss(student(input_ids).logits[:, :-1], teacher_logits[:, :-1], labels=input_ids[:, 1:],
                              temperature=2.0, hard_weight=0.5, soft_weight=0.5)
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-5)
    # A soft cap or scale in the config is applied by the fused kernels (softcap / logit_scale).
    assert trainer.distill_loss.path == expected_paths()[0]


def test_a_config_transform_the_kernels_do_not_apply_is_named_when_fused_linear_is_asked_for():
    model = LlamaForCausalLM(LlamaConfig(**TINY, logits_mup_width_multiplier=2.0))
    expected = ("the student: its config sets logits_mup_width_multiplier=2.0, which transforms the logits after the "
                "output embedding in a way the fused-linear kernels do not apply")
    with pytest.raises(ValueError, match=expected):
        choose_loss_path(model, ARCHITECTURES["llama"](), KD, "fused_linear")
    assert choose_loss_path(model, ARCHITECTURES["llama"](), KD) == "logits"


def test_the_trainer_refuses_softcap_in_its_loss_options():
    with pytest.raises(ValueError, match="softcap=.* cannot be given to the trainer: it reads each model's soft cap"):
        choose_loss_path(ARCHITECTURES["gemma2"](), ARCHITECTURES["gemma2"](), LossOptions(softcap=30.0))


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """The two gloo processes of hf_fsdp_worker.py: their results, one per rank."""
    out_dir = tmp_path_factory.mktemp("hf_fsdp")
    env = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(FSDP_WORKER), str(out_dir)], check=True, env=env, timeout=120)
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(2)]


@pytest.mark.slow
def test_kd_trainer_chooses_its_path_on_the_model_fsdp_sharded_after_it_was_built(fsdp_run):
    teacher, student, input_ids = models_and_batch()  # one process, nothing sharded
    labels = input_ids[:, 1:]
    single = kdfast.kd_loss(student(input_ids).logits[:, :-1], teacher(input_ids).logits[:, :-1].detach(),
                            labels=labels, **FSDP_KD)
    single.backward()  # the workers' step: SGD, each rank's gradient that of the same batch
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    with torch.no_grad():
        single_after = kdfast.kd_loss(student(input_ids).logits[:, :-1], teacher(input_ids).logits[:, :-1],
                                      labels=labels, **FSDP_KD)
    for result in fsdp_run:
        assert result["path"] == "logits"
        assert result["loss"] == pytest.approx(result["expected"], rel=1e-5)
        assert result["loss"] == pytest.approx(single.item(), rel=1e-5)
        assert result["after"] == pytest.approx(single_after.item(), rel=1e-5)
        assert result["after"] < result["loss"]  # it trains


@pytest.mark.slow
def test_kd_trainer_shards_the_teacher_as_the_fsdp_sharded_student(fsdp_run):
    teacher = models_and_batch()[0]
    whole = sum(p.numel() * p.element_size() for p in teacher.parameters())
    names = {name for name, _ in teacher.named_parameters()}
    for rank, result in enumerate(fsdp_run):
        state = result["teacher"]
        assert state["whole_bytes"] == whole  # KDTrainer left it whole until the first step
        assert state["sharded_bytes"] == pytest.approx(whole / 2, rel=0.02)
        assert state["resharded"] and state["resharded_after_step"]  # only shards held between steps
        assert not state["training"]
        assert set(state["parameters"]) == names
        for name, p in state["parameters"].items():
            assert p["dtensor"] and p["students_mesh"] and not p["requires_grad"], name
            assert p["placements"] == ["Shard(dim=0)"], name
            # torch.chunk's rows: the first rank ceil(rows / 2), the second the rest
            half = -(-p["rows"] // 2)
            assert p["local_rows"] == (half if rank == 0 else p["rows"] - half), name
    assert sum(result["teacher"]["sharded_bytes"] for result in fsdp_run) == whole


def test_kd_trainer_moves_a_whole_teacher_to_the_device_without_fsdp(tmp_path):
    from torch.distributed.tensor import DTensor

    teacher, student, _ = models_and_batch()
    shapes = {name: p.shape for name, p in teacher.named_parameters()}
    trainer = KDTrainer(model=student, teacher_model=teacher.train(), loss_options=FSDP_KD,
                        args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))
    assert not trainer.is_fsdp_enabled
    assert trainer.teacher_model is teacher and not teacher.training
    for name, p in teacher.named_parameters():
        assert not isinstance(p, DTensor) and p.shape == shapes[name] and not p.requires_grad, name
        assert p.device == trainer.args.device, name


def test_hf_models_train_in_the_kdfast_trainer(tmp_path):
    torch.manual_seed(0)
    teacher, student = gpt2(32, 2), llama(16, 1)  # any pair of architectures with one vocabulary
    data = TokenWindows(markov_tokens(3000, seed=1), 16, seed=1)
    config = TrainConfig(out_dir=str(tmp_path), steps=4, batch_size=4, eval_windows=8, progress=False)
    summary = DistillTrainer(student, data, config, teacher=teacher, eval_data=data, loss_options=KD).train()
    assert summary["loss_path"] == expected_paths()[0]
    assert 0 <= summary["eval"]["agreement"] <= 1


def test_hf_vocabulary_mismatch_is_named():
    with pytest.raises(ValueError, match=f"the student's output has V={VOCAB}, the teacher's output has V={VOCAB + 8}"):
        choose_loss_path(llama(16, 1), llama(16, 1, vocab=VOCAB + 8), KD)
    assert choose_loss_path(llama(16, 1), llama(16, 1, vocab=VOCAB + 8), LossOptions(vocab_size=VOCAB)) in \
        expected_paths()


def test_the_probe_finds_logits_changed_after_the_head_by_an_unknown_config():
    class Scaled(LlamaForCausalLM):  # a scale no config attribute names: only the probe can see it
        def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
            out = super().forward(input_ids, logits_to_keep=logits_to_keep, **kwargs)
            out.logits = 0.5 * out.logits
            return out

    scaled = Scaled(LlamaConfig(**TINY))  # token 0 pads: a probe of zeros would see zero logits on both routes
    assert choose_loss_path(scaled, ARCHITECTURES["llama"](), KD) == "logits"
    with pytest.raises(ValueError, match="its logits are not its output embedding applied to its last hidden state"):
        choose_loss_path(scaled, ARCHITECTURES["llama"](), KD, "fused_linear")


def test_the_probe_refuses_logits_it_cannot_check():
    blank = ARCHITECTURES["llama"]()
    with torch.no_grad():
        blank.get_output_embeddings().weight.zero_()  # every logit 0: any transform of them would pass
    assert choose_loss_path(blank, ARCHITECTURES["llama"](), KD) == "logits"
    with pytest.raises(ValueError, match="logits on the probe tokens are all equal"):
        choose_loss_path(ARCHITECTURES["llama"](), blank, KD, "fused_linear")



@pytest.mark.parametrize("architecture", [*ARCHITECTURES, "kdfast-gpt"])
def test_the_fused_path_captures_only_the_final_hidden_state(architecture):
    """run_for_hidden hooks the module that returns the final hidden state instead of asking for every layer's
    (output_hidden_states keeps them all until the forward returns): the same tensor, without them."""
    from kdfast.train.lm import run_for_hidden
    from kdfast.train.models import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, context=64)) if architecture == "kdfast-gpt" else ARCHITECTURES[architecture]()
    model.eval()
    input_ids = torch.randint(3, VOCAB, (2, 12))
    expected = model(input_ids, output_hidden_states=True).hidden_states[-1]
    asked = []
    model.register_forward_pre_hook(lambda _m, args, kwargs: asked.append(kwargs.get("output_hidden_states")),
                                    with_kwargs=True)
    hidden = run_for_hidden(model, input_ids, None)
    assert asked == [None] and torch.equal(hidden, expected)
