"""Backend selection: what each backend accepts, whether it works here, and what "auto" picks.

"auto" picks, for CUDA tensors, ``triton`` when Triton is importable, else ``cuda``
when its extension is built, else ``torch``; for CPU tensors ``cpu`` (the fused C++
kernel) unless it cannot be built or the logits are float64, then ``torch``.

The order of triton and cuda is provisional: no GPU measurements of the two exist yet.
It is to be decided from the H200 benchmark (the faster one first, by shape if the
answer depends on it), and the measurements recorded here.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from typing import NamedTuple

import torch

from . import Backend

# Each backend's module, imported on first use (Triton and the extensions are optional, and slow to load).
BACKEND_MODULES = {
    "triton": "kdfast.backends.triton_kernels",
    "cuda": "kdfast.backends.cuda_ext",
    "cpu": "kdfast.backends.cpu_ext",
    "torch": "kdfast.backends.torch_fallback",
}
BACKENDS = tuple(BACKEND_MODULES)


class BackendStatus(NamedTuple):
    available: bool
    reason: str  # why it is unavailable, or what it runs on

    def __repr__(self) -> str:
        return f"{'available' if self.available else 'unavailable'}: {self.reason}"


def backend(name: str) -> Backend:
    """The record of backend ``name`` (its module's BACKEND)."""
    return importlib.import_module(BACKEND_MODULES[name]).BACKEND


def unavailable_reason(name: str) -> str | None:
    try:
        record = backend(name)
    except ImportError as exc:
        return f"{exc.name or exc} is not installed"
    return record.unavailable_reason()


def kernel_unavailable_reason(name: str, kernel: str) -> str | None:
    """Why backend ``name``, available, cannot run ``kernel`` here (None when it can): it has no such
    kernel, or it builds that kernel separately (its optional ``kernel_unavailable_reason``) and the
    build failed."""
    record = backend(name)
    if record.kernel(kernel) is None:
        return f"backend={name!r} has no {kernel} kernel"
    return record.kernel_unavailable_reason(kernel)


def available_backends() -> dict[str, BackendStatus]:
    """Every backend, with whether it works in this process and, if not, why not."""
    status = {}
    for name in BACKENDS:
        reason = unavailable_reason(name)
        if reason is None:
            types = backend(name).device_types
            runs_on = "any device" if types is None else " and ".join(f"{t} tensors" for t in types)
            status[name] = BackendStatus(True, f"runs on {runs_on}")
        else:
            status[name] = BackendStatus(False, reason)
    return status


def empty_cache() -> None:
    """Releases the buffers backends keep between calls for reuse (the cpu backend keeps the
    last gradient buffer, as torch's CUDA allocator keeps freed blocks); the next call
    allocates afresh. Memory still in use is not affected."""
    for module_name in BACKEND_MODULES.values():
        module = sys.modules.get(module_name)  # a backend never imported keeps nothing
        if module is not None and module.BACKEND.empty_cache is not None:
            module.BACKEND.empty_cache()


_warned_fallback = False


def _auto(device: torch.device, dtypes: tuple[torch.dtype, ...], kernel: str) -> str:
    global _warned_fallback
    candidates = {"cuda": ("triton", "cuda"), "cpu": ("cpu",)}.get(device.type, ())
    for name in candidates:
        if unavailable_reason(name) is None and all(d in backend(name).dtypes for d in dtypes) \
                and kernel_unavailable_reason(name, kernel) is None:
            return name
    if device.type == "cpu" and torch.float64 not in dtypes and not _warned_fallback:
        reason = unavailable_reason("cpu")
        if reason is None and backend("cpu").kernel(kernel) is not None:
            reason = backend("cpu").kernel_unavailable_reason(kernel)
        if reason is not None:  # a fused kernel that cannot run here, not one the cpu backend lacks
            _warned_fallback = True
            warnings.warn(f"kdfast: the fused CPU kernel is unavailable ({reason}); "
                          "using the slower pure-PyTorch backend", RuntimeWarning, stacklevel=4)
    return "torch"


# Under torch.compile the choice is made once, while tracing, and baked into the graph.
@torch.compiler.assume_constant_result
def resolve_backend(requested: str, device: torch.device, dtypes: tuple[torch.dtype, ...],
                    kernel: str = "kd_forward") -> str:
    """The backend to run ``kernel``: ``requested`` checked against the logits, or the choice of "auto"."""
    if requested == "auto":
        return _auto(device, dtypes, kernel)
    reason = unavailable_reason(requested)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} is unavailable: {reason}")
    record = backend(requested)
    if record.kernel(kernel) is None:
        raise ValueError(f"backend={requested!r} has no {kernel} kernel; use backend='auto'")
    reason = record.kernel_unavailable_reason(kernel)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run {kernel}: {reason}")
    types = record.device_types
    if types is not None and device.type not in types:
        raise ValueError(f"backend={requested!r} runs on {' or '.join(types)} tensors, but the logits are on "
                         f"{device}; use backend='auto'")
    for dtype in dtypes:
        if dtype not in record.dtypes:
            names = ", ".join(str(d).removeprefix("torch.") for d in record.dtypes)
            raise ValueError(f"backend={requested!r} takes logits of dtype {names}, got {dtype}; "
                             "float64 logits run on backend='torch'")
    return requested
