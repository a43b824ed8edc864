"""The kdfast command: distill from YAML / TOML configs, the demo end to end, and its error messages."""

import importlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers_trainer import CONTEXT, make_pair, markov_tokens

from kdfast.train.cli import main
from kdfast.train.config import apply_overrides, build, load_config, load_weights, require, save_weights
from kdfast.train.data import save_tokens
from kdfast.train.models import GPT, GPTConfig
from kdfast.train.trainer import TrainConfig

REPO = Path(__file__).resolve().parents[2]

DISTILL_YAML = """\
data: {{train_tokens: {dir}/train.npy, eval_tokens: {dir}/eval.npy, vocab_size: 48, context: {context}}}
teacher: {{gpt: {{n_layer: 2, n_head: 2, d_model: 32, context: {context}}}, weights: {dir}/teacher.safetensors}}
student: {{gpt: {{n_layer: 1, n_head: 2, d_model: 16, context: {context}}}}}
train: {{out_dir: {out}, steps: 4, batch_size: 4, warmup_steps: 1, eval_windows: 8, progress: false}}
loss: {{temperature: 2.0, hard_weight: 0.5, soft_weight: 0.5}}
"""

DISTILL_TOML = """\
[data]
train_tokens = "{dir}/train.npy"
eval_tokens = "{dir}/eval.npy"
vocab_size = 48
context = {context}

[teacher]
gpt = {{ n_layer = 2, n_head = 2, d_model = 32, context = {context} }}
weights = "{dir}/teacher.safetensors"

[student]
gpt = {{ n_layer = 1, n_head = 2, d_model = 16, context = {context} }}

[train]
out_dir = "{out}"
steps = 4
batch_size = 4
warmup_steps = 1
eval_windows = 8
progress = false

[loss]
temperature = 2.0
hard_weight = 0.5
soft_weight = 0.5
"""


@pytest.fixture
def distill_inputs(tmp_path):
    save_tokens(markov_tokens(2000, seed=1), tmp_path / "train.npy")
    save_tokens(markov_tokens(500, seed=2), tmp_path / "eval.npy")
    teacher, _ = make_pair(seed=0)
    save_weights(teacher, tmp_path / "teacher.safetensors")
    return tmp_path


def test_help_lists_the_commands():
    done = subprocess.run([sys.executable, "-m", "kdfast", "--help"], capture_output=True, text=True, check=True,
                          cwd=REPO)
    assert "distill" in done.stdout and "demo" in done.stdout


def test_distill_help_shows_an_example_config(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["distill", "--help"])
    assert exit_info.value.code == 0
    assert "example config" in capsys.readouterr().out


def test_the_example_config_in_the_help_runs(tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    printed = capsys.readouterr().out.split("example config")[1].split("\n\n")[1]  # the indented block after it
    (tmp_path / "distill.yaml").write_text(textwrap.dedent(printed))
    monkeypatch.chdir(tmp_path)  # its paths are relative
    config = load_config("distill.yaml")
    data, vocab = config["data"], config["data"]["vocab_size"]
    Path(data["train_tokens"]).parent.mkdir(parents=True, exist_ok=True)
    save_tokens(markov_tokens(8000, seed=1, vocab=vocab), data["train_tokens"])
    save_tokens(markov_tokens(2000, seed=2, vocab=vocab), data["eval_tokens"])
    transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2)).save_pretrained(config["teacher"]["hf"])
    assert main(["distill", "--config", "distill.yaml", "--set", "train.steps=2", "--set", "train.progress=false"]) == 0
    assert json.loads((Path(config["train"]["out_dir"]) / "summary.json").read_text())["steps"] == 2


def test_numbers_are_numbers_in_files_and_in_set_and_bad_ones_are_named(tmp_path, distill_inputs, capsys):
    (tmp_path / "c.yaml").write_text("train: {lr: 1e-3, steps: 2E+1, betas: [0.9, '0.99'], min_lr_ratio: '1e-2'}\n")
    config = apply_overrides(load_config(tmp_path / "c.yaml"), ["train.weight_decay=1e-2", "train.warmup_steps=1e1"])
    train = build(TrainConfig, config["train"], "train")
    assert (train.lr, train.steps, train.betas, train.min_lr_ratio) == (1e-3, 20, (0.9, 0.99), 1e-2)
    assert (train.weight_decay, train.warmup_steps) == (1e-2, 10) and isinstance(train.warmup_steps, int)
    path = distill_inputs / "config.yaml"
    path.write_text(DISTILL_YAML.format(dir=distill_inputs, out=distill_inputs / "out", context=CONTEXT))
    assert main(["distill", "--config", str(path), "--set", "train.lr=1e-3", "--set", "train.steps=1"]) == 0
    for item, message in (("train.lr=abc", "train.lr must be a number, got 'abc'"),
                          ("train.steps=2.5", "train.steps must be an integer, got 2.5"),
                          ("train.resume=maybe", "train.resume must be true or false, got 'maybe'"),
                          ("train.betas=[0.9]", "train.betas must be a list of 2, got [0.9]"),
                          ("student.gpt.n_layer=two", "student.gpt.n_layer must be an integer, got 'two'")):
        assert main(["distill", "--config", str(path), "--set", item]) == 2
        assert message in capsys.readouterr().err


