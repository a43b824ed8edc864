"""The named benchmark configurations, and the bars (the project's targets) each one judges.

A suite is a list of cases, each an input set (problem, N, V, dtype) with the divergences, modes
and implementations (fnmatch patterns of names in ``peers``) to run on it; every combination of
one case is a "group", and every implementation in a group a "cell". A bar selects cells by
their fields and compares one metric of each with a limit (see ``report.derive`` for the metrics).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .measure import Timing, Tolerance
from .peers import DIVERGENCES
from .problems import MODES, VARIANTS, FusedLinearProblem, LogitsProblem, SparseProblem

VOCABS = (32000, 50257, 128256, 151936, 262144)
ALL = ("*",)
NO_COMPILE = ("kdfast-*", "classic", "eager", "liger-*")
# Loss: fp32 math on the given inputs lands near 1e-6. Gradient: rounding it to bf16 alone costs
# ~1e-3; 4e-3 is the GPU suite's bound. Fused linear in bf16: the logits are bf16 GEMM outputs, whose
# rounding moves every implementation ~1e-2 away from the float64 GEMMs of the same inputs.
TOLERANCES = {
    ("logits", "fp32"): Tolerance(loss=1e-4, grad=1e-4),
    ("logits", "bf16"): Tolerance(loss=1e-4, grad=4e-3),
    ("fused", "fp32"): Tolerance(loss=1e-4, grad=1e-4),
    ("fused", "bf16"): Tolerance(loss=2e-3, grad=3e-2),
    ("sparse", "fp32"): Tolerance(loss=1e-4, grad=1e-4),
    ("sparse", "bf16"): Tolerance(loss=1e-4, grad=4e-3),
}


@dataclass(frozen=True)
class Case:
    problem: str  # "logits", "fused" or "sparse"
    n: int
    v: int
    dtype: str  # "fp32" or "bf16"
    divergences: tuple[str, ...] = DIVERGENCES
    modes: tuple[str, ...] = MODES
    impls: tuple[str, ...] = ALL
    hs: int = 0  # fused: the student's and the teacher's hidden sizes
    ht: int = 0
    k: int = 0  # sparse: the teacher's ids per position
    variant: str = "plain"  # logits: how the loss is called (problems.VARIANTS)

    def build(self, device: str, temperature: float):
        if self.problem == "fused":
            return FusedLinearProblem(self.n, self.v, self.hs, self.ht, self.dtype, device)
        if self.problem == "sparse":  # the teacher's log-probabilities are at the loss's temperature
            return SparseProblem(self.n, self.v, self.k, self.dtype, device, temperature)
        return LogitsProblem(self.n, self.v, self.dtype, device, variant=self.variant)


def _variants(n: int, v: int, impls: tuple[str, ...]) -> tuple[Case, ...]:
    """One bf16 forward KL forward+backward case per variant but plain, kdfast only: a padded vocabulary
    (vocab_size 293 short of the row), logits[:, :-1], hard labels with 25 % ignored, grad_output 0.5 without
    and with expected_grad_output."""
    return tuple(Case("logits", n, v, "bf16", divergences=("forward_kl",), modes=("fwd+bwd",), impls=impls,
                      variant=name) for name in VARIANTS if name != "plain")


@dataclass(frozen=True)
class Bar:
    label: str
    where: dict  # cell field -> accepted value (or tuple of values)
    metric: str  # time_ms, x_floor, grad_err, loss_err, peak_over_grad, speedup:<impl>, time_ratio:<impl>, ...
    op: str  # "<=" or ">="
    limit: float


@dataclass(frozen=True)
class Suite:
    name: str
    device: str
    description: str
    cases: tuple[Case, ...]
    bars: tuple[Bar, ...] = ()
    temperature: float = 2.0
    timing: Timing = field(default_factory=Timing)
    copy_mib: int = 256  # the source buffer of the copy-bandwidth measurement
    budget_s: Optional[float] = None  # cells not started by then are skipped (the run must fit a time slot)

    @property
    def command(self) -> str:
        return f"python -m benchmarks.run --suite {self.name} --device {self.device}"


def _grid(n: int, dtypes, vocabs, **case) -> tuple[Case, ...]:
    return tuple(Case("logits", n, v, dtype, **case) for dtype in dtypes for v in vocabs)


def _cpu_core() -> Suite:
    kdfast = {"impl": "kdfast-cpu", "divergence": "forward_kl", "mode": "fwd+bwd"}
    return Suite(
        "cpu-core", "cpu",
        "The CPU headline: N=2048, V=32000, T=2, forward+backward, fp32 and bf16, all divergences "
        "(the bars on forward_kl), kdfast's fused CPU kernel against the peers, in one run.",
        _grid(2048, ("fp32", "bf16"), (32000,), modes=("fwd+bwd",),
              impls=("kdfast-cpu*", "classic", "eager", "compile")),
        bars=(Bar("kdfast >= 2x faster than torch.compile", kdfast, "speedup:compile", ">=", 2.0),
              Bar("kdfast >= 15x faster than careful eager", kdfast, "speedup:eager", ">=", 15.0),
              Bar("peak extra memory <= 1.25x the gradient", kdfast, "peak_over_grad", "<=", 1.25)),
        timing=Timing(warmup=1, min_runs=5, min_seconds=2.0),
    )


def _gpu_core() -> Suite:
    impls = ("kdfast-triton*", "kdfast-cuda*", "classic", "eager", "compile", "liger-*")
    head = {"impl": "kdfast-triton", "v": 128256, "divergence": "forward_kl"}
    return Suite(
        "gpu-core", "cuda",
        "The GPU headline: N=8192, V=128256, bf16, T=2, forward_kl forward+backward and forward; "
        "V=32000 and 262144, reverse_kl and jsd forward+backward.",
        (Case("logits", 8192, 128256, "bf16", divergences=("forward_kl",), impls=impls),
         Case("logits", 8192, 128256, "bf16", divergences=("reverse_kl", "jsd"), modes=("fwd+bwd",), impls=impls),
         Case("logits", 8192, 32000, "bf16", divergences=("forward_kl",), modes=("fwd+bwd",), impls=impls),
         Case("logits", 8192, 262144, "bf16", divergences=("forward_kl",), modes=("fwd+bwd",), impls=impls)),
        bars=(Bar("fwd+bwd <= 1.9 ms", {**head, "mode": "fwd+bwd"}, "time_ms", "<=", 1.9),
              Bar("gradient rel-L2 error <= 4e-3", {**head, "mode": "fwd+bwd"}, "grad_err", "<=", 4e-3),
              # +1%: the per-row loss buffers and the allocator's rounding of the gradient's block
              Bar("peak extra memory <= the gradient", {**head, "mode": "fwd+bwd"}, "peak_over_grad", "<=", 1.01),
              Bar("inplace_backward: peak extra memory ~0", {**head, "impl": "kdfast-triton-inplace"},
                  "peak_over_grad", "<=", 0.01),
              Bar("forward only <= 1.2 ms", {**head, "mode": "fwd"}, "time_ms", "<=", 1.2),
              Bar("V=32000 and V=262144 within 1.3x of the floor",
                  {**head, "v": (32000, 262144), "mode": "fwd+bwd"}, "x_floor", "<=", 1.3),
              Bar("reverse_kl and jsd within 1.5x of the floor",
                  {**head, "divergence": ("reverse_kl", "jsd"), "mode": "fwd+bwd"}, "x_floor", "<=", 1.5)),
        copy_mib=2048,
    )


def _gpu_extra() -> Suite:
    # Extra shapes for the first GPU run: an unaligned V (GPT-2's 50257, no 16-element
    # vectors) and fp32 logits at the headline V, kdfast's kernels only, under a small budget.
    impls = ("kdfast-triton*", "kdfast-cuda*")
    return Suite(
        "gpu-extra", "cuda",
        "The unaligned, fp32 and training-call cells: N=8192, V=50257 bf16 forward_kl forward and forward+backward, "
        "V=128256 fp32 forward_kl forward+backward, and at V=151643 bf16 a vocab_size slice of 151936, "
        "logits[:, :-1], hard labels with 25 % ignored rows, grad_output 0.5 with and without "
        "expected_grad_output; kdfast's GPU kernels; starts no cell after 40 s.",
        (Case("logits", 8192, 50257, "bf16", divergences=("forward_kl",), impls=impls),
         Case("logits", 8192, 128256, "fp32", divergences=("forward_kl",), modes=("fwd+bwd",), impls=impls))
        + _variants(8192, 151643, impls),
        timing=Timing(warmup_ms=10, rep_ms=40), copy_mib=2048, budget_s=40.0)


def _fused_linear(device: str) -> Suite:
    if device == "cuda":
        cases = tuple(Case("fused", n, 128256, "bf16", divergences=("forward_kl",), modes=("fwd+bwd",),
                           hs=2048, ht=4096) for n in (8192, 16384))
        return Suite("fused-linear", device,
                     "The fused linear loss on the GPU: N=8192 and 16384, Hs=2048, Ht=4096, V=128256, bf16, forward_kl, "
                     "forward+backward with gradients for the student's hidden states and weight; x floor is "
                     "against the GEMM floor at the matmul rate measured in the same run.",
                     cases, copy_mib=2048)
    kdfast = {"impl": "kdfast-fused", "divergence": "forward_kl", "mode": "fwd+bwd"}
    return Suite(
        "fused-linear", device,
        "The fused linear loss on the CPU: N=4096, Hs=Ht=512, V=32000, fp32, forward_kl, forward+backward.",
        (Case("fused", 4096, 32000, "fp32", divergences=("forward_kl",), modes=("fwd+bwd",), hs=512, ht=512),),
        bars=(Bar("peak extra memory <= 1/8 of matmuls + careful eager", kdfast, "mem_ratio:mm+eager", "<=", 1 / 8),
              Bar("time <= 1.1x matmuls + kd_loss on full logits", kdfast, "time_ratio:mm+kdfast", "<=", 1.1)),
        timing=Timing(warmup=1, min_runs=5, min_seconds=0.0),
    )


def _sparse(device: str) -> Suite:
    sizes = {"n": 2048, "v": 32000} if device == "cpu" else {"n": 8192}
    kdfast = {"impl": f"kdfast-{'cpu' if device == 'cpu' else 'triton'}", **sizes, "divergence": "forward_kl",
              "mode": "fwd+bwd"}
    bars = (Bar("kdfast >= 2x faster than torch.compile", kdfast, "speedup:compile", ">=", 2.0),
            Bar("peak extra memory <= 1.1x the gradient", kdfast, "peak_over_grad", "<=", 1.1))

    def cases(n, vocabs, dtypes, ks, impls):
        return tuple(Case("sparse", n, v, dtype, divergences=("forward_kl",), modes=("fwd+bwd",), impls=impls, k=k)
                     for dtype in dtypes for v in vocabs for k in ks)
    if device == "cpu":
        return Suite(
            "sparse", "cpu",
            "Sparse teachers on the CPU: sparse_kd_loss (tail bucket, forward KL, T=2) forward+backward against a teacher's "
            "top-K float32 log-probabilities, K = 16, 64, 256, at N=2048, V=32000, fp32 and bf16 student logits, "
            "against a careful eager version of the same formula and its torch.compile in one run; then "
            "N=8192 and V=262144 at K=64 against careful eager.",
            cases(2048, (32000,), ("fp32", "bf16"), (16, 64, 256), ("kdfast-cpu*", "eager", "compile"))
            + cases(8192, (32000,), ("fp32", "bf16"), (64,), ("kdfast-cpu*", "eager"))
            + cases(2048, (262144,), ("fp32", "bf16"), (64,), ("kdfast-cpu*", "eager")),
            bars=(Bar("kdfast >= 5x faster than careful eager", kdfast, "speedup:eager", ">=", 5.0), *bars),
            timing=Timing(warmup=1, min_runs=5, min_seconds=1.0))
    impls = ("kdfast-triton*", "kdfast-cuda*", "eager", "compile")
    return Suite(
        "sparse", "cuda",
        "Sparse teachers on the GPU: sparse_kd_loss (tail bucket, forward KL, T=2) forward+backward, N=8192, bf16 student "
        "logits, a teacher's top-K float32 log-probabilities, K = 16, 64, 256 at V=32000 and 128256, K=64 at "
        "V=262144, against careful eager and its torch.compile; starts no cell after 5 minutes.",
        cases(8192, (32000, 128256), ("bf16",), (16, 64, 256), impls) + cases(8192, (262144,), ("bf16",), (64,), impls),
        bars=bars, timing=Timing(warmup_ms=10, rep_ms=40), copy_mib=2048, budget_s=300.0)


def _quick(device: str) -> Suite:
    if device == "cpu":
        # Seconds per torch.compile graph and a slow torch fallback on a CPU: those run on one V only.
        cases = [Case("logits", 8, 32000, "fp32", divergences=("forward_kl",)),
                 Case("logits", 8, 32000, "fp32", divergences=("reverse_kl", "jsd"), impls=NO_COMPILE),
                 Case("logits", 8, 32000, "bf16", impls=NO_COMPILE)]
        cases += _grid(8, ("fp32", "bf16"), VOCABS[1:], impls=("kdfast-cpu*", "classic", "eager"))
        cases += _variants(8, 1000, ("kdfast-cpu*",))
        cases += [Case("sparse", 8, 32000, "fp32", divergences=("forward_kl",), k=16),
                  Case("sparse", 8, 32000, "fp32", divergences=("reverse_kl", "jsd"), impls=NO_COMPILE, k=16),
                  Case("sparse", 8, 32000, "bf16", impls=NO_COMPILE, k=64)]
        cases, timing = tuple(cases), Timing(warmup=0, min_runs=3, min_seconds=0.0)
    else:
        cases = _grid(256, ("bf16", "fp32"), (32000,)) + _grid(256, ("bf16", "fp32"), VOCABS[1:], impls=NO_COMPILE)
        cases += (Case("sparse", 256, 32000, "bf16", k=64),)
        timing = Timing(warmup_ms=5, rep_ms=20)
    return Suite("quick", device, "Smoke test: tiny sizes over the whole grid; correctness asserted, timings only "
                 "reported.", cases, timing=timing, copy_mib=64)


def _full(device: str) -> Suite:
    if device == "cpu":
        return Suite("full", "cpu", "The grid on the CPU: N=256, every V, fp32 and bf16, every divergence, "
                     "forward and forward+backward, every implementation.",
                     _grid(256, ("fp32", "bf16"), VOCABS), timing=Timing(warmup=1, min_runs=5, min_seconds=0.5))
    # torch.compile's compilations (seconds each, 60 of them) come last, after every kdfast cell, and
    # the most telling input sets first: if the time budget runs out, what is left out matters least.
    order = (128256, 32000, 262144, 151936, 50257)
    return Suite("full", "cuda", "The grid on the GPU: N=8192, every V, bf16 and fp32, every divergence, forward "
                 "and forward+backward, every implementation (torch.compile last); starts no cell after 7.5 minutes.",
                 _grid(8192, ("bf16", "fp32"), order, impls=NO_COMPILE)
                 + _grid(8192, ("bf16", "fp32"), order, impls=("compile",)),
                 timing=Timing(warmup_ms=10, rep_ms=40), copy_mib=2048, budget_s=450.0)


def get(name: str, device: str, missing_ok: bool = False) -> Optional[Suite]:
    """The suite ``name`` for ``device`` (cpu-core and gpu-core exist for one device only)."""
    makers = {"quick": _quick, "full": _full, "fused-linear": _fused_linear, "sparse": _sparse,
              "cpu-core": lambda d: _cpu_core() if d == "cpu" else None,
              "gpu-core": lambda d: _gpu_core() if d == "cuda" else None,
              "gpu-extra": lambda d: _gpu_extra() if d == "cuda" else None}
    suite = makers[name](device)
    if suite is None and not missing_ok:
        raise ValueError(f"suite {name!r} runs on {'cpu' if name == 'cpu-core' else 'cuda'} only, not on {device}")
    return suite


NAMES = ("quick", "full", "cpu-core", "gpu-core", "gpu-extra", "fused-linear", "sparse")
