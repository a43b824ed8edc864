"""Locating and building kdfast's compiled extensions.

An extension is taken from the module compiled at install time when there is one
(``KDFAST_BUILD_EXT=1 pip install --no-build-isolation .`` for the CPU kernel,
``KDFAST_BUILD_CUDA=1`` for the CUDA one), else JIT-compiled with torch's cpp_extension
and ninja on first use and cached under ``$KDFAST_CACHE`` (default ``~/.cache/kdfast``),
keyed by the torch version, the build flags and the sources.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from pathlib import Path

import torch


def source_dir() -> Path:
    """The C++/CUDA sources: packaged beside the module, or the repository's csrc/."""
    package = Path(__file__).resolve().parent.parent
    packaged = package / "_csrc"
    return packaged if packaged.is_dir() else package.parent / "csrc"


def cache_dir() -> Path:
    return Path(os.environ.get("KDFAST_CACHE", Path.home() / ".cache" / "kdfast"))


def cpu_capability_flags() -> tuple[str, list[str]]:
    """Compiler flags that make ATen's Vectorized use the widest SIMD torch itself uses here."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability == "AVX512":
        isa = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"]
        return "avx512", ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", *isa]
    if capability == "AVX2":
        return "avx2", ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return "default", ["-DCPU_CAPABILITY=DEFAULT"]


# nvcc flags of csrc/kd_cuda.cu. No --use_fast_math: its approximate exp2/log2 and
# flush-to-zero would cost the ~1e-6 relative accuracy the kernel keeps.
CUDA_COMMON_FLAGS = ["-O3", "-std=c++17"]
# An install-time build targets the A100 (sm_80) and the H100/H200 (sm_90), with PTX
# that newer GPUs compile when the module loads.
CUDA_NVCC_FLAGS = [*CUDA_COMMON_FLAGS, "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
                   "-gencode=arch=compute_90,code=compute_90"]


def cuda_jit_flags(capability: tuple[int, int]) -> list[str]:
    """nvcc flags of a JIT build, which targets only the GPU it runs on (one compile, not three)."""
    arch = f"{capability[0]}{capability[1]}"
    return [*CUDA_COMMON_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def load_extension(name: str, sources: list[str], *, cflags: list[str], ldflags: list[str] = (),
                   cuda_cflags: list[str] = (), headers: list[str] = ()):
    """Import kdfast.<name> if it was built at install time, else JIT-build it once and cache it.

    ``headers``: files of csrc/ that the sources include; they are part of the cache key.
    """
    try:
        return importlib.import_module(f"kdfast.{name}")
    except ImportError:
        pass
    from torch.utils import cpp_extension

    paths = [str(source_dir() / s) for s in sources]
    header_paths = [str(source_dir() / h) for h in headers]
    missing = [p for p in paths + header_paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"kdfast sources not found: {missing}")
    # The build directory depends on everything that changes the binary, so a
    # stale build is never loaded.
    key = hashlib.sha256()
    for part in [torch.__version__, *cflags, *ldflags, *cuda_cflags]:
        key.update(part.encode())
    for p in paths + header_paths:
        key.update(Path(p).read_bytes())
    build_dir = cache_dir() / f"{name}-{key.hexdigest()[:16]}"
    build_dir.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(
        name=name,
        sources=paths,
        extra_cflags=list(cflags),
        extra_ldflags=list(ldflags),
        extra_cuda_cflags=list(cuda_cflags),
        build_directory=str(build_dir),
        verbose=os.environ.get("KDFAST_VERBOSE_BUILD") == "1",
    )


def check_codes(extension, name: str, expected: dict[str, int]) -> None:
    """Refuses an extension whose compiled-in codes (its attribute ``name``) differ from Python's:
    a mismatch would compute another divergence than the one asked for."""
    compiled = dict(getattr(extension, name, {}))
    if compiled != expected:
        raise RuntimeError(f"{extension.__name__}.{name} = {compiled} differs from kdfast's {expected}: "
                           "the C++ sources and kdfast/backends/__init__.py disagree")


def build_failure(what: str, exc: Exception) -> str:
    """A one-line reason for available_backends() from a failed build (the compiler's last line)."""
    lines = str(exc).strip().splitlines()
    return f"the {what} could not be built ({type(exc).__name__}: {lines[-1] if lines else ''})"
