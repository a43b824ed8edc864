"""The hand-written CUDA kernel (csrc/kd_cuda.cu, bound to torch by csrc/kd_cuda_binding.cpp).

It is taken from the module built at install time (``KDFAST_BUILD_CUDA=1 pip install
--no-build-isolation .``), else JIT-built with nvcc and ninja on first use, for the GPU
in use, and cached (see kdfast.backends.build).
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

from . import DIVERGENCE_CODES, Backend, KernelParams
from .build import build_failure, check_codes, cuda_jit_flags, load_extension

@functools.cache
def _extension():
    extension = load_extension("_kd_cuda", ["kd_cuda_binding.cpp", "kd_cuda.cu"],
                          headers=["kd_cuda.h", "kd_binding_checks.h"], cflags=["-O3"],
                          cuda_cflags=cuda_jit_flags(torch.cuda.get_device_capability()))
    check_codes(extension, "DIVERGENCE_CODES", DIVERGENCE_CODES)
    return extension


def _nvcc_missing() -> bool:
    from torch.utils import cpp_extension

    return cpp_extension.CUDA_HOME is None or not (Path(cpp_extension.CUDA_HOME) / "bin" / "nvcc").is_file()


@functools.cache
def unavailable_reason() -> str | None:
    if torch.version.cuda is None:
        return "torch was built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        _extension()
    except Exception as exc:  # a failed build shows up as many different exception types
        if _nvcc_missing():
            return ("nvcc not found (install the CUDA toolkit or set CUDA_HOME, or build at install time with "
                    "KDFAST_BUILD_CUDA=1)")
        return build_failure("CUDA extension", exc)
    return None


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    return _extension().kd_forward(student, teacher, labels, grad, coefs, *params)


def scale_grad_(grad, grad_output):
    """grad *= grad_output (one value), read on the device: no sync, and no pass over grad when it is 1."""
    _extension().scale_grad_(grad, grad_output)


BACKEND = Backend("cuda", ("cuda",), (torch.float32, torch.bfloat16, torch.float16), unavailable_reason, kd_forward,
                  scale_grad_=scale_grad_)
