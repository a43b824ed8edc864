"""One rank's share of the vocabulary-parallel loss (kdfast.distributed.vocab_parallel_kd_loss): an
N x (V / tp) slice of the logits, forward and backward, in a process group of one (the collectives
are then local; what is timed is the per-shard work and the host side), against kd_loss on the same
slice (one fused kernel: the floor) and the torch backend's per-shard ops.

    python -m benchmarks.vocab_parallel --device cuda    # 8192 x 128256 / 8 in bf16: Triton's kernels
    python -m benchmarks.vocab_parallel                  # CPU: 1024 x 32000 / 4 in fp32, the torch backend

Per cell: the median time, the bytes the per-shard kernels must move (sweeps over the student and
teacher slices, and the gradient written) over that time, as a fraction of the copy bandwidth
measured in the same run, the peak memory above the inputs, and the loss's relative error against
kd_loss on the slice. One JSON line per cell, then a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import torch
import torch.distributed as dist

import kdfast
from benchmarks.measure import Timing, meter
from kdfast.backends.registry import resolve_backend
from kdfast.distributed import vocab_parallel_kd_loss

# (label, options): forward KL alone needs one collective; hard labels add a second; jsd reads the slices once more.
CELLS = (("forward_kl", {}), ("forward_kl+hard", {"hard_weight": 0.5, "soft_weight": 0.5}),
         ("jsd", {"divergence": "jsd", "beta": 0.5}))


def sweeps(options: dict) -> int:
    """Reads of the student and teacher slices by the per-shard kernels: statistics, (jsd's mixture,) gradient."""
    return 3 if options.get("divergence") == "jsd" else 2


def run_cell(label: str, options: dict, impl: str, backend: str, s: torch.Tensor, t: torch.Tensor, labels, m) -> dict:
    leaf = s.clone().requires_grad_()

    def step():
        leaf.grad = None
        loss_fn = kdfast.kd_loss if impl == "kd_loss" else vocab_parallel_kd_loss
        loss_fn(leaf, t, labels=labels, temperature=2.0, backend=backend, **options).backward()

    def reset():
        leaf.grad = None

    loss = vocab_parallel_kd_loss(s, t, labels=labels, temperature=2.0, backend=backend, **options) \
        if impl != "kd_loss" else kdfast.kd_loss(s, t, labels=labels, temperature=2.0, **options)
    floor = kdfast.kd_loss(s, t, labels=labels, temperature=2.0, **options)
    times = m.time(reset, step)
    peak = m.peak_extra(reset, step)
    median = statistics.median(times)
    nbytes = s.numel() * s.element_size() * (2 * sweeps(options) + 1)  # nominal: both slices per sweep, gradient
    return {"cell": label, "impl": impl, "backend": backend, "rows": s.shape[0], "width": s.shape[1],
            "dtype": str(s.dtype).removeprefix("torch."), "median_ms": median, "runs": len(times),
            "gb_per_s": nbytes / (median / 1e3) / 1e9, "peak_extra_mib": None if peak is None else peak / 2**20,
            "loss_rel_err": abs(loss.item() - floor.item()) / abs(floor.item())}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--rows", type=int, help="N (default: 8192 on cuda, 1024 on cpu)")
    parser.add_argument("--vocab", type=int, help="the full vocabulary V (default: 128256 on cuda, 32000 on cpu)")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks: the slice is V / tp wide (default: 8 / 4)")
    parser.add_argument("--backend", default="auto", help="the per-shard kernels' backend (default: auto)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    rows, vocab, tp = args.rows or (8192 if cuda else 1024), args.vocab or (128256 if cuda else 32000), \
        args.tp or (8 if cuda else 4)
    dtype = torch.bfloat16 if cuda else torch.float32
    with tempfile.TemporaryDirectory() as store:
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{os.path.join(store, 'store')}",
                                rank=0, world_size=1)
        try:
            gen = torch.Generator(device=args.device).manual_seed(0)
            width = vocab // tp
            s = (torch.randn(rows, width, generator=gen, device=args.device) * 3).to(dtype)
            t = (s.float() + torch.randn(rows, width, generator=gen, device=args.device) * 2).to(dtype)
            labels = torch.randint(0, width, (rows,), generator=gen, device=args.device)
            m = meter(args.device, Timing(min_seconds=0.5, max_runs=20))
            copy = m.copy_bandwidth(256 * 2**20)
            shard_backend = resolve_backend(args.backend, s.device, (dtype, dtype), "vocab_shard")
            impls = {"vocab-parallel": shard_backend, "vocab-parallel-torch": "torch", "kd_loss": "auto"}
            if shard_backend == "torch":
                del impls["vocab-parallel-torch"]
            results = []
            for label, options in CELLS:
                for impl, backend in impls.items():
                    result = run_cell(label, options, impl, backend, s, t, labels, m)
                    result["of_copy_bandwidth"] = result["gb_per_s"] * 1e9 / copy
                    results.append(result)
                    print(json.dumps(result), flush=True)
                    m.release()
        finally:
            dist.destroy_process_group()
    print(f"\none rank's slice: {rows} x {width} ({vocab} / {tp}) {dtype}, copy bandwidth {copy / 1e9:.0f} GB/s")
    print("| cell | impl (backend) | median ms | GB/s | of copy | peak MiB | loss err |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in results:
        peak = "-" if r["peak_extra_mib"] is None else f"{r['peak_extra_mib']:.0f}"
        print(f"| {r['cell']} | {r['impl']} ({r['backend']}) | {r['median_ms']:.3f} | {r['gb_per_s']:.1f} | "
              f"{r['of_copy_bandwidth']:.2f} | {peak} | {r['loss_rel_err']:.1e} |")


if __name__ == "__main__":
    main()
