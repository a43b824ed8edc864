"""Every variant of the Triton kernels compiles for an H100/H200 (sm_90), without a GPU.

The CPU test-suite runs the kernels in Triton's interpreter, which accepts code the GPU
compiler rejects; this compiles them for real (Triton ships ptxas), in a process without
TRITON_INTERPRET, and checks that the logits move 16 bytes at a time and nothing spills.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "benchmarks.kernel_report", "--check"], env=env,
                            cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
