"""Small GPU edge cases for both GPU backends, each against the float64 reference on the same device.

scripts/device_check.sh runs this once plainly (correctness, and it warms Triton's cache) and
then under compute-sanitizer memcheck, racecheck and synccheck; tests/backends/test_gpu.py runs
the same cases as tests. Shapes are tiny so that the sanitizers' slow-down stays in seconds.

    python scripts/gpu_cases.py [--device cuda|cpu] [--backends triton,cuda] [--quick]

--device cpu runs the Triton cases in Triton's interpreter (set TRITON_INTERPRET=1): the dry run.
Exit status 1 when any case is wrong or raises.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Callable, NamedTuple

import torch

VOCABS = (1, 17, 4095, 4097, 50257)  # a single entry, odd, one either side of a 4096 block, GPT-2's
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
TOLERANCE = 5e-3  # bf16 gradients; the loss is float32 math and far closer


class Case(NamedTuple):
    name: str
    backends: tuple[str, ...]
    run: Callable[[str, str], tuple[float, float]]  # (backend, device) -> (loss error, gradient error)


def rel_err(x, ref) -> float:
    x, ref = x.detach().double(), ref.detach().double()
    if not torch.isfinite(x).all():
        return float("inf")
    scale = ref.norm().item()
    return (x - ref).norm().item() / (scale if scale > 0 else 1.0)


def logits(shape, dtype, device, seed):
    # Made on the device: no host float64 copies at any size.
    gen = torch.Generator(device=device).manual_seed(seed)
    s = torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 3
    t = s + torch.randn(shape, generator=gen, device=device, dtype=torch.float32) * 2
    return s.to(dtype), t


def labels_with_ignored_rows(lead, vocab, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, vocab, lead, generator=gen, device=device)
    labels[torch.rand(lead, generator=gen, device=device) < 0.25] = -100
    labels.view(-1)[0] = -100  # at least one ignored row
    return labels


def compare(backend, student, teacher, *, inplace=False, sparse=None, **options):
    """kdfast's per-row loss and gradient (grad_output 0.5: the scaling path too) against the reference."""
    import kdfast
    from kdfast.reference import kd_loss_reference, sparse_kd_loss_reference

    leaf = student.detach().clone().requires_grad_()
    x = leaf * 1.0 if inplace else leaf  # in place needs a non-leaf, as an lm_head's output
    view = options.pop("view", lambda y: y)
    if sparse is None:
        rows = kdfast.kd_loss(view(x), teacher, backend=backend, reduction="none", inplace_backward=inplace, **options)
    else:
        rows = kdfast.sparse_kd_loss(view(x), *sparse, backend=backend, reduction="none", inplace_backward=inplace,
                                     **options)
    (rows * 0.5).sum().backward()
    s64 = student.detach().double().requires_grad_()
    if sparse is None:
        ref = kd_loss_reference(view(s64), teacher.double(), reduction="none", **options)
    else:
        ref = sparse_kd_loss_reference(view(s64), sparse[0], sparse[1], reduction="none", **options)
    (ref * 0.5).sum().backward()
    return rel_err(rows, ref), rel_err(leaf.grad, s64.grad)


def cases(quick: bool = False) -> list[Case]:
    vocabs = (1, 17, 4097) if quick else VOCABS
    out = []
    for v in vocabs:
        for i, div in enumerate(DIVERGENCES):
            out.append(Case(f"contiguous bf16 V={v} {div}", ("triton", "cuda"),
                            lambda b, d, v=v, div=div, i=i: compare(
                                b, *logits((4, v), torch.bfloat16, d, v + i), temperature=2.0, divergence=div)))
        # x[:, :-1] over the vocabulary: the row stride is V + 1 (unaligned); fp32 student, bf16 teacher
        out.append(Case(f"vocab slice x[:, :-1] fp32/bf16 V={v}", ("triton", "cuda"),
                        lambda b, d, v=v: (lambda s, t: compare(b, s, t[:, :-1].to(torch.bfloat16),
                                                                view=lambda y: y[:, :-1], divergence="jsd"))(
                            *logits((3, v + 1), torch.float32, d, v))))
        # logits[:, :-1] over the sequence, bf16 student, fp16 teacher, hard labels with ignored rows
        out.append(Case(f"sequence slice, hard labels, ignored rows bf16/fp16 V={v}", ("triton", "cuda"),
                        lambda b, d, v=v: (lambda s, t: compare(
                            b, s, t[:, :-1].to(torch.float16), view=lambda y: y[:, :-1], temperature=2.0,
                            labels=labels_with_ignored_rows((2, 3), v, d, v), hard_weight=0.5))(
                            *logits((2, 4, v), torch.bfloat16, d, v))))
        # the same in one dtype: rows off 16-byte boundaries (odd V) that Triton reads from the boundary below
        out.append(Case(f"sequence slice, hard labels bf16/bf16 V={v}", ("triton", "cuda"),
                        lambda b, d, v=v: (lambda s, t: compare(
                            b, s, t[:, :-1], view=lambda y: y[:, :-1], divergence="reverse_kl",
                            labels=labels_with_ignored_rows((2, 3), v, d, v), hard_weight=0.3))(
                            *logits((2, 4, v), torch.bfloat16, d, v))))
        for div in (DIVERGENCES if v > 4096 else ("forward_kl",)):
            out.append(Case(f"in place on logits[:, :-1] bf16 V={v} {div}", ("triton", "cuda"),
                            lambda b, d, v=v, div=div: (lambda s, t: compare(
                                b, s, t[:, :-1], inplace=True, view=lambda y: y[:, :-1], divergence=div,
                                labels=labels_with_ignored_rows((2, 2), v, d, v)))(
                                *logits((2, 3, v), torch.bfloat16, d, v))))
        k = min(v, 8)
        out.append(Case(f"sparse bucket K={k} bf16 V={v}", ("triton",),
                        lambda b, d, v=v, k=k: sparse_case(b, d, v, k)))
    return out + transform_cases(quick)


