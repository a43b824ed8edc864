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


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (also set on every case parametrized with device "
                                       "'cuda'), so scripts/device_check.sh selects all GPU tests with -m gpu")


def pytest_collection_modifyitems(config, items):
    # The loss tests parametrize (backend, device) pairs: mark their CUDA cases, which test ids alone
    # cannot select (an id like [jsd-262144-triton] names no device).
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if any(isinstance(v, str) and v.startswith("cuda") for v in params.values()):
            item.add_marker(pytest.mark.gpu)


def _test_seed(request) -> int:
    return SEED ^ zlib.crc32(request.node.nodeid.encode())


@pytest.fixture(autouse=True)
def _seed_global_rng(request):
    torch.manual_seed(_test_seed(request))


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded by the run's seed and the test's id: fresh inputs each run, replayable."""
    return torch.Generator().manual_seed(_test_seed(request))

