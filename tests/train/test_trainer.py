"""The training loop, its data order, checkpoints, kill-and-resume, DDP, and its errors."""

import json
import math
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers_trainer import CONTEXT, VOCAB, make_pair, markov_tokens
from torch import nn

import kdfast
from kdfast import LossOptions
from kdfast.train.checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from kdfast.train.data import TokenWindows
from kdfast.train.lm import LMDistillLoss, choose_loss_path
from kdfast.train.trainer import DistillTrainer, TrainConfig, lr_factor

WORKER = Path(__file__).resolve().parent / "trainer_worker.py"
KD = LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
fused_available = pytest.mark.skipif(not hasattr(kdfast, "fused_linear_kd_loss"),
                                     reason="kdfast.fused_linear_kd_loss is not there yet")


def config(tmp_path, name="run", **overrides) -> TrainConfig:
    values = dict(out_dir=str(tmp_path / name), steps=6, batch_size=4, lr=3e-3, warmup_steps=2, log_every=2,
                  eval_windows=16, progress=False, tensorboard=False)
    return TrainConfig(**{**values, **overrides})


def windows(seed=1, n=3000):
    return TokenWindows(markov_tokens(n, seed), CONTEXT, seed=seed)


def weights_equal(a: dict, b: dict, atol=0.0) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


# --- data order ---

def test_windows_are_a_function_of_the_batch_index():
    data = windows()
    x, y = data.batch(5, 4)
    assert x.shape == y.shape == (4, CONTEXT)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(data.batch(5, 4)[0], windows().batch(5, 4)[0])
    assert not torch.equal(data.batch(5, 4)[0], data.batch(6, 4)[0])


def test_ranks_split_the_global_batch():
    data = windows()
    whole = data.batch(3, 8)[0]
    parts = torch.cat([data.batch(3, 4, rank=r, world_size=2)[0] for r in range(2)])
    assert torch.equal(whole, parts)
    one_epoch = torch.cat([data.batch(i, 1)[0][:, 0] for i in range(data.n_windows)])
    starts = data.tokens[torch.arange(data.n_windows) * CONTEXT]
    assert sorted(one_epoch.tolist()) == sorted(starts.tolist())  # every window once per epoch


def test_held_out_windows_are_shared_between_ranks():
    data = windows()
    single = torch.cat([x for x, _ in data.spread(10, 3)])
    ranks = [torch.cat([x for x, _ in data.spread(10, 3, rank=r, world_size=2)]) for r in range(2)]
    assert len(single) == 10 and len(ranks[0]) + len(ranks[1]) == 10
    assert sorted(map(tuple, single.tolist())) == sorted(map(tuple, torch.cat(ranks).tolist()))


def test_schedule_warms_up_then_decays_to_the_floor():
    factors = [lr_factor(s, warmup=4, total=20, min_ratio=0.1) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0]
    assert all(a >= b for a, b in zip(factors[3:], factors[4:]))
    assert factors[20] == pytest.approx(0.1)


# --- training ---

