"""The fused C++ CPU kernels, JIT-built with torch's cpp_extension on first use: the dense loss
(csrc/kd_cpu.cpp) and the sparse-teacher loss (csrc/kd_sparse_cpu.cpp), each its own extension,
so that a failed build of the sparse one leaves the dense loss working (``kernel_unavailable_reason``)."""

from __future__ import annotations

import functools

import torch

from . import (DIVERGENCE_CODES, SHARD_ROWS, SHARD_STATS, TAIL_CODES, Backend, KernelParams, SparseKernelParams,
               VocabShardKernels)
from .build import build_failure, check_codes, cpu_capability_flags, load_extension

def _build(name: str, source: str):
    variant, isa_flags = cpu_capability_flags()
    return load_extension(f"{name}_{variant}", [source], headers=["kd_binding_checks.h", "kd_cpu_common.h"],
                          cflags=["-O3", "-fopenmp", *isa_flags], ldflags=["-fopenmp"])


@functools.cache
def _extension():
    extension = _build("_kd_cpu", "kd_cpu.cpp")
    check_codes(extension, "DIVERGENCE_CODES", DIVERGENCE_CODES)
    check_codes(extension, "SHARD_STATS", {name: i for i, name in enumerate(SHARD_STATS)})
    check_codes(extension, "SHARD_ROWS", {name: i for i, name in enumerate(SHARD_ROWS)})
    return extension


@functools.cache
def _sparse_extension():
    extension = _build("_kd_sparse_cpu", "kd_sparse_cpu.cpp")
    check_codes(extension, "DIVERGENCE_CODES", DIVERGENCE_CODES)
    check_codes(extension, "TAIL_CODES", TAIL_CODES)
    return extension


def _failure(build, what: str) -> str | None:
    try:
        build()
    except Exception as exc:  # a missing compiler shows up as many different exception types
        return build_failure(what, exc)
    return None


@functools.cache
def unavailable_reason() -> str | None:
    return _failure(_extension, "C++ extension")


@functools.cache
def kernel_unavailable_reason(kernel: str) -> str | None:
    """Why ``kernel`` cannot run though the backend can (the sparse kernel's extension is built on its first use)."""
    return _failure(_sparse_extension, "sparse-teacher C++ extension") if kernel == "sparse_kd_forward" else None


def gradient_buffer(student):
    return _extension().gradient_buffer(student)


def empty_cache() -> None:
    if _extension.cache_info().currsize:  # nothing is kept before the extension is loaded
        _extension().empty_cache()


def kd_forward(student, teacher, labels, grad, coefs, params: KernelParams):
    return _extension().kd_forward(student, teacher, labels, grad, coefs, *params)


def sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, params: SparseKernelParams):
    return _sparse_extension().sparse_kd_forward(student, ids, logprobs, labels, grad, coefs, *params)


def vocab_shard_stats(student, teacher, params: KernelParams):
    return _extension().vocab_shard_stats(student, teacher, params.temperature, params.teacher_temperature,
                                          params.divergence, params.hard)


def vocab_shard_mixture(student, teacher, rows, params: KernelParams):
    return _extension().vocab_shard_mixture(student, teacher, rows.double().contiguous(), params.temperature,
                                            params.teacher_temperature, params.divergence, params.beta)


def vocab_shard_gradient(student, teacher, labels, grad, rows, params: KernelParams) -> None:
    _extension().vocab_shard_gradient(student, teacher, labels.long().contiguous(), grad, rows.double().contiguous(),
                                      params.temperature, params.teacher_temperature, params.divergence,
                                      params.beta, params.hard)


BACKEND = Backend("cpu", ("cpu",), (torch.float32, torch.bfloat16, torch.float16), unavailable_reason, kd_forward,
                  sparse_kd_forward=sparse_kd_forward, kernel_unavailable_reason=kernel_unavailable_reason,
                  gradient_buffer=gradient_buffer, empty_cache=empty_cache,
                  vocab_shard=VocabShardKernels(vocab_shard_stats, vocab_shard_mixture, vocab_shard_gradient))
