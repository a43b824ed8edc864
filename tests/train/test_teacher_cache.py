"""Teacher caches: capture, read back, resume after SIGKILL, torchrun, refusals, and training from a cache
equal to training from the live teacher's top-k."""

import copy
import json
import os
import shlex
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from cache_worker import CAPTURE, windows
from helpers_trainer import CONTEXT, make_pair, markov_tokens

import kdfast
from kdfast import LossOptions
from kdfast.train.cli import main
from kdfast.train.config import build_model, load_config, save_weights
from kdfast.train.data import TokenWindows, save_tokens
from kdfast.train import teacher_cache
from kdfast.train.teacher_cache import TeacherCache, bytes_per_token, capture_teacher, id_dtype, write_cache
from kdfast.train.trainer import DistillTrainer, TrainConfig

WORKER = Path(__file__).with_name("cache_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent), "OMP_NUM_THREADS": "1"}


def capture(out_dir, teacher=None, data=None, **overrides):
    teacher = teacher if teacher is not None else make_pair(seed=0)[0]
    return capture_teacher(teacher, data or windows(), out_dir, **{**CAPTURE, **overrides})


def files_of(directory: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# --- the format ---

@pytest.mark.parametrize("vocab, dtype, empty", [(48, np.int16, -1), (32768, np.int16, -1), (32769, np.uint16, 65535),
                                                 (65535, np.uint16, 65535), (65536, np.int32, -1),
                                                 (262144, np.int32, -1)])
def test_ids_take_the_smallest_integer_type_that_holds_v_and_the_empty_slot(vocab, dtype, empty):
    assert id_dtype(vocab) == (np.dtype(dtype), empty)


@pytest.mark.parametrize("dtype, atol", [("fp32", 0.0), ("fp16", 4e-3), ("bf16", 3e-2)])
def test_a_capture_reads_back_as_teacher_topk_of_every_window(tmp_path, dtype, atol):
    teacher, _ = make_pair(seed=0)
    data = windows()
    manifest = capture(tmp_path, teacher, data, dtype=dtype)
    cache = TeacherCache(tmp_path)
    assert (cache.vocab_size, cache.k, cache.temperature, cache.sequences, cache.context) == (48, 5, 2.0, 20, CONTEXT)
    assert manifest["bytes_per_token"] == bytes_per_token(48, 5, dtype) == 5 * (2 + int(dtype[2:]) // 8)
    every = torch.arange(data.n_windows)
    ids, logprobs = cache.lookup(every.flip(0))
    with torch.no_grad():
        expected_ids, expected_logprobs = kdfast.teacher_topk(teacher(data.rows(every)[0]).logits, 5, 2.0)
    assert torch.equal(ids, expected_ids.flip(0))
    assert logprobs.dtype == {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    torch.testing.assert_close(logprobs.float(), expected_logprobs.flip(0), atol=atol + 1e-6, rtol=0)


def test_write_cache_from_arrays_keeps_empty_slots_in_unsigned_ids(tmp_path):
    data = windows()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40000, (data.n_windows, CONTEXT, 3), generator=gen)
    ids[..., 2] = -1
    logprobs = torch.full(ids.shape, -3.0)
    logprobs[..., 2] = -float("inf")
    manifest = write_cache(tmp_path, ids, logprobs, windows=data, vocab_size=40000, temperature=1.0,
                           teacher="server:model@rev", shard_sequences=6)
    assert manifest["id_dtype"] == "uint16" and len(manifest["shards"]) == 4
    got_ids, got_logprobs = TeacherCache(tmp_path).lookup(torch.tensor([7, 0, 19]))
    assert torch.equal(got_ids, ids[[7, 0, 19]]) and torch.equal(got_logprobs.float(), logprobs[[7, 0, 19]])


def test_sampled_captures_are_reproducible(tmp_path):
    first = capture(tmp_path / "a", mode="sample", n=6, dtype="fp32")
    capture(tmp_path / "b", mode="sample", n=6, dtype="fp32")
    assert files_of(tmp_path / "a") == files_of(tmp_path / "b")
    ids, logprobs = TeacherCache(tmp_path / "a").lookup(torch.arange(3))
    assert first["k"] == 6 and TeacherCache(tmp_path / "a").tail == "raw"
    counts = torch.where(ids >= 0, logprobs.exp() * 6, 0.0).sum(-1)  # log(count / n) sums to n draws
    torch.testing.assert_close(counts, torch.full_like(counts, 6.0))


# --- robustness ---

@pytest.mark.slow
def test_a_capture_killed_with_sigkill_resumes_to_the_same_cache(tmp_path, monkeypatch):
    capture(tmp_path / "straight")
    killed = subprocess.run([sys.executable, str(WORKER), str(tmp_path / "killed"), "--kill-after", "3"], env=ENV,
                            timeout=300)
    assert killed.returncode == -9
    assert not (tmp_path / "killed" / "manifest.json").exists()
    with pytest.raises(FileNotFoundError, match="unfinished"):
        TeacherCache(tmp_path / "killed")
    damaged = tmp_path / "killed" / "shard-00001.logprobs.npy"  # a shard damaged since: recomputed too
    damaged.write_bytes(damaged.read_bytes()[:-1] + b"\x00")
    written, original = [], teacher_cache._write_shard
    monkeypatch.setattr(teacher_cache, "_write_shard", lambda d, i, *a: (written.append(i), original(d, i, *a)))
    capture(tmp_path / "killed")
    assert written == [1, 3, 4, 5, 6]
    assert files_of(tmp_path / "killed") == files_of(tmp_path / "straight")


@pytest.mark.slow
def test_two_torchrun_processes_write_the_cache_of_one(tmp_path):
    capture(tmp_path / "one")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(tmp_path / "two")], check=True, env=ENV, timeout=300)
    assert files_of(tmp_path / "two") == files_of(tmp_path / "one")


# --- refusals ---

def test_damaged_missing_and_unfinished_caches_are_named(tmp_path):
    capture(tmp_path)
    shard = tmp_path / "shard-00002.logprobs.npy"
    good = shard.read_bytes()
    flipped = bytearray(good)
    flipped[len(good) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    with pytest.raises(ValueError, match="shard-00002.logprobs.npy does not match"):
        TeacherCache(tmp_path)
    shard.write_bytes(good)
    TeacherCache(tmp_path)
    (tmp_path / "shard-00004.ids.npy").unlink()
    with pytest.raises(FileNotFoundError, match="shard-00004.ids.npy is missing"):
        TeacherCache(tmp_path)
    with pytest.raises(FileNotFoundError, match="no readable manifest.json"):
        TeacherCache(tmp_path / "elsewhere")


def test_a_capture_into_a_cache_of_another_teacher_or_k_is_refused(tmp_path):
    capture(tmp_path)
    with pytest.raises(ValueError, match="another cache:\n  k: 5 .cache. vs 4 .now."):
        capture(tmp_path, k=4)
    other, _ = make_pair(seed=1)
    with pytest.raises(ValueError, match="teacher: '"):
        capture(tmp_path, other)


def trainer(tmp_path, cache, data=None, student=None, temperature=2.0, **train):
    """A constant-rate AdamW run without weight decay or clipping, logging every step."""
    settings = dict(out_dir=str(tmp_path / "run"), steps=3, batch_size=4, lr=1e-2, warmup_steps=0, min_lr_ratio=1.0,
                    weight_decay=0.0, grad_clip=0.0, log_every=1, progress=False, tensorboard=False, eval_windows=0)
    config = TrainConfig(**{**settings, **train})
    options = LossOptions(temperature=temperature, hard_weight=0.5, soft_weight=0.5)
    return DistillTrainer(student or make_pair(seed=0)[1], data or windows(), config, teacher=cache,
                          loss_options=options)


def test_training_refuses_a_cache_of_other_data_vocabulary_or_temperature(tmp_path):
    capture(tmp_path / "cache")
    cache = TeacherCache(tmp_path / "cache")
    other = TokenWindows(markov_tokens(CONTEXT * 20 + 1, seed=4), CONTEXT)
    with pytest.raises(ValueError, match="does not match this run:\n  data_sha256: '[0-9a-f]+' .cache. vs"):
        trainer(tmp_path, cache, data=other)
    with pytest.raises(ValueError, match="temperature: 2.0 .cache. vs 1.0 .now."):
        trainer(tmp_path, cache, temperature=1.0)
    with pytest.raises(ValueError, match="the student's output has V=40, the teacher's V=48"):
        trainer(tmp_path, cache, student=make_pair(seed=0, student_vocab=40)[1])


def test_the_tokenizer_is_part_of_the_data_identity(tmp_path):
    """The same ids from another tokenizer are other text: a cache of one is refused for the other."""
    tokens = markov_tokens(CONTEXT * 20 + 1, seed=3)
    capture(tmp_path / "cache", data=TokenWindows(tokens, CONTEXT, tokenizer="sha256-of-tokenizer-a"))
    cache = TeacherCache(tmp_path / "cache")
    cache.check(windows=TokenWindows(tokens, CONTEXT, tokenizer="sha256-of-tokenizer-a"))
    for other in ("sha256-of-tokenizer-b", None):
        with pytest.raises(ValueError, match=f"tokenizer: 'sha256-of-tokenizer-a' .cache. vs {other!r} .now."):
            cache.check(windows=TokenWindows(tokens, CONTEXT, tokenizer=other))


# --- training from a cache ---

@pytest.mark.parametrize("loss_path", ["logits", "fused_linear"])
def test_training_from_a_cache_equals_training_from_the_live_teachers_topk(tmp_path, loss_path):
    teacher, student = make_pair(seed=0)
    data = TokenWindows(markov_tokens(CONTEXT * 12 + 1, seed=5), CONTEXT, seed=7)
    capture(tmp_path / "cache", teacher, data, k=6, dtype="fp32")
    reference = copy.deepcopy(student)
    run = trainer(tmp_path, TeacherCache(tmp_path / "cache"), data=data, student=student, loss_path=loss_path,
                  steps=5)  # 5 batches of 4 over 12 windows: into the second epoch
    assert run.distill_loss.path == loss_path
    run.train()
    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["split"] == "train"]
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0)
    losses = []
    for step in range(5):
        inputs, targets = data.batch(step, 4)
        with torch.no_grad():
            ids, logprobs = kdfast.teacher_topk(teacher(inputs).logits, 6, 2.0)
        loss = kdfast.sparse_kd_loss(reference(inputs).logits, ids, logprobs, labels=targets, temperature=2.0,
                                     hard_weight=0.5, soft_weight=0.5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert logged == pytest.approx(losses, rel=1e-5)
    for (name, got), expected in zip(student.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_a_resumed_run_from_a_cache_refuses_another_cache(tmp_path):
    capture(tmp_path / "a")
    trainer(tmp_path, TeacherCache(tmp_path / "a"), steps=2).train()
    capture(tmp_path / "b", k=4)
    with pytest.raises(ValueError, match="teacher.k: 5 -> 4"):
        trainer(tmp_path, TeacherCache(tmp_path / "b"), steps=2).resume()


# --- the command ---

def test_cache_teacher_help_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["cache-teacher", "--help"])
    assert exit_info.value.code == 0
    blocks = capsys.readouterr().out.split("example config")[1].split("\n\n")
    (tmp_path / "cached.yaml").write_text(textwrap.dedent(blocks[1]))
    commands = [shlex.split(line) for line in textwrap.dedent(blocks[3]).splitlines()]
    assert [c[:2] for c in commands] == [["kdfast", "cache-teacher"], ["kdfast", "distill"]]
    monkeypatch.chdir(tmp_path)  # its paths are relative
    config = load_config("cached.yaml")
    vocab, context = config["data"]["vocab_size"], config["data"]["context"]
    Path("data").mkdir()
    save_tokens(markov_tokens(context * 6 + 1, seed=1, vocab=vocab), config["data"]["train_tokens"])
    save_tokens(markov_tokens(context * 2 + 1, seed=2, vocab=vocab), config["data"]["eval_tokens"])
    save_weights(build_model({"gpt": config["teacher"]["gpt"]}, "teacher", vocab), config["teacher"]["weights"])
    assert main(commands[0][1:] + ["--set", "cache.progress=false"]) == 0
    manifest = json.loads(Path("runs/teacher-cache/manifest.json").read_text())
    assert (manifest["sequences"], manifest["k"], manifest["bytes_per_token"]) == (6, 32, 32 * 4)
    assert main(commands[1][1:] + ["--set", "train.steps=2", "--set", "train.progress=false",
                                   "--set", "train.tensorboard=false"]) == 0
    summary = json.loads(Path(config["train"]["out_dir"], "summary.json").read_text())
    assert summary["steps"] == 2 and summary["loss_path"] == "fused_linear" and "agreement" not in summary["eval"]



def test_the_example_config_in_configs_is_the_one_the_help_prints(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["cache-teacher", "--help"])
    printed = capsys.readouterr().out.split("example config")[1].split("\n\n")[1]
    (tmp_path / "printed.yaml").write_text(textwrap.dedent(printed))
    repo = Path(__file__).resolve().parents[2]
    assert load_config(repo / "configs" / "cached_teacher.yaml") == load_config(tmp_path / "printed.yaml")