def test_distillation_lowers_the_loss_and_logs(tmp_path):
    teacher, student = make_pair(seed=0)
    DistillTrainer(teacher, windows(), config(tmp_path, "teacher", steps=30, lr=1e-2)).train()
    summary = DistillTrainer(student, windows(), config(tmp_path, steps=12, eval_every=4), teacher=teacher,
                             eval_data=windows(seed=2), loss_options=KD).train()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [2, 4, 6, 8, 10, 12]
    assert train[-1]["loss"] < train[0]["loss"]
    assert train[0]["loss"] == pytest.approx(0.5 * train[0]["kd"] + 0.5 * train[0]["hard"], rel=1e-5)
    assert {"eval"} == {r["split"] for r in records if r["step"] == 4 and "agreement" in r}
    final = summary["eval"]
    assert set(final) >= {"loss", "ppl", "teacher_loss", "teacher_ppl", "agreement", "kl"}
    assert final["ppl"] == pytest.approx(math.exp(final["loss"]))
    assert 0 <= final["agreement"] <= 1
    assert summary["tokens"] == 12 * 4 * CONTEXT and summary["tokens_per_s"] > 0
    assert summary["peak_memory_bytes"] > 0
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 12
    assert [p.name for p in checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000012"]


@fused_available
def test_fused_linear_and_logits_paths_train_alike(tmp_path):
    results = {}
    for path in ("fused_linear", "logits"):
        teacher, student = make_pair(seed=0)
        trainer = DistillTrainer(student, windows(), config(tmp_path, path, loss_path=path), teacher=teacher, loss_options=KD)
        assert trainer.distill_loss.path == path
        trainer.train()
        results[path] = student.state_dict()
    assert weights_equal(results["fused_linear"], results["logits"], atol=1e-5)


def test_gradient_accumulation_matches_a_larger_batch(tmp_path):
    states = []
    for batch_size, accum in ((8, 1), (4, 2)):
        teacher, student = make_pair(seed=0)
        DistillTrainer(student, windows(), config(tmp_path, f"b{batch_size}", batch_size=batch_size,
                                                  grad_accum=accum), teacher=teacher, loss_options=KD).train()
        states.append(student.state_dict())
    assert weights_equal(*states, atol=1e-5)


def test_a_plain_module_returning_logits_is_distilled_from_its_logits(tmp_path):
    class Bigram(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(VOCAB, VOCAB)

        def forward(self, input_ids):
            return self.table(input_ids)

    teacher, _ = make_pair(seed=0)
    trainer = DistillTrainer(Bigram(), windows(), config(tmp_path), teacher=teacher, loss_options=KD)
    assert trainer.distill_loss.path == "logits"
    assert trainer.train()["steps"] == 6
    with pytest.raises(ValueError, match="fused_linear.*cannot be used"):
        choose_loss_path(Bigram(), teacher, KD, "fused_linear")


def test_loss_parts_match_kd_loss_on_shifted_logits():
    teacher, student = make_pair(seed=0)
    inputs, targets = windows().batch(0, 3)
    parts = LMDistillLoss(KD, "logits")(student, teacher, inputs, targets)
    expected = kdfast.kd_loss(student(inputs).logits, teacher(inputs).logits.detach(), labels=targets,
                              temperature=2.0, hard_weight=0.5, soft_weight=0.5, return_parts=True)
    for got, want in zip(parts, expected):
        torch.testing.assert_close(got, want)


# --- checkpoints and resuming ---

def test_checkpoints_keep_the_last_k_and_skip_a_corrupt_one(tmp_path):
    folder = tmp_path / "ckpt"
    for step in (1, 2, 3, 4):
        save_checkpoint(folder, step, {"step": step, "w": torch.full((3,), float(step))}, keep_last=3)
    assert [p.name for p in checkpoints(folder)] == ["step-00000002", "step-00000003", "step-00000004"]
    (folder / "step-00000004" / "state.pt").write_bytes(b"cut short")  # a partial write
    (folder / "step-00000003" / "manifest.json").unlink()  # killed before the manifest
    (folder / ".tmp-step-00000005").mkdir()  # a writer killed mid-way
    with pytest.warns(UserWarning, match="corrupt") as caught:
        newest = latest_checkpoint(folder)
    assert len(caught) == 2
    assert newest.name == "step-00000002" and load_checkpoint(newest)["step"] == 2
    assert (folder / "step-00000004.corrupt").is_dir() and (folder / "step-00000003.corrupt").is_dir()
    save_checkpoint(folder, 3, {"step": 3}, keep_last=3)
    assert not (folder / ".tmp-step-00000005").exists()
    assert [p.name for p in checkpoints(folder)] == ["step-00000002", "step-00000003"]


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent)}
    run = [sys.executable, str(WORKER)]
    subprocess.run([*run, str(tmp_path / "straight")], check=True, env=env, timeout=300)

    killed = subprocess.Popen([*run, str(tmp_path / "killed"), "--hang-at", "4"], stdout=subprocess.PIPE, text=True,
                              env=env)
    try:
        assert killed.stdout.readline().strip() == "checkpointed 4"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed" / "rank0.pt").exists()
    subprocess.run([*run, str(tmp_path / "killed")], check=True, env=env, timeout=300)

    straight = torch.load(tmp_path / "straight" / "rank0.pt")
    resumed = torch.load(tmp_path / "killed" / "rank0.pt")
    assert weights_equal(straight, resumed)  # bit for bit
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one record per step, as uninterrupted


