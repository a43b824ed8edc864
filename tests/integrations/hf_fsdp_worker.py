"""KDTrainer on a student that FSDP2 (``fully_shard``) shards after the trainer is built, in 2 gloo processes:

    torchrun --standalone --nproc_per_node 2 tests/integrations/hf_fsdp_worker.py OUT_DIR

As with the Hugging Face Trainer's FSDP, the model given to KDTrainer is sharded later and
compute_loss receives the sharded one. The Trainer itself runs FSDP only on accelerators
(accelerate does not shard on CPUs), so this calls compute_loss as Trainer.training_step
does, then takes an optimizer step and computes the loss again. Every rank sees the same
batch. Writes OUT_DIR/rank{R}.json: the path taken, the loss, kd_loss on the models' logits,
and the loss after the step.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers_trainer import markov_tokens, tiny_llama  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import kdfast  # noqa: E402
from kdfast.integrations.hf import KDTrainer  # noqa: E402
from kdfast.train.runtime import leave_distributed  # noqa: E402

KD = {"temperature": 2.0, "hard_weight": 0.5, "soft_weight": 0.5}
LENGTH = 12


def models_and_batch() -> tuple:
    """(teacher, student, input_ids), the same in every process and in the test's one-process reference."""
    return tiny_llama(seed=0, width=32), tiny_llama(seed=1), markov_tokens(2 * LENGTH, seed=1).view(2, LENGTH)


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(out_dir), report_to=[], use_cpu=True)  # joins the gloo group
    teacher, student, input_ids = models_and_batch()
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, loss_options=KD)
    for module in (*student.model.layers, student.lm_head, student):  # the output embedding gets its own shards
        fully_shard(module)
    loss = trainer.compute_loss(student, {"input_ids": input_ids})
    with torch.no_grad():
        expected = kdfast.kd_loss(student(input_ids).logits[:, :-1], teacher(input_ids).logits[:, :-1],
                                  labels=input_ids[:, 1:], **KD)
    loss.backward()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    optimizer.step()
    after = trainer.compute_loss(student, {"input_ids": input_ids})
    result = {"path": trainer.distill_loss.path, "loss": loss.item(), "expected": expected.item(), "after": after.item()}
    (out_dir / f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    leave_distributed()
