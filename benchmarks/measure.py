"""Timing, peak memory, bandwidth and correctness, on the CPU and on a CUDA GPU.

CPU timing: wall-clock (perf_counter) of single runs after the correctness run and ``warmup``
more, until at least ``min_runs`` runs and ``min_seconds`` have passed; gradients are freed
before each run, outside the timed region (as ``zero_grad(set_to_none=True)`` would).

CPU peak memory: torch keeps no allocator statistics for the CPU, so this is the increase of the
process's resident set during one run: write "5" to /proc/self/clear_refs (which resets the
high-water mark VmHWM to the current RSS), read VmRSS, run, read VmHWM. Tensors this large are
mmapped by glibc and returned to the OS when freed, so the high-water mark sees every temporary;
blocks below glibc's mmap threshold (at most 32 MiB) may reuse freed heap and go unseen, so
the figure is exact only for large tensors. The gradient, still alive at the end, is included.
The gradient buffer kdfast's cpu backend keeps for reuse between calls is released first, so
it counts as memory of the run, as a fresh one would (timed runs reuse it, as training steps do).

GPU timing: ``triton.testing.do_bench`` (CUDA events, L2 flushed before every run, so the
inputs never start in cache); its median, with the gradients freed inside each timed call.
GPU peak memory: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before the run (the inputs).
"""

from __future__ import annotations

import ctypes
import gc
import importlib.metadata
import math
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

import kdfast
from kdfast.train.runtime import process_memory_kib, reset_peak_rss

PEER_SANITY = 0.1  # a peer off by more than this (relative) is broken, not just imprecise


@dataclass(frozen=True)
class Timing:
    warmup: int = 1  # CPU: untimed runs after the correctness run
    min_runs: int = 5
    min_seconds: float = 1.0
    max_runs: int = 50
    warmup_ms: int = 25  # GPU: do_bench's warm-up and measurement time
    rep_ms: int = 100


@dataclass(frozen=True)
class Tolerance:
    loss: float  # relative error of the loss
    grad: float  # relative L2 error of each gradient


def summarize(times_ms: list[float]) -> dict:
    qs = statistics.quantiles(times_ms, n=5, method="inclusive") if len(times_ms) > 1 else times_ms * 4
    return {"median": statistics.median(times_ms), "p20": qs[0], "p80": qs[3], "min": min(times_ms),
            "max": max(times_ms), "runs": len(times_ms), "all": times_ms}


