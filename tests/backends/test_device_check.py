"""The GPU run is prepared here: scripts/device_check.sh --dry-run rehearses every step on the CPU
(Triton's interpreter, tiny sizes, no compute-sanitizer) and must end within its budget with at most
8 files that the device tool can bring back."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUDGET_S = 240  # the script's TOTAL_S in the dry run; steps that would start too late are skipped
NAME = re.compile(r"^[A-Za-z0-9._-]+$")  # what the device tool brings back


@pytest.mark.slow
def test_dry_run_stays_within_its_budget_and_returns_at_most_8_files(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE_CHECK_TOTAL_S": str(BUDGET_S)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself in the dry run
    # The CPU extensions' JIT builds (minutes on a small machine, after any change to csrc/) are not what
    # this test times: build both first, as the script would find them on a warm cache.
    build = ("from kdfast.backends import cpu_ext; cpu_ext.unavailable_reason(); "
             "cpu_ext.kernel_unavailable_reason('sparse_kd_forward')")
    subprocess.run([sys.executable, "-c", build], cwd=ROOT, check=True, timeout=900)
    start = time.monotonic()
    proc = subprocess.run(["bash", "scripts/device_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=BUDGET_S + 120)
    wall = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    # the budget, plus what the last step may overrun it by (its own limit is capped at what is left)
    assert wall < BUDGET_S + 20, f"{wall:.0f} s"
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 1 <= len(files) <= 8, files
    assert all(NAME.match(p.name) and len(p.relative_to(out).parts) <= 3 for p in files), files
    summary = (out / "summary.md").read_text()
    for step in ("cases_triton", "backends", "tests_edge", "tests_full", "bench_gpu-core", "bench_sparse",
                 "tests_vocab_parallel", "vocab_parallel"):
        assert f"| {step} |" in summary, step
    assert "| FAIL |" not in summary and "| TIMEOUT |" not in summary
    assert (out / "logs.tar.gz").stat().st_size > 0
    assert "kdfast device check:" in proc.stdout  # the short table, printed last
