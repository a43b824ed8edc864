"""The Triton loss kernel's launch grid, timed: BLOCK x num_warps x the sweeps' pipelining depth
(tl.range num_stages), forward+backward, against the HBM floor of one read of both logits and one
write of the gradient. The first GPU run picks kdfast.backends.triton_kernels.launch_config from it.

    python -m benchmarks.triton_grid                          # on a GPU: N=8192, V in {50257, 128256}, bf16
    TRITON_INTERPRET=1 python -m benchmarks.triton_grid --n 4 --vocabs 300 --device cpu   # the mechanics only

Each configuration's loss must equal the default configuration's (to 1e-5) before it is timed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch

from kdfast.backends import KernelParams
from kdfast.backends.triton_kernels import LaunchConfig, kd_forward, launch_config

SHAPES = ((4096, 16), (2048, 8), (1024, 4))  # (BLOCK, num_warps)
STAGES = (None, 2, 3)  # None: a plain range, the compiler's default
HBM_BYTES_PER_S = 4.8e12  # the H200's


def time_ms(fn, device: torch.device, repeats: int) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=40)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--vocabs", type=int, nargs="+", default=[50257, 128256])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=3, help="CPU (interpreter) runs per configuration")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    params = KernelParams(2.0, 2.0, 0, 0.5, -100, False)  # forward KL, T = 2
    coefs = torch.tensor([1.0, 0.0], device=device)
    print("| V | BLOCK | warps | stages | fwd+bwd ms | x HBM floor | loss vs default |")
    print("|---|---|---|---|---|---|---|")
    for vocab in args.vocabs:
        gen = torch.Generator(device=device).manual_seed(0)
        student = torch.randn(1, args.n, vocab, device=device, generator=gen).mul_(3).bfloat16()
        teacher = torch.randn(1, args.n, vocab, device=device, generator=gen).mul_(3).bfloat16()
        grad = torch.empty_like(student)
        expected, _ = kd_forward(student, teacher, None, grad, coefs, params)
        floor_ms = 3 * student.numel() * student.element_size() / HBM_BYTES_PER_S * 1e3
        default = launch_config(vocab)
        for (block, warps), stages in itertools.product(SHAPES, STAGES):
            config = LaunchConfig(min(block, default.block), min(warps, default.num_warps), stages)
            rows, _ = kd_forward(student, teacher, None, grad, coefs, params, config)
            error = ((rows - expected).abs() / expected.abs().clamp_min(1e-30)).max().item()
            if not error <= 1e-5:
                print(f"| {vocab} | {config.block} | {config.num_warps} | {stages} | WRONG | | {error:.1e} |")
                continue
            ms = time_ms(lambda: kd_forward(student, teacher, None, grad, coefs, params, config), device,
                         args.repeats)
            floor = f"{ms / floor_ms:.2f}" if device.type == "cuda" else "-"
            print(f"| {vocab} | {config.block} | {config.num_warps} | {stages} | {ms:.3f} | {floor} | {error:.1e} |",
                  flush=True)


if __name__ == "__main__":
    main()
