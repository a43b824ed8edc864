"""Peak memory of the fused-linear path's teacher forward: every layer's hidden states kept
(``output_hidden_states=True``, the earlier way) against the final hidden state captured by a hook
(``kdfast.train.lm.run_for_hidden``), for kdfast's GPT and a Hugging Face Llama from configs.

    python -m benchmarks.teacher_memory                 # CPU: peak RSS above the models (VmHWM)
    python -m benchmarks.teacher_memory --device cuda   # torch.cuda.max_memory_allocated

Each (model, way) is measured in a process of its own (an allocator keeps what an earlier forward freed),
under no_grad as the teacher runs, after one warm-up forward; prints one JSON line per measurement and a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

MODELS = ("gpt", "llama")
WAYS = ("output_hidden_states", "hook")


def build(model: str, args):
    import torch
    import transformers

    from kdfast.train.models import GPT, GPTConfig

    torch.manual_seed(0)
    if model == "gpt":
        return GPT(GPTConfig(vocab_size=args.vocab, context=args.seq, n_layer=args.layers, n_head=8,
                             d_model=args.width))
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.width, intermediate_size=4 * args.width,
        num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
        max_position_embeddings=args.seq))


def measure(model_name: str, way: str, args) -> dict:
    import torch

    from kdfast.train.lm import _run, run_for_hidden
    from kdfast.train.runtime import peak_memory, reset_peak_memory

    device = torch.device(args.device)
    model = build(model_name, args).to(device).eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)

    def forward():
        if way == "hook":
            return run_for_hidden(model, ids, None)
        return _run(model, ids, None, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]

    with torch.no_grad():
        forward()  # warm-up: lazy initialisation, the allocator's first blocks
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        reset_peak_memory(device)
        start = torch.cuda.memory_allocated(device) if device.type == "cuda" else _rss_bytes()
        hidden = forward()
        peak = peak_memory(device)
    return {"model": model_name, "way": way, "peak_bytes": peak["peak_memory_bytes"],
            "peak_above_start_bytes": peak["peak_memory_bytes"] - start, "kind": peak["peak_memory_kind"],
            "hidden_bytes": hidden.numel() * hidden.element_size(), "layers": args.layers, "batch": args.batch,
            "seq": args.seq, "width": args.width, "vocab": args.vocab, "device": args.device}


def _rss_bytes() -> int:
    from kdfast.train.runtime import process_memory_kib

    return process_memory_kib("VmRSS") * 1024


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*args.one, args)))
        return
    passed = list(argv if argv is not None else sys.argv[1:])  # the children measure with the same settings
    rows = []
    for model in args.models:
        for way in WAYS:
            out = subprocess.run([sys.executable, "-m", "benchmarks.teacher_memory", *passed, "--one", model, way],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]), flush=True)
    print(f"\nteacher forward, {args.layers} layers x {args.width} wide, batch {args.batch} x {args.seq} tokens, "
          f"V={args.vocab}, {args.device} (peak above the start of the forward, MiB):")
    print("| model | output_hidden_states | hook | saved |")
    print("|---|---|---|---|")
    for model in args.models:
        kept, hooked = (next(r for r in rows if r["model"] == model and r["way"] == way)["peak_above_start_bytes"]
                        for way in WAYS)
        print(f"| {model} | {kept / 2**20:.0f} | {hooked / 2**20:.0f} | {(kept - hooked) / 2**20:.0f} |")


if __name__ == "__main__":
    main()
