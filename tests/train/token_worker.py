"""One optimizer step of DistillTrainer on masked data, in the test's process or under torchrun, for the
token-normalisation tests.

    python tests/train/token_worker.py OUT_DIR --batch-size B --grad-accum G [--seeds PROMPTS ORDER]
    torchrun --standalone --nproc_per_node 2 tests/train/token_worker.py OUT_DIR --batch-size B --grad-accum G ...

Writes OUT_DIR/rank{R}.pt: the gradient the optimizer stepped with, the weights after the step, the step's
logged record, and what each kdfast backward still multiplied its gradient by (1 when the trainer's
expected_grad_output was what backward received, so that no pass over the gradient was needed).
"""

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers_trainer import CONTEXT, make_pair, markov_tokens  # noqa: E402

import kdfast.chunked  # noqa: E402
import kdfast.ops  # noqa: E402
from kdfast import LossOptions  # noqa: E402
from kdfast.train.data import MaskedWindows  # noqa: E402
from kdfast.train.runtime import leave_distributed  # noqa: E402
from kdfast.train.teacher_cache import TeacherCache, capture_teacher  # noqa: E402
from kdfast.train.trainer import DistillTrainer, TrainConfig  # noqa: E402

KD = LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5)
TEACHERS = ("fused_linear", "logits", "plain", "cache")  # a teacher model on either path, none, a teacher cache


def masked_windows(seeds: tuple[int, int] = (1, 1)) -> MaskedWindows:
    """Prompts and responses of up to 3 windows' length each (drawn from seeds[0]), the prompts masked: a
    window's counted targets range from none to all of them; seeds[1] is the windows' order."""
    tokens = markov_tokens(CONTEXT * 30 + 1, seed=1)
    gen = torch.Generator().manual_seed(seeds[0])
    pairs, start = [], 0
    while start < len(tokens):
        prompt, response = torch.randint(1, 3 * CONTEXT, (2,), generator=gen).tolist()
        pairs.append((tokens[start:start + prompt], tokens[start + prompt:start + prompt + response]))
        start += prompt + response
    return MaskedWindows.from_pairs(pairs, CONTEXT, seed=seeds[1])


def one_step(out_dir: Path, batch_size: int, grad_accum: int, teacher_kind: str = "fused_linear",
             seeds: tuple[int, int] = (1, 1)) -> dict:
    """Trains a fresh make_pair student for one step and returns (and writes) what the module doc says."""
    out_dir = Path(out_dir)
    teacher, student = make_pair(seed=0)
    data = masked_windows(seeds)
    if teacher_kind == "cache":
        capture_teacher(teacher, data, out_dir / "cache", k=5, temperature=KD.temperature, dtype="fp32",
                        batch_size=8, progress=False)
        teacher = TeacherCache(out_dir / "cache")
    elif teacher_kind == "plain":
        teacher = None
    config = TrainConfig(out_dir=str(out_dir), steps=1, batch_size=batch_size, grad_accum=grad_accum, lr=1e-2,
                         warmup_steps=0, grad_clip=0.0, loss_path="logits" if teacher_kind == "logits" else "auto",
                         eval_windows=0, log_every=1, progress=False, tensorboard=False)
    trainer = DistillTrainer(student, data, config, teacher=teacher, loss_options=KD)
    grads, scales = {}, []
    trainer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {name: p.grad.clone() for name, p in trainer.student.named_parameters()}))
    spied = kdfast.ops.relative_grad_output

    def relative_grad_output(grad_output, expected):
        scale = spied(grad_output, expected)
        scales.append(float(scale))
        return scale

    for module in (kdfast.ops, kdfast.chunked):
        module.relative_grad_output = relative_grad_output
    try:
        trainer.train()
    finally:
        for module in (kdfast.ops, kdfast.chunked):
            module.relative_grad_output = spied
    record = None  # rank 0 logs
    if trainer.rank == 0:
        records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
        record = next(r for r in records if r["split"] == "train")
    result = {"grads": grads, "weights": trainer.student.state_dict(), "scales": scales, "record": record,
              "path": trainer.distill_loss.path}
    torch.save(result, out_dir / f"rank{trainer.rank}.pt")
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--grad-accum", type=int, required=True)
    parser.add_argument("--seeds", type=int, nargs=2, default=(1, 1))
    args = parser.parse_args()
    torch.set_num_threads(1)
    one_step(Path(args.out_dir), args.batch_size, args.grad_accum, seeds=tuple(args.seeds))


if __name__ == "__main__":
    main()  # returns with the trainer and its DDP wrapper freed, before the process group goes
    leave_distributed()
