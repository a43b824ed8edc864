"""A teacher capture in its own process, for the kill-and-resume and the torchrun tests.

    python tests/train/cache_worker.py OUT_DIR [--kill-after SHARDS]
    torchrun --standalone --nproc_per_node 2 tests/train/cache_worker.py OUT_DIR

Captures the tiny teacher of helpers_trainer on a fixed stream (SHARD_SEQUENCES windows per shard).
--kill-after SHARDS sends this process SIGKILL right after it has written that many shards.
"""

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers_trainer import CONTEXT, make_pair, markov_tokens  # noqa: E402

from kdfast.train import teacher_cache  # noqa: E402
from kdfast.train.data import TokenWindows  # noqa: E402
from kdfast.train.runtime import init_distributed, leave_distributed  # noqa: E402

SHARD_SEQUENCES = 3
CAPTURE = dict(k=5, temperature=2.0, dtype="bf16", batch_size=2, shard_sequences=SHARD_SEQUENCES, progress=False)


def windows() -> TokenWindows:
    return TokenWindows(markov_tokens(CONTEXT * 20 + 1, seed=3), CONTEXT)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--kill-after", type=int)
    args = parser.parse_args()
    if args.kill_after is not None:
        write, written = teacher_cache._write_shard, []

        def write_then_die(*a):
            write(*a)
            written.append(a[1])
            if len(written) == args.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)

        teacher_cache._write_shard = write_then_die
    init_distributed()
    teacher, _ = make_pair(seed=0)
    teacher_cache.capture_teacher(teacher, windows(), args.out_dir, **CAPTURE)
    leave_distributed()


if __name__ == "__main__":
    main()
