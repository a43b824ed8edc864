"""TRL's GKDTrainer with its own loss against kdfast's GKDTrainer (logits and fused-linear paths):
median time per training step and the process's peak memory, each variant in a process of its own.

    python -m benchmarks.trl_step                       # CPU, Llama-shaped models, V = 32000
    python -m benchmarks.trl_step --vocab 128256 --steps 8 --device cuda

Models are random Llama configs (the teacher twice the student's width); batches are prompt +
completion token ids (the prompt masked), lmbda = 0 (off-policy, no generation), fp32. Peak memory
is the process's peak RSS on the CPU (VmHWM, which includes the models and the framework) or
torch.cuda.max_memory_allocated on a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

VARIANTS = ("trl", "kdfast-logits", "kdfast-fused_linear")


def word_tokenizer(vocab: int):
    """A word-level tokenizer over ``vocab`` ids (0 pad, 1 bos, 2 eos): what GKDTrainer needs of one,
    without downloading any."""
    import tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    model = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="<pad>"))
    model.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def run_variant(variant: str, args) -> dict:
    """Trains ``args.steps`` steps with one variant in this process; returns its measurements."""
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    import datasets
    import torch
    import transformers
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gkd import GKDTrainer as TRLGKDTrainer

    from kdfast.integrations.trl import GKDTrainer
    from kdfast.train.runtime import peak_memory, reset_peak_memory

    def llama(width: int, seed: int):
        torch.manual_seed(seed)
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=args.vocab, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=args.seq, pad_token_id=0,
            bos_token_id=1, eos_token_id=2))

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch * (args.steps + 2), args.seq), generator=gen)
    dataset = datasets.Dataset.from_dict({"ids": ids.tolist()})
    prompt = args.seq // 4

    def collate(rows):
        batch = torch.tensor([row["ids"] for row in rows])
        labels = batch.clone()
        labels[:, :prompt] = -100
        return {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": labels,
                "prompts": batch[:, :prompt], "prompt_attention_mask": torch.ones_like(batch[:, :prompt])}

    step_times = []

    class Clock(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.started = time.perf_counter()

        def on_step_end(self, *_, **__):
            if args.device == "cuda":
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.started)

    config = GKDConfig(output_dir=tempfile.mkdtemp(), max_steps=args.steps, per_device_train_batch_size=args.batch,
                       learning_rate=1e-4, report_to=[], save_strategy="no", lmbda=0.0, beta=0.5, bf16=False,
                       use_cpu=args.device == "cpu", logging_steps=1, disable_dropout=True)
    trainer_class, extra = (TRLGKDTrainer, {}) if variant == "trl" else \
        (GKDTrainer, {"loss_path": variant.removeprefix("kdfast-")})
    trainer = trainer_class(model=llama(args.width, 1), teacher_model=llama(2 * args.width, 2), args=config,
                            train_dataset=dataset, data_collator=collate, processing_class=word_tokenizer(args.vocab),
                            callbacks=[Clock()], **extra)
    device = torch.device(args.device)
    reset_peak_memory(device)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    timed = step_times[1:]  # the first step pays for one-time setup
    return {"variant": variant, "median_step_s": statistics.median(timed), "steps_timed": len(timed),
            "first_loss": losses[0], "last_loss": losses[-1], **peak_memory(device)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--width", type=int, default=256, help="the student's hidden size (the teacher's is twice)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # a child process's one variant
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(run_variant(args.variant, args)))
        return 0
    rows = []
    passed = sys.argv[1:] if argv is None else argv
    for variant in VARIANTS:
        child = subprocess.run([sys.executable, "-m", "benchmarks.trl_step", *passed, "--variant", variant],
                               capture_output=True, text=True, check=True)
        rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"GKDTrainer steps, V={args.vocab}, student width {args.width}, batch {args.batch} x {args.seq} tokens, "
          f"{args.device}, median of {base['steps_timed']} steps")
    print("| variant | step (s) | vs TRL | peak memory (GB) | vs TRL | first / last loss |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['variant']} | {row['median_step_s']:.3f} | {base['median_step_s'] / row['median_step_s']:.2f}x "
              f"| {row['peak_memory_bytes'] / 1e9:.2f} | {row['peak_memory_bytes'] / base['peak_memory_bytes']:.2f}x "
              f"| {row['first_loss']:.4f} / {row['last_loss']:.4f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