def test_distill_from_yaml_and_toml_gives_the_same_student(distill_inputs):
    students = []
    for name, template in (("yaml", DISTILL_YAML), ("toml", DISTILL_TOML)):
        path = distill_inputs / f"config.{name}"
        path.write_text(template.format(dir=distill_inputs, out=distill_inputs / name, context=CONTEXT))
        assert main(["distill", "--config", str(path)]) == 0
        student = GPT(GPTConfig(48, CONTEXT, n_layer=1, n_head=2, d_model=16))
        load_weights(student, distill_inputs / name / "student.safetensors")
        students.append(student.state_dict())
    assert all(torch.equal(students[0][k], students[1][k]) for k in students[0])


def test_set_overrides_entries_and_unknown_keys_are_named(distill_inputs, capsys):
    path = distill_inputs / "config.yaml"
    path.write_text(DISTILL_YAML.format(dir=distill_inputs, out=distill_inputs / "out", context=CONTEXT))
    assert main(["distill", "--config", str(path), "--set", "train.steps=2"]) == 0
    assert '"steps": 2' in capsys.readouterr().out
    assert main(["distill", "--config", str(path), "--set", "train.stepz=3"]) == 2
    assert "unknown key(s) stepz in 'train'" in capsys.readouterr().err
    assert main(["distill", "--config", str(distill_inputs / "missing.yaml")]) == 2
    assert "missing.yaml not found" in capsys.readouterr().err


def test_a_student_with_another_vocabulary_is_refused(distill_inputs, capsys):
    path = distill_inputs / "config.yaml"
    path.write_text(DISTILL_YAML.format(dir=distill_inputs, out=distill_inputs / "out", context=CONTEXT))
    assert main(["distill", "--config", str(path), "--set", "student.gpt.vocab_size=64"]) == 2
    assert "the student's output has V=64, the teacher's output has V=48" in capsys.readouterr().err


def test_missing_optional_dependencies_name_the_extra(monkeypatch, tmp_path):
    with pytest.raises(ImportError, match=r"pip install 'kdfast\[demo\]'"):
        require("kdfast_no_such_module", "demo", "testing")
    monkeypatch.setitem(sys.modules, "yaml", None)
    (tmp_path / "c.yaml").write_text("a: 1\n")
    with pytest.raises(ImportError, match=r"YAML configs needs the 'yaml' package: pip install 'kdfast\[demo\]'"):
        load_config(tmp_path / "c.yaml")
    monkeypatch.setitem(sys.modules, "transformers", None)
    monkeypatch.delitem(sys.modules, "kdfast.integrations.hf", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'kdfast\[hf\]'"):
        importlib.import_module("kdfast.integrations.hf")


@pytest.mark.slow
def test_demo_end_to_end_then_reuses_the_teacher(tmp_path, capsys):
    tiny = ["--set", f"cache_dir={tmp_path / 'cache'}", "--set", "tokenizer.vocab_size=300", "--set", "data.context=32",
            "--set", "teacher.model.gpt={n_layer: 1, n_head: 2, d_model: 32}",
            "--set", "student.model.gpt={n_layer: 1, n_head: 2, d_model: 16}",
            "--set", "teacher.train={steps: 4, batch_size: 4, eval_every: 2, eval_windows: 8, progress: false}",
            "--set", "student.train={steps: 4, batch_size: 4, eval_every: 2, eval_windows: 8, progress: false}",
            "--set", "eval.windows=16"]
    command = ["demo", "--config", str(REPO / "configs" / "demo.yaml"), "--out", str(tmp_path / "demo"), *tiny]
    assert main(command) == 0
    report = (tmp_path / "demo" / "report.md").read_text()
    for row in ("| teacher |", "| baseline |", "| distilled |", "| from_cache |", "held-out loss", "loss_curves.png",
                "| training step speed-up over the distilled student |"):
        assert row in report
    results = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert results["timings_s"]["cache_capture"] > 0 and results["teacher_cache"]["k"] == 64
    assert (tmp_path / "demo" / "loss_curves.png").stat().st_size > 1000
    assert "using the cached teacher" not in capsys.readouterr().out
    assert main(command) == 0
    assert "using the cached teacher" in capsys.readouterr().out
    assert "(cached)" in (tmp_path / "demo" / "report.md").read_text()