def transform_cases(quick: bool) -> list[Case]:
    """The logit transforms (softcap, logit_scale): every divergence, each side alone and both, a cap
    on logits ~100 (tanh saturates), the warp-wide (V <= 4096) and block-wide rows, misaligned rows
    (scalar head and tail entries), in place, hard labels, and raw -inf / +inf entries."""
    both = ("triton", "cuda")
    out = []
    for v in (1, 4097) if quick else (1, 4097, 50257):
        out.append(Case(f"softcap 30 on logits ~100, hard labels, ignored rows bf16 V={v} forward_kl", both,
                        lambda b, d, v=v: (lambda s, t: compare(
                            b, (s * 33).to(torch.bfloat16), t * 33, softcap=30.0, temperature=2.0,
                            labels=labels_with_ignored_rows((4,), v, d, v), hard_weight=0.5))(
                            *logits((4, v), torch.float32, d, v))))
    # a Granite-like student (raw logits 16x too large), on x[:, :-1]: the row stride is V + 1
    out.append(Case("logit_scale (1/16, None) on a vocab slice x[:, :-1] fp32/bf16 V=17 reverse_kl", both,
                    lambda b, d: (lambda s, t: compare(
                        b, s * 16, t[:, :-1].to(torch.bfloat16), view=lambda y: y[:, :-1], logit_scale=(0.0625, None),
                        divergence="reverse_kl"))(*logits((3, 18), torch.float32, d, 17))))
    out.append(Case("softcap (None, 30) in place on logits[:, :-1] bf16/fp16 V=4097 jsd", both,
                    lambda b, d: (lambda s, t: compare(
                        b, s, (t * 33)[:, :-1].to(torch.float16), inplace=True, view=lambda y: y[:, :-1],
                        softcap=(None, 30.0), divergence="jsd", beta=0.3,
                        labels=labels_with_ignored_rows((2, 2), 4097, d, 4097)))(
                        *logits((2, 3, 4097), torch.bfloat16, d, 4097))))
    out.append(Case("softcap (30, 20) and logit_scale (2, 0.5), hard labels fp16 V=17 tvd", both,
                    lambda b, d: (lambda s, t: compare(
                        b, s, t.to(torch.float16), softcap=(30.0, 20.0), logit_scale=(2.0, 0.5), divergence="tvd",
                        labels=labels_with_ignored_rows((4,), 17, d, 17), hard_weight=0.25))(
                        *logits((4, 17), torch.float16, d, 17))))
    for div in (*DIVERGENCES, "tvd"):
        out.append(Case(f"softcap 30 with raw -inf and +inf entries, hard labels on them fp32 V=17 {div}", both,
                        lambda b, d, div=div: infinite_entries_case(b, d, div)))
    return out


def infinite_entries_case(backend, device, divergence):
    """A cap maps raw -inf to -cap and +inf to +cap (dz/dx = 0 at both): no row is NaN, not even one
    whose label is such an entry, or where both sides are -inf."""
    s, t = logits((4, 17), torch.float32, device, 17)
    inf = float("inf")
    # Rows of 17 fp32 start 0, 4, 8, 12 bytes past 16-byte alignment: in the CUDA kernel, row 0's entry
    # 16 is a scalar tail and row 3's entry 0 a scalar head, the others are in 4-entry vectors.
    s[0, 3], t[0, 3], s[0, 16] = -inf, -inf, -inf
    s[1, 5], t[1, 7] = inf, -inf
    s[3, 0], t[3, 0] = -inf, inf
    labels = torch.tensor([16, 5, -100, 0], device=device)  # on -inf, on +inf, ignored, on -inf
    return compare(backend, s, t, softcap=30.0, divergence=divergence, labels=labels, hard_weight=0.5)


def sparse_case(backend, device, vocab, k):
    import kdfast

    s, t = logits((5, vocab), torch.bfloat16, device, vocab)
    ids, logprobs = kdfast.teacher_topk(t, k, temperature=2.0)
    ids[0, -1] = -1  # an empty slot
    return compare(backend, s, None, sparse=(ids, logprobs), temperature=2.0,
                   labels=labels_with_ignored_rows((5,), vocab, device, vocab), hard_weight=0.25)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="triton,cuda")
    parser.add_argument("--quick", action="store_true", help="V in {1, 17, 4097} only")
    args = parser.parse_args(argv)
    failed = 0
    for case in cases(args.quick):
        for backend in args.backends.split(","):
            if backend not in case.backends:
                continue
            start = time.perf_counter()
            try:
                loss_err, grad_err = case.run(backend, args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                ok = loss_err < 1e-4 and grad_err < TOLERANCE
                detail = f"errors {loss_err:.1e} / {grad_err:.1e}"
            except Exception as exc:  # one broken case must not hide the others
                first = (str(exc).strip().splitlines() or [""])[0][:160]
                ok, detail = False, f"{type(exc).__name__}: {first}"
            failed += not ok
            print(f"{'ok  ' if ok else 'FAIL'} {backend:6s} {case.name}: {detail} "
                  f"({time.perf_counter() - start:.2f} s)", flush=True)
    print(f"gpu_cases: {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
