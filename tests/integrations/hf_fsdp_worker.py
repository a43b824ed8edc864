"""KDTrainer on a student that FSDP2 (``fully_shard``) shards after the trainer is built, in 2 gloo processes:

    torchrun --standalone --nproc_per_node 2 tests/integrations/hf_fsdp_worker.py OUT_DIR

As with the Hugging Face Trainer's FSDP, the model given to KDTrainer is sharded later and
compute_loss receives the sharded one. The Trainer itself runs FSDP only on accelerators
(accelerate does not shard on CPUs), so this calls compute_loss as Trainer.training_step
does, then takes an optimizer step and computes the loss again. Every rank sees the same
batch. KDTrainer shards the teacher, whole when the trainer is built, at the first step.
Writes OUT_DIR/rank{R}.json: the path taken, the loss, kd_loss on the models' logits, the
loss after the step, and the teacher's state (this rank's parameter bytes before and after,
each parameter's placements and rows here and in all, whether each is a DTensor after each
compute_loss, i.e. resharded, requires_grad and training).
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for the shared helpers

from helpers_trainer import markov_tokens, tiny_llama  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402
from transformers import TrainingArguments  # noqa: E402

import kdfast  # noqa: E402
from kdfast.integrations.hf import KDTrainer  # noqa: E402
from kdfast.train.runtime import leave_distributed  # noqa: E402

KD = {"temperature": 2.0, "hard_weight": 0.5, "soft_weight": 0.5}
LENGTH = 12


def models_and_batch() -> tuple:
    """(teacher, student, input_ids), the same in every process and in the test's one-process reference."""
    return tiny_llama(seed=0, width=32), tiny_llama(seed=1), markov_tokens(2 * LENGTH, seed=1).view(2, LENGTH)


def local_bytes(model: torch.nn.Module) -> int:
    """This process's bytes of the model's parameters (its shards of DTensors)."""
    local = [p.to_local() if isinstance(p, DTensor) else p for p in model.parameters()]
    return sum(t.numel() * t.element_size() for t in local)


def all_resharded(model: torch.nn.Module) -> bool:
    """Whether every parameter is its DTensor shard (an unsharded FSDP module holds plain whole tensors)."""
    return all(isinstance(p, DTensor) for p in model.parameters())


def main() -> None:
    out_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    args = TrainingArguments(output_dir=str(out_dir), report_to=[], use_cpu=True)  # joins the gloo group
    teacher, student, input_ids = models_and_batch()
    trainer = KDTrainer(model=student, teacher_model=teacher, args=args, loss_options=KD)
    for module in (*student.model.layers, student.lm_head, student):  # the output embedding gets its own shards
        fully_shard(module)
    whole_bytes = local_bytes(teacher)
    loss = trainer.compute_loss(student, {"input_ids": input_ids})
    sharded_bytes, resharded = local_bytes(teacher), all_resharded(teacher)
    print(f"rank {trainer.args.process_index}: teacher parameter bytes {whole_bytes} whole, {sharded_bytes} sharded",
          flush=True)
    parameters = {name: {"dtensor": isinstance(p, DTensor), "requires_grad": p.requires_grad,
                         "placements": [repr(x) for x in p.placements] if isinstance(p, DTensor) else [],
                         "local_rows": p.to_local().shape[0] if isinstance(p, DTensor) else p.shape[0],
                         "rows": p.shape[0], "students_mesh": isinstance(p, DTensor) and p.device_mesh ==
                         student.lm_head.weight.device_mesh} for name, p in teacher.named_parameters()}
    teacher_state = {"whole_bytes": whole_bytes, "sharded_bytes": sharded_bytes, "resharded": resharded,
                     "training": teacher.training or any(m.training for m in teacher.modules()),
                     "parameters": parameters}
    with torch.no_grad():
        expected = kdfast.kd_loss(student(input_ids).logits[:, :-1], teacher(input_ids).logits[:, :-1],
                                  labels=input_ids[:, 1:], **KD)
    loss.backward()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    optimizer.step()
    after = trainer.compute_loss(student, {"input_ids": input_ids})
    teacher_state["resharded_after_step"] = all_resharded(teacher)
    result = {"path": trainer.distill_loss.path, "loss": loss.item(), "expected": expected.item(),
              "after": after.item(), "teacher": teacher_state}
    (out_dir / f"rank{trainer.args.process_index}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
    leave_distributed()
