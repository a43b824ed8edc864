"""DistillTrainer with parallel="fsdp" (issue 17 item 2), through the command line (kdfast distill under
torchrun, 2 gloo processes on the CPU): the same per-step losses, held-out metrics and final student as DDP and
as one process with the global batch; both models sharded (their parameters are DTensors); a run killed with
SIGKILL after a checkpoint resumes to the same student; the checkpoints are torch.distributed.checkpoint's,
verified like the others (a corrupt one is set aside)."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers_trainer import CONTEXT, VOCAB, make_pair, markov_tokens

import kdfast
from kdfast.train.config import save_weights
from kdfast.train.trainer import TrainConfig

WORKER = Path(__file__).with_name("fsdp_worker.py")
ENV = {**os.environ, "PYTHONPATH": str(Path(kdfast.__file__).parent.parent), "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A config of 6 steps of 2 micro-batches of 2 sequences per process, checkpoints every 2 steps, held-out
    metrics every 3 on 5 windows in batches of 2 (so that one process has a batch fewer than the other)."""
    folder = tmp_path_factory.mktemp("fsdp")
    teacher, _ = make_pair(seed=0)
    save_weights(teacher, folder / "teacher.safetensors")
    torch.save(markov_tokens(3000, seed=1), folder / "train.pt")
    torch.save(markov_tokens(600, seed=2), folder / "eval.pt")
    (folder / "run.yaml").write_text(f"""
data: {{train_tokens: {folder}/train.pt, eval_tokens: {folder}/eval.pt, vocab_size: {VOCAB}, context: {CONTEXT}}}
teacher: {{gpt: {{n_layer: 2, n_head: 2, d_model: 32, context: {CONTEXT}}}, weights: {folder}/teacher.safetensors}}
student: {{gpt: {{n_layer: 2, n_head: 2, d_model: 16, context: {CONTEXT}}}}}
train: {{steps: 6, batch_size: 2, grad_accum: 2, lr: 3.0e-3, warmup_steps: 2, checkpoint_every: 2, keep_last: 2,
        log_every: 1, eval_every: 3, eval_windows: 5, eval_batch_size: 2, progress: false, tensorboard: false}}
loss: {{temperature: 2.0, hard_weight: 0.5, soft_weight: 0.5}}
""")
    return folder / "run.yaml"


def distill(config: Path, out_dir: Path, *settings: str, processes: int = 2, hang_at: int = 0) -> Path:
    launcher = TORCHRUN if processes == 2 else [sys.executable]
    command = [*launcher, str(WORKER), "--hang-at", str(hang_at), "--config", str(config),
               "--set", f"train.out_dir={out_dir}", *(f"--set={s}" for s in settings)]
    if not hang_at:
        subprocess.run(command, check=True, env=ENV, timeout=300, stdout=subprocess.DEVNULL)
        return out_dir
    run = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in run.stdout:
            if line.startswith(f"checkpointed {hang_at}"):
                break
        else:
            raise AssertionError(f"the run ended before checkpoint {hang_at} (exit status {run.wait()})")
    finally:
        os.killpg(run.pid, signal.SIGKILL)  # torchrun and both workers, mid-run
        run.wait(timeout=60)
    return out_dir


def records(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(got: Path, want: Path, atol: float) -> None:
    """The same per-step losses and held-out metrics, and the same student.safetensors, to fp32 rounding."""
    from safetensors.torch import load_file

    got_records, want_records = records(got), records(want)
    assert [(r["step"], r["split"]) for r in got_records] == [(r["step"], r["split"]) for r in want_records]
    for mine, theirs in zip(got_records, want_records):
        for key in ("loss", "kd", "hard", "kl", "agreement"):
            if key in theirs:
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-6), (mine["step"], key)
    got_weights, want_weights = load_file(got / "student.safetensors"), load_file(want / "student.safetensors")
    assert got_weights.keys() == want_weights.keys()
    for name in want_weights:
        mine, theirs = got_weights[name], want_weights[name]
        if name.endswith("qkv.bias"):
            # The keys' bias gets no gradient in exact arithmetic (it adds the same q.b to all of a query's
            # scores, which the softmax ignores): it holds rounding noise, which Adam scales up and which
            # differs with the order of the sums. Only its size is compared.
            keys = slice(len(theirs) // 3, 2 * len(theirs) // 3)
            assert mine[keys].abs().max() < 1e-4 and theirs[keys].abs().max() < 1e-4, name
            mine, theirs = mine.clone(), theirs.clone()
            mine[keys] = theirs[keys] = 0
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=atol,
                                   msg=lambda detail, name=name: f"{name}: {detail}")


@pytest.mark.slow
def test_fsdp_matches_ddp_and_one_process_and_resumes_after_sigkill(config, tmp_path):
    fsdp = distill(config, tmp_path / "fsdp", "train.parallel=fsdp")
    ranks = [json.loads((fsdp / f"rank{r}.json").read_text()) for r in range(2)]
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["parallel"] == "fsdp"
    for rank in ranks:  # both models sharded; the fused-linear path needs the whole output embedding
        assert rank["student"] and rank["teacher"] and rank["loss_path"] == "logits"
    # DDP (on the logits path too) takes the same steps; one process with the global batch, to fp32 rounding.
    assert_same_run(fsdp, distill(config, tmp_path / "ddp", "train.loss_path=logits"), atol=1e-6)
    assert_same_run(fsdp, distill(config, tmp_path / "single", "train.loss_path=logits", "train.batch_size=4",
                                  processes=1), atol=1e-6)
    # each process holds half the student's parameters and optimizer state (up to padding of odd shapes)
    ddp_ranks = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text()) for r in range(2)]
    for key in ("parameter_bytes", "optimizer_state_bytes"):
        assert sum(rank[key] for rank in ranks) == ddp_ranks[0][key]
        assert ddp_ranks[0][key] == ddp_ranks[1][key] > ranks[0][key]

    # the checkpoints: torch.distributed.checkpoint's files, each in the manifest that verifies them
    newest = fsdp / "checkpoints" / "step-00000006"
    manifest = json.loads((newest / "manifest.json").read_text())
    assert sorted(manifest["files"]) == [".metadata", "__0_0.distcp", "__1_0.distcp", "state.pt"]
    assert sorted(p.name for p in (fsdp / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]

    # killed right after checkpoint 4, whose shard of rank 1 is then cut short: run again, it sets that
    # checkpoint aside (its manifest no longer matches), resumes from checkpoint 2 and ends as the uninterrupted run
    killed = distill(config, tmp_path / "killed", "train.parallel=fsdp", hang_at=4)
    assert not (killed / "student.safetensors").exists()
    shard = killed / "checkpoints" / "step-00000004" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    assert_same_run(distill(config, killed, "train.parallel=fsdp"), fsdp, atol=0.0)
    assert (killed / "checkpoints" / "step-00000004.corrupt").is_dir()


def test_parallel_is_checked():
    assert TrainConfig().parallel == "ddp" and TrainConfig(parallel="fsdp").parallel == "fsdp"
    with pytest.raises(ValueError, match="parallel must be one of ddp, fsdp; got 'zero3'"):
        TrainConfig(parallel="zero3")
