"""A tiny distillation run in its own process, for the kill-and-resume and the DDP tests.

    python tests/train/trainer_worker.py OUT_DIR [--batch-size B] [--hang-at STEP]
    torchrun --standalone --nproc_per_node 2 tests/train/trainer_worker.py OUT_DIR --batch-size B

Trains for STEPS steps, checkpointing every 2, then writes each rank's final weights to
OUT_DIR/rank{R}.pt. --hang-at STEP prints "checkpointed STEP" once that checkpoint is on
disk and sleeps, for the test to kill it there.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers_trainer import make_pair, markov_tokens  # noqa: E402

from kdfast import LossOptions  # noqa: E402
from kdfast.train.data import TokenWindows  # noqa: E402
from kdfast.train.runtime import leave_distributed  # noqa: E402
from kdfast.train.trainer import DistillTrainer, TrainConfig  # noqa: E402

STEPS = 8


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--hang-at", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the same kernels, so the same bits, in every process
    teacher, student = make_pair(seed=0)
    config = TrainConfig(out_dir=args.out_dir, steps=STEPS, batch_size=args.batch_size, lr=3e-3, warmup_steps=2,
                         checkpoint_every=2, keep_last=2, log_every=1, progress=False)
    trainer = DistillTrainer(student, TokenWindows(markov_tokens(4000, seed=1), 16, seed=3), config,
                             teacher=teacher,
                             loss_options=LossOptions(temperature=2.0, hard_weight=0.5, soft_weight=0.5))
    if args.hang_at:
        save = trainer.save

        def save_then_hang():
            save()
            if trainer.step == args.hang_at:
                print(f"checkpointed {trainer.step}", flush=True)
                time.sleep(600)

        trainer.save = save_then_hang
    trainer.train()
    torch.save(trainer.student.state_dict(), Path(args.out_dir) / f"rank{trainer.rank}.pt")


if __name__ == "__main__":
    main()  # returns with the trainer and its DDP wrapper freed, before the process group goes
    leave_distributed()
