"""``kdfast distill`` (kdfast.train.cli.main) in this process, for the FSDP tests: under torchrun, DDP or FSDP.

    torchrun --standalone --nproc_per_node 2 tests/train/fsdp_worker.py [--hang-at STEP] --config FILE ...
    python tests/train/fsdp_worker.py --config FILE ...

After training each rank writes OUT_DIR/rank{R}.json: whether the student's and the teacher's parameters are
all DTensors (sharded), the loss path and the bytes of its parameters and optimizer state. --hang-at STEP
prints "checkpointed STEP" once that checkpoint is on disk and sleeps, for the test to kill the run there.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from kdfast.train import cli
from kdfast.train.trainer import DistillTrainer


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hang-at", type=int, default=0)
    args, distill = parser.parse_known_args()
    torch.set_num_threads(1)  # the same kernels, so the same bits, in every process
    save, train = DistillTrainer.save, DistillTrainer.train

    def save_then_hang(trainer):
        save(trainer)
        if trainer.step == args.hang_at:
            print(f"checkpointed {trainer.step}", flush=True)
            # Until the test kills the run: torchrun starts the workers in sessions of their own, so killing
            # its process group leaves them; a worker whose launcher is gone (reparented) ends itself.
            launcher = os.getppid()
            for _ in range(6000):
                if os.getppid() != launcher:
                    os._exit(1)
                time.sleep(0.1)

    def train_then_report(trainer):
        summary = train(trainer)
        report = {role: all(isinstance(p, DTensor) for p in model.parameters())
                  for role, model in (("student", trainer.student), ("teacher", trainer.teacher))}
        report.update(loss_path=trainer.distill_loss.path, **trainer.state_bytes())
        (Path(trainer.cfg.out_dir) / f"rank{trainer.rank}.json").write_text(json.dumps(report))
        return summary

    DistillTrainer.save, DistillTrainer.train = save_then_hang, train_then_report
    return cli.main(["distill", *[a for a in distill if a != "--"]])


if __name__ == "__main__":
    sys.exit(main())
