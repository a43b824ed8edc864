"""The fused C++ CPU kernel (csrc/kd_cpu.cpp), JIT-built with torch's cpp_extension on first use."""

from __future__ import annotations

import functools

import torch

from .._build import build_failure, cpu_capability_flags, load_extension
from . import KernelParams

DEVICE_TYPES = ("cpu",)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _extension():
    variant, isa_flags = cpu_capability_flags()
    return load_extension(f"_kd_cpu_{variant}", ["kd_cpu.cpp"], headers=["kd_binding_checks.h"],
                          cflags=["-O3", "-fopenmp", *isa_flags], ldflags=["-fopenmp"])


@functools.cache
def unavailable_reason() -> str | None:
    try:
        _extension()
    except Exception as exc:  # a missing compiler shows up as many different exception types
        return build_failure("C++ extension", exc)
    return None


def gradient_buffer(student):
    return _extension().gradient_buffer(student)


def empty_cache() -> None:
    if _extension.cache_info().currsize:  # nothing is kept before the extension is loaded
        _extension().empty_cache()


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    return _extension().kd_forward(student, teacher, labels, grad, coefs, params.temperature, params.divergence,
                                   params.beta, params.ignore_index, params.hard)
