"""Run a benchmark suite and write its JSON, Markdown and plots.

    python -m benchmarks.run --suite quick|full|cpu-core|gpu-core|fused-linear|sparse [--device cpu|cuda]
                             [--out DIR] [--update-results [RESULTS.md]] [--impls PATTERNS] [--budget-s S]
    python -m benchmarks.run --from-json FILE [--out DIR] [--update-results]   # re-render a saved run

Every cell is checked against the float64 reference before it is timed; the exit status is 1
when any kdfast cell is wrong or fails (timings and bars are reported, never asserted).
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import functools
import json
import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import measure, report, suites
from .peers import JSD_BETA, Impl, implementations

ROOT = Path(__file__).resolve().parent
DEFAULT_RESULTS_MD = ROOT / "RESULTS.md"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _cell_base(problem, impl: Impl, divergence: str, mode: str) -> dict:
    """What identifies a cell, and its cost model."""
    cell = {**problem.key, "divergence": divergence, "mode": mode, "impl": impl.name, "kind": impl.kind,
            "label": impl.label, "grad_bytes": problem.grad_bytes if mode == "fwd+bwd" else None}
    if problem.kind == "fused":
        cell["flops"] = problem.flops(mode)
    else:
        cell["bytes"] = problem.traffic_bytes(mode)
    return cell


def run_cell(meter, problem, impl: Impl, divergence: str, mode: str, temperature: float, reference,
             tol: measure.Tolerance) -> dict:
    """Check one implementation against the reference, then (if right) time it and measure its peak memory."""
    backward = mode == "fwd+bwd"
    cell = _cell_base(problem, impl, divergence, mode)

    def prepare():
        # An inplace_backward implementation overwrites its inputs: it gets a fresh copy, made
        # before (not during) the measurement. Timed reruns reuse the overwritten copy: the
        # kernels' speed does not depend on the values.
        args, trainables = problem.arguments(backward, fresh=impl.inplace)

        def reset():
            for x in trainables:
                x.grad = None

        options = getattr(problem, "options", {})  # a variant's (kdfast's keywords)
        grad_output = getattr(problem, "grad_output", 1.0)

        def step():
            loss = impl.loss(*args, temperature, divergence, **options)
            if backward:
                loss.backward(None if grad_output == 1.0 else torch.tensor(grad_output, device=loss.device))
            return loss
        return trainables, reset, step

    try:
        trainables, reset, step = prepare()
        start = time.perf_counter()
        loss = step()
        meter.sync()
        cell["first_call_s"] = time.perf_counter() - start  # includes torch.compile's compilation
        ref_loss, ref_grads = reference()
        cell["loss_err"], cell["grad_err"] = measure.errors(loss, [x.grad for x in trainables], ref_loss,
                                                            ref_grads if backward else [])
        cell["status"] = measure.verdict(impl.kind, cell["loss_err"], cell["grad_err"], tol)
        del loss
        if cell["status"] != "WRONG":
            cell["time"] = measure.summarize(meter.time(reset, step))
            del trainables, reset, step
            trainables, reset, step = prepare()
            cell["peak_extra_bytes"] = meter.peak_extra(reset, step)
            reset()
    except Exception as exc:  # one failing implementation (an OOM, a peer's bug) must not stop the suite
        first_line = (str(exc).strip().splitlines() or [""])[0][:200]
        cell["status"], cell["reason"] = "error", f"{type(exc).__name__}: {first_line}"
    finally:
        problem.release()
    return cell


def _describe(cell: dict) -> str:
    text = f"{report.cell_name(cell)}: {cell['status']}"
    if cell.get("reason"):
        return f"{text} ({cell['reason']})"
    if "loss_err" in cell:
        grad_err = "-" if cell["grad_err"] is None else f"{cell['grad_err']:.1e}"
        text += f" (errors {cell['loss_err']:.1e} / {grad_err})"
    if cell.get("time"):
        text += f", {cell['time']['median']:.4g} ms"
    if cell.get("peak_extra_bytes") is not None:
        text += f", peak+ {cell['peak_extra_bytes'] / 1e9:.3g} GB"
    return text


def _stamp(result: dict, started: float) -> None:
    result["wall_s"] = time.monotonic() - started
    result["load_avg_after"] = [round(x, 2) for x in os.getloadavg()]


def run_suite(suite: suites.Suite, env: dict, impl_patterns: tuple[str, ...], budget_s: float | None, command: str,
              partial: Path) -> dict:
    """Measure every cell of ``suite``. What was measured so far is saved to ``partial`` after each group,
    so that a run killed by a time limit can still be rendered with ``--from-json``."""
    started = time.monotonic()
    meter = measure.meter(suite.device, suite.timing)
    copy_bytes = suite.copy_mib * 2**20
    result = {"suite": suite.name, "device": suite.device, "description": suite.description, "command": command,
              "date": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "machine": measure.machine_slug(env),
              "environment": env,
              "settings": {"temperature": suite.temperature, "jsd_beta": JSD_BETA, "budget_s": budget_s,
                           "timing": dataclasses.asdict(suite.timing),
                           "tolerances": {f"{problem}/{dtype}": dataclasses.asdict(tol)
                                          for (problem, dtype), tol in suites.TOLERANCES.items()}},
              "bar_specs": [dataclasses.asdict(b) for b in suite.bars], "skipped_impls": {}, "cells": [],
              "copy_bytes": copy_bytes, "copy_bandwidth_GBps": meter.copy_bandwidth(copy_bytes) / 1e9, "matmul": None}
    _log(f"[{suite.name}] copy bandwidth {result['copy_bandwidth_GBps']:.4g} GB/s")
    fused = next((c for c in suite.cases if c.problem == "fused"), None)
    if fused:
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[fused.dtype]
        rate = meter.matmul_rate(fused.n, fused.hs, fused.v, dtype)
        result["matmul"] = {"TFLOPs": rate / 1e12, "dtype": fused.dtype, "shape": [fused.n, fused.hs, fused.v]}
        _log(f"[{suite.name}] matmul {rate / 1e12:.4g} TFLOP/s")

    for case in suite.cases:
        impls, skipped = implementations(case.problem, suite.device)
        result["skipped_impls"].update(skipped)
        impls = [i for i in impls if any(fnmatch.fnmatch(i.name, p) for p in case.impls)
                 and any(fnmatch.fnmatch(i.name, p) for p in impl_patterns)]
        problem = case.build(suite.device, suite.temperature)
        tol = suites.TOLERANCES[(case.problem, case.dtype)]
        for divergence in case.divergences:
            # Computed once per input set and divergence, and only if a cell runs.
            reference = functools.cache(functools.partial(problem.reference, suite.temperature, divergence,
                                                          JSD_BETA))
            for mode in case.modes:
                torch._dynamo.reset()  # fresh torch.compile caches: no recompile limit is ever reached
                for impl in impls:
                    if divergence not in impl.divergences or mode not in impl.modes:
                        continue
                    if budget_s is not None and time.monotonic() - started > budget_s:
                        cell = {**_cell_base(problem, impl, divergence, mode), "status": "skipped",
                                "reason": f"the time budget of {budget_s:.0f} s was spent"}
                    elif getattr(problem, "options", None) and impl.kind != "kdfast":
                        cell = {**_cell_base(problem, impl, divergence, mode), "status": "skipped",
                                "reason": "a peer takes no vocab_size, labels or expected_grad_output"}
                    else:
                        cell = run_cell(meter, problem, impl, divergence, mode, suite.temperature, reference, tol)
                    result["cells"].append(cell)
                    _log(f"[{suite.name}] {_describe(cell)}")
            reference.cache_clear()
            meter.release()
            _stamp(result, started)
            report.write_json(result, partial)
        del problem
        meter.release()
    _stamp(result, started)
    return result


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", choices=suites.NAMES)
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        help="default: cuda when torch sees a GPU, else cpu")
    parser.add_argument("--out", type=Path, help="output folder (default: benchmarks/results/<machine>)")
    parser.add_argument("--update-results", nargs="?", type=Path, const=DEFAULT_RESULTS_MD, default=None,
                        metavar="RESULTS_MD", help=f"rewrite this suite's section of RESULTS.md "
                                                   f"(default path: {DEFAULT_RESULTS_MD.relative_to(ROOT.parent)})")
    parser.add_argument("--impls", default="*",
                        help="comma-separated fnmatch patterns of implementations to run (default: all)")
    parser.add_argument("--budget-s", type=float, help="start no cell after this many seconds (default: the suite's)")
    parser.add_argument("--from-json", type=Path, help="re-render a saved run's outputs instead of measuring")
    parser.add_argument("--list", action="store_true", help="list the suites, their commands and what they measure")
    args = parser.parse_args(argv)
    if not args.list and (args.suite is None) == (args.from_json is None):
        parser.error("give --suite (to measure) or --from-json (to re-render), not both")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.list:
        for name in suites.NAMES:
            for device in ("cpu", "cuda"):
                if (suite := suites.get(name, device, missing_ok=True)):
                    print(f"{suite.command}\n    {suite.description}")
        return 0
    if args.from_json:
        result = json.loads(args.from_json.read_text())
        out = args.out or args.from_json.parent
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if device == "cuda" and not torch.cuda.is_available():
            _log("--device cuda: torch sees no CUDA device")
            return 2
        try:
            suite = suites.get(args.suite, device)
        except ValueError as exc:
            _log(str(exc))
            return 2
        env = measure.environment(suite.device)
        out = args.out or ROOT / "results" / measure.machine_slug(env)
        stem = f"{suite.name}-{suite.device}"
        result = run_suite(suite, env, tuple(args.impls.split(",")), suite.budget_s if args.budget_s is None
                           else args.budget_s, "python -m benchmarks.run " + shlex.join(argv),
                           out / f"{stem}.partial.json")
        (out / f"{stem}.partial.json").unlink(missing_ok=True)
        # A dated copy of every run, kept out of git (see .gitignore).
        report.write_json(result, out / "raw" / f"{stem}-{result['date'].replace(':', '')}.json")
    files = report.write_outputs(result, out, args.update_results)
    for bar in result["bars"]:
        for ch in bar["checks"] or [{"cell": "no such cell", "value": None, "pass": None}]:
            value = f"{ch['value']:.4g}" if isinstance(ch["value"], float) else ch["value"]
            _log(f"bar {report.VERDICTS[ch['pass']].strip('*')}: {bar['label']}: {ch['cell']}: "
                 f"{value} {bar['op']} {bar['limit']:.3g}")
    _log("wrote " + ", ".join(str(f) for f in files)
         + (f" and the {report.section_key(result)} section of {args.update_results}" if args.update_results else ""))
    failed = report.failed_kdfast_cells(result)
    for c in failed:
        _log(f"kdfast FAILED: {report.cell_name(c)}: {c['status']} {c.get('reason', '')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
