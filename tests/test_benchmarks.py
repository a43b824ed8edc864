"""The benchmark suite: the quick CPU suite end to end (a smoke test: correctness asserted,
timings not; it holds tiny cells of the sparse suite too), and the pieces whose logic a smoke
run does not pin down."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # benchmarks/ is not installed: import it from the checkout, as `python -m` does

from benchmarks import measure, peers, report, suites  # noqa: E402
from benchmarks.problems import MODES, VARIANTS, LogitsProblem, SparseProblem  # noqa: E402
from kdfast.reference import kd_loss_reference, sparse_kd_loss_reference  # noqa: E402


def test_quick_cpu_suite(tmp_path):
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# results\n\n<!-- benchmarks other/cpu begin -->\nkept\n<!-- benchmarks other/cpu end -->\n")
    run = subprocess.run([sys.executable, "-m", "benchmarks.run", "--suite", "quick", "--device", "cpu",
                          "--out", str(tmp_path / "out"), "--update-results", str(results_md)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]

    result = json.loads((tmp_path / "out" / "quick-cpu.json").read_text())
    cells = result["cells"]
    kdfast_cells = [c for c in cells if c["kind"] == "kdfast"]
    assert kdfast_cells and all(c["status"] == "ok" for c in kdfast_cells)
    # Every divergence, mode, dtype and V, and a peer for each divergence, were measured.
    logits_cells = [c for c in kdfast_cells if c["problem"] == "logits" and "variant" not in c]
    # and every way of calling the loss that training uses, checked against the reference too
    assert {c["variant"] for c in kdfast_cells if c["impl"] == "kdfast-cpu" and "variant" in c} == \
        set(VARIANTS) - {"plain"}
    assert {(c["divergence"], c["mode"], c["dtype"], c["v"]) for c in logits_cells} == {
        (d, m, t, v) for d in peers.DIVERGENCES for m in ("fwd", "fwd+bwd") for t in ("fp32", "bf16")
        for v in (32000, 50257, 128256, 151936, 262144)}
    assert {c["divergence"] for c in cells if c["kind"] == "peer" and c.get("time")} == set(peers.DIVERGENCES)
    assert {c["impl"] for c in cells} >= {"kdfast-cpu", "kdfast-cpu-inplace", "classic", "eager", "compile"}
    # The sparse suite's problem: every divergence, mode and dtype, against careful eager and torch.compile.
    sparse = [c for c in cells if c["problem"] == "sparse"]
    assert {(c["divergence"], c["mode"], c["dtype"]) for c in sparse if c["impl"] == "kdfast-cpu"} == {
        (d, m, t) for d in peers.DIVERGENCES for m in MODES for t in ("fp32", "bf16")}
    assert {c["impl"] for c in sparse if c.get("time")} >= {"kdfast-cpu", "kdfast-cpu-inplace", "eager", "compile"}
    for c in cells:
        if c.get("time"):
            assert c["time"]["runs"] >= 3 and c["time"]["p20"] <= c["time"]["median"] <= c["time"]["p80"]
            assert c["floor_ms"] > 0 and c["x_floor"] > 0 and c["bw_frac"] > 0
    assert result["copy_bandwidth_GBps"] > 0 and result["environment"]["torch"] == torch.__version__

    for name in ("quick-cpu.md", "quick-cpu-time.png", "quick-cpu-memory.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    md = (tmp_path / "out" / "quick-cpu.md").read_text()
    assert "| kdfast-cpu |" in md and "Copy bandwidth" in md and "### sparse teacher, bf16, jsd, fwd+bwd" in md
    assert "| 8 x 32000, K 64 |" in md
    text = results_md.read_text()
    assert "kept" in text and "<!-- benchmarks quick/cpu begin -->" in text and "| kdfast-cpu |" in text


def test_results_section_is_replaced_in_place(tmp_path):
    path = tmp_path / "RESULTS.md"
    report.update_results_md(path, "a/cpu", "first a")
    report.update_results_md(path, "b/cuda", "b")
    report.update_results_md(path, "a/cpu", "second a")
    text = path.read_text()
    assert text.startswith(report.RESULTS_HEADER)
    assert "second a" in text and "first a" not in text and text.index("second a") < text.index("\nb\n")


@pytest.mark.parametrize("divergence", peers.DIVERGENCES)
def test_careful_eager_peers_match_the_reference(divergence):
    problem = LogitsProblem(4, 300, "fp32", "cpu", seed=1)
    ref = kd_loss_reference(problem.student.double(), problem.teacher.double(), temperature=2.0,
                            divergence=divergence, beta=peers.JSD_BETA)
    got = peers.careful_eager(problem.student, problem.teacher, 2.0, divergence)
    assert math.isclose(got.item(), ref.item(), rel_tol=1e-5)
    chunked_loss, _ = problem.reference(2.0, divergence, peers.JSD_BETA)
    assert math.isclose(chunked_loss, ref.item(), rel_tol=1e-12)


@pytest.mark.parametrize("divergence", peers.DIVERGENCES)
def test_sparse_peers_match_the_reference(divergence):
    problem = SparseProblem(5, 300, 7, "fp32", "cpu", temperature=2.0, seed=1)
    ref = sparse_kd_loss_reference(problem.student.double(), problem.ids, problem.logprobs, temperature=2.0,
                                   divergence=divergence, beta=peers.JSD_BETA)
    for loss in (peers.sparse_careful_eager, peers.sparse_compiled):
        got = loss(problem.student, problem.ids, problem.logprobs, 2.0, divergence)
        assert math.isclose(got.item(), ref.item(), rel_tol=1e-5)
    chunked_loss, _ = problem.reference(2.0, divergence, peers.JSD_BETA)
    assert math.isclose(chunked_loss, ref.item(), rel_tol=1e-12)


def test_sparse_suite_bars_cover_every_k_and_dtype():
    suite = suites.get("sparse", "cpu")
    head = {(c.k, c.dtype) for c in suite.cases if (c.n, c.v) == (2048, 32000)
            and {"kdfast-cpu*", "eager", "compile"} <= set(c.impls)}
    assert head == {(k, d) for k in (16, 64, 256) for d in ("fp32", "bf16")}
    assert {(b.metric, b.op, b.limit) for b in suite.bars} == {
        ("speedup:eager", ">=", 5.0), ("speedup:compile", ">=", 2.0), ("peak_over_grad", "<=", 1.1)}


def test_verdicts_and_bars():
    tol = measure.Tolerance(loss=1e-4, grad=1e-3)
    assert measure.verdict("kdfast", 1e-6, 1e-4, tol) == "ok"
    assert measure.verdict("kdfast", 1e-6, 2e-3, tol) == "WRONG"
    assert measure.verdict("peer", 1e-2, 2e-2, tol) == "inexact"
    assert measure.verdict("peer", 1e-6, math.inf, tol) == "WRONG"
    assert measure.verdict("kdfast", 1e-6, None, tol) == "ok"  # forward only: no gradient to check
    key = {"problem": "logits", "n": 2, "v": 3, "dtype": "fp32", "divergence": "jsd", "mode": "fwd+bwd"}
    cells = [{**key, "impl": "kdfast-cpu", "kind": "kdfast", "time": {"median": 1.0}, "peak_extra_bytes": 24,
              "grad_bytes": 24, "bytes": 72},
             {**key, "impl": "eager", "kind": "peer", "time": {"median": 5.0}, "peak_extra_bytes": 96,
              "grad_bytes": 24, "bytes": 72}]
    bars = [{"label": "x", "where": {"impl": "kdfast-cpu"}, "metric": "speedup:eager", "op": ">=", "limit": 4.0},
            {"label": "y", "where": {"impl": "kdfast-cpu"}, "metric": "peak_over_grad", "op": "<=", "limit": 0.5},
            {"label": "z", "where": {"impl": "nothing"}, "metric": "time_ms", "op": "<=", "limit": 1.0}]
    result = report.derive({"copy_bandwidth_GBps": 72e-9, "cells": cells, "bar_specs": bars})
    assert cells[0]["floor_ms"] == pytest.approx(1e3) and cells[0]["vs"]["eager"]["speedup"] == pytest.approx(5.0)
    assert [b["pass"] for b in result["bars"]] == [True, False, None]
