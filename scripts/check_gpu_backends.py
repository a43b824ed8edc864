"""Print every backend's status; with a CUDA device, exit 1 (loudly) unless triton and cuda are both
available, so that a failed nvcc build can never make a GPU run "pass" by skipping the CUDA tests."""

import sys

import torch

import kdfast

status = kdfast.available_backends()
for name, s in status.items():
    print(f"{name:7s} {s!r}")
if not torch.cuda.is_available():
    print("no CUDA device: nothing required (dry run)")
    sys.exit(0)
missing = [name for name in ("triton", "cuda") if not status[name].available]
for name in missing:
    print(f"ERROR: backend {name!r} is unavailable on a machine with a GPU: {status[name].reason}")
sys.exit(1 if missing else 0)