def test_resume_refuses_other_settings_and_fresh_runs_refuse_old_checkpoints(tmp_path):
    teacher, student = make_pair(seed=0)
    DistillTrainer(student, windows(), config(tmp_path), teacher=teacher, loss_options=KD).train()
    with pytest.raises(ValueError, match="other settings") as refused:
        DistillTrainer(student, windows(), config(tmp_path, lr=1e-2, steps=8), teacher=teacher, loss_options=KD).train()
    differences = str(refused.value).split("(then -> now):\n")[1].splitlines()[:-1]
    assert differences == ["  train.steps: 6 -> 8", "  train.lr: 0.003 -> 0.01"]
    with pytest.raises(FileExistsError, match="earlier run"):
        DistillTrainer(student, windows(), config(tmp_path, resume=False), teacher=teacher, loss_options=KD).train()
    # the same settings resume: nothing left to train, the same weights
    before = {k: v.clone() for k, v in student.state_dict().items()}
    assert DistillTrainer(student, windows(), config(tmp_path), teacher=teacher, loss_options=KD).train()["steps"] == 6
    assert weights_equal(before, student.state_dict())


def test_resume_falls_back_past_a_corrupt_checkpoint(tmp_path):
    teacher, student = make_pair(seed=0)
    cfg = config(tmp_path, checkpoint_every=2, keep_last=3)
    DistillTrainer(student, windows(), cfg, teacher=teacher, loss_options=KD).train()
    reference = {k: v.clone() for k, v in student.state_dict().items()}
    newest = tmp_path / "run" / "checkpoints" / "step-00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    _, fresh = make_pair(seed=0)
    with pytest.warns(UserWarning, match="corrupt"):
        DistillTrainer(fresh, windows(), cfg, teacher=teacher, loss_options=KD).train()  # redoes steps 5 and 6
    assert weights_equal(reference, fresh.state_dict())


def test_tensorboard_events_match_the_metrics_log_after_a_resume(tmp_path):
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    teacher, student = make_pair(seed=0)
    cfg = config(tmp_path, checkpoint_every=2, keep_last=3, log_every=1, tensorboard=True)
    DistillTrainer(student, windows(), cfg, teacher=teacher, loss_options=KD).train()
    newest = tmp_path / "run" / "checkpoints" / "step-00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:100])
    _, fresh = make_pair(seed=0)
    with pytest.warns(UserWarning, match="corrupt"):
        DistillTrainer(fresh, windows(), cfg, teacher=teacher, loss_options=KD).train()  # steps 5 and 6 are logged again
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    expected = [(r["step"], r["loss"]) for r in records if r["split"] == "train"]
    assert [step for step, _ in logged] == [step for step, _ in expected] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in logged] == pytest.approx([value for _, value in expected], rel=1e-6)


# --- several processes ---

@pytest.mark.slow
def test_two_ddp_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(WORKER), str(tmp_path / "ddp"), "--batch-size", "2"], check=True, env=env, timeout=300)
    subprocess.run([sys.executable, str(WORKER), str(tmp_path / "single"), "--batch-size", "4"], check=True,
                   env=env, timeout=300)
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"rank{r}.pt") for r in range(2))
    assert weights_equal(rank0, rank1)
    assert weights_equal(rank0, torch.load(tmp_path / "single" / "rank0.pt"), atol=1e-5)
    assert json.loads((tmp_path / "ddp" / "summary.json").read_text())["world_size"] == 2


# --- bad input ---

def test_mismatched_vocabularies_fail_early_unless_vocab_size_is_given(tmp_path):
    teacher, student = make_pair(seed=0, vocab=VOCAB + 16, student_vocab=VOCAB)
    expected = f"the student's output has V={VOCAB}, the teacher's output has V={VOCAB + 16}.*vocab_size={VOCAB}"
    with pytest.raises(ValueError, match=expected):
        DistillTrainer(student, windows(), config(tmp_path), teacher=teacher, loss_options=KD)
    padded = LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5, vocab_size=VOCAB)
    assert DistillTrainer(student, windows(), config(tmp_path), teacher=teacher, loss_options=padded).train()["steps"] == 6


def test_an_unwritable_output_directory_is_named(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    _, student = make_pair(seed=0)
    with pytest.raises(OSError, match="output directory .*file/out is not writable"):
        DistillTrainer(student, windows(), config(tmp_path, "file/out"))


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="loss_path"):
        TrainConfig(loss_path="fast")


def test_teacher_in_bf16_under_bf16_autocast(tmp_path):
    teacher, student = make_pair(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the kernels may fall back for mixed dtypes on CPU
        summary = DistillTrainer(student, windows(), config(tmp_path, precision="bf16", teacher_dtype="bf16"),
                                 teacher=teacher, eval_data=windows(seed=2), loss_options=KD).train()
    assert next(teacher.parameters()).dtype == torch.bfloat16
    assert math.isfinite(summary["eval"]["loss"])