def _malloc_trim() -> None:
    """Give freed heap memory back to the OS (glibc), so it cannot hide a new allocation."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class CpuMeter:
    device = "cpu"

    def __init__(self, timing: Timing):
        self.timing = timing

    def sync(self) -> None:
        pass

    def time(self, reset: Callable, step: Callable, warmup: Optional[int] = None) -> list[float]:
        t = self.timing
        for _ in range(t.warmup if warmup is None else warmup):
            reset()
            step()
        times, start = [], time.perf_counter()
        while len(times) < t.max_runs and (len(times) < t.min_runs or time.perf_counter() - start < t.min_seconds):
            reset()
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
        reset()
        return times

    def peak_extra(self, reset: Callable, step: Callable) -> Optional[int]:
        reset()
        kdfast.empty_cache()
        _malloc_trim()
        try:
            if not reset_peak_rss():
                return None  # not Linux, or clear_refs not writable here
            before = process_memory_kib("VmRSS")
        except (OSError, KeyError):
            return None
        step()
        return (process_memory_kib("VmHWM") - before) * 1024

    def copy_bandwidth(self, nbytes: int) -> float:
        """Bytes read + written per second by a large ``copy_`` (torch's threads, as the kernels use)."""
        src = torch.ones(nbytes // 4, dtype=torch.float32)
        dst = torch.zeros_like(src)
        times = self.time(lambda: None, lambda: dst.copy_(src), warmup=2)
        return 2 * src.nbytes / (statistics.median(times) / 1e3)

    def matmul_rate(self, m: int, k: int, n: int, dtype: torch.dtype) -> float:
        a = torch.randn(m, k).to(dtype)
        b = torch.randn(k, n).to(dtype)
        times = self.time(lambda: None, lambda: a @ b)
        return 2 * m * k * n / (statistics.median(times) / 1e3)

    def release(self) -> None:
        """Between input sets (a full collection costs ~0.2 s with torch loaded)."""
        gc.collect()


class CudaMeter:
    device = "cuda"

    def __init__(self, timing: Timing):
        self.timing = timing

    def sync(self) -> None:
        torch.cuda.synchronize()

    def _bench(self, fn: Callable) -> list[float]:
        from triton.testing import do_bench

        return list(do_bench(fn, warmup=self.timing.warmup_ms, rep=self.timing.rep_ms, return_mode="all"))

    def time(self, reset: Callable, step: Callable) -> list[float]:
        def run():
            reset()
            step()
        times = self._bench(run)
        reset()
        return times

    def peak_extra(self, reset: Callable, step: Callable) -> Optional[int]:
        reset()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def copy_bandwidth(self, nbytes: int) -> float:
        """Bytes read + written per second by a device-to-device copy."""
        src = torch.ones(nbytes // 2, dtype=torch.bfloat16, device="cuda")
        dst = torch.empty_like(src)
        return 2 * src.nbytes / (statistics.median(self._bench(lambda: dst.copy_(src))) / 1e3)

    def matmul_rate(self, m: int, k: int, n: int, dtype: torch.dtype) -> float:
        a = torch.randn(m, k, device="cuda", dtype=dtype)
        b = torch.randn(k, n, device="cuda", dtype=dtype)
        return 2 * m * k * n / (statistics.median(self._bench(lambda: a @ b)) / 1e3)

    def release(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def meter(device: str, timing: Timing):
    return CudaMeter(timing) if device == "cuda" else CpuMeter(timing)


def rel_l2(x: Optional[Tensor], ref: Tensor) -> float:
    """||x - ref|| / ||ref|| in float64, a block of rows at a time; inf when x is missing or not finite."""
    if x is None:
        return math.inf
    num = den = 0.0
    step = max(1, (1 << 24) // max(1, ref[0].numel()))
    for r0 in range(0, ref.shape[0], step):
        a, b = x[r0:r0 + step].detach().double(), ref[r0:r0 + step].double()
        num += (a - b).square().sum().item()
        den += b.square().sum().item()
    err = math.sqrt(num) / (math.sqrt(den) or 1.0)
    return err if math.isfinite(err) else math.inf


def errors(loss: Tensor, grads: list[Optional[Tensor]], ref_loss: float, ref_grads: list[Tensor]):
    """(relative error of the loss, the largest relative L2 error of the gradients, or None without any)."""
    value = float(loss.detach().double())
    loss_err = abs(value - ref_loss) / (abs(ref_loss) or 1.0) if math.isfinite(value) else math.inf
    grad_err = max(rel_l2(g, r) for g, r in zip(grads, ref_grads)) if grads else None
    return loss_err, grad_err


def verdict(kind: str, loss_err: float, grad_err: Optional[float], tol: Tolerance) -> str:
    """"ok" within tolerance; "inexact" for a peer that is imprecise (bf16 math) but sane; else "WRONG"."""
    measured = [(loss_err, tol.loss)] + ([(grad_err, tol.grad)] if grad_err is not None else [])
    if all(err <= limit for err, limit in measured):
        return "ok"
    if kind == "peer" and all(err <= PEER_SANITY for err, _ in measured):
        return "inexact"
    return "WRONG"


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    try:  # read-only queries; --no-optional-locks keeps `status` from touching the index
        out = subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    """Machine, versions and load: what a reader needs to compare two runs."""
    import kdfast

    commit = _git("rev-parse", "--short", "HEAD")
    if commit and _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    meminfo = Path("/proc/meminfo")
    mem_kb = int(meminfo.read_text().split()[1]) if meminfo.exists() else 0
    env = {"cpu": _cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "memory_gib": round(mem_kb / 2**20, 1), "platform": platform.platform(),
           "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "triton": _version("triton"), "liger_kernel": _version("liger-kernel"),
           "kdfast": f"{kdfast.__version__}, commit {commit}" if commit else kdfast.__version__,
           "kdfast_backends": {name: repr(status) for name, status in kdfast.available_backends().items()},
           "load_avg_before": [round(x, 2) for x in os.getloadavg()]}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1))
    return env


def machine_slug(env: dict) -> str:
    """A folder name for the machine: the GPU's name, or the CPU's model and core count."""
    name = env.get("gpu") or re.sub(r"\(R\)|\(TM\)|\bCPU\b|\bProcessor\b|@.*", " ", env["cpu"])
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug if env.get("gpu") else f"cpu-{slug}-{env['cpu_count']}c"
