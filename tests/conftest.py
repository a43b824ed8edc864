"""Shared fixtures: fresh random inputs every run (the seed is printed, KDFAST_TEST_SEED replays it),
and the list of backends that can run here."""

import os
import zlib

import pytest
import torch

# Without a GPU, Triton kernels run in Triton's interpreter on CPU tensors, so the
# triton backend is tested everywhere. This must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import kdfast  # noqa: E402

SEED = int(os.environ.get("KDFAST_TEST_SEED", int.from_bytes(os.urandom(4), "little")))


def pytest_report_header(config):
    return [f"kdfast test seed: {SEED} (replay with KDFAST_TEST_SEED={SEED})",
            f"kdfast backends: {kdfast.available_backends()}"]


def _test_seed(request) -> int:
    return SEED ^ zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    torch.manual_seed(_test_seed(request))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded by the run's seed and the test's id: fresh inputs each run, replayable."""
    return torch.Generator().manual_seed(_test_seed(request))


def runnable_backends():
    """(backend, device) pairs that work in this process."""
    status = kdfast.available_backends()
    pairs = []
    for name in ("torch", "cpu", "triton", "cuda"):
        if not status[name].available:
            continue
        if name in ("torch", "cpu") or (name == "triton" and os.environ.get("TRITON_INTERPRET") == "1"):
            pairs.append((name, "cpu"))
        if name != "cpu" and torch.cuda.is_available():
            pairs.append((name, "cuda"))
    return pairs


def interpreted(backend: str, device: str) -> bool:
    """Triton's interpreter is slow: such tests use small shapes."""
    return backend == "triton" and device == "cpu"
