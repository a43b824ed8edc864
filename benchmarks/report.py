"""From a run's measurements to its outputs: derived metrics, bars, JSON, Markdown, plots, RESULTS.md.

``derive`` recomputes everything that follows from the raw measurements (so ``--from-json``
regenerates identical reports). Metrics of a cell, each None where it does not apply:

- ``time_ms``: the median (``time`` holds median, p20, p80, min, max and every run);
- ``floor_ms`` and ``x_floor``: logits: the traffic floor, ``bytes`` (read S and T, write dS in
  fwd+bwd) over the copy bandwidth measured in the same run; fused linear: the GEMM floor,
  ``flops`` over the matmul rate measured in the same run;
- ``achieved_GBps`` and ``bw_frac``: ``bytes`` over the median time, and its fraction of the copy bandwidth;
- ``peak_gb`` and ``peak_over_grad``: peak memory on top of the inputs (gradient included), and
  over the gradient's size;
- ``vs[other]``: ``speedup`` (other's time / this one's), ``time_ratio`` (the inverse) and
  ``mem_ratio`` (this peak / other's) against every other implementation of the same group.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import defaultdict
from pathlib import Path

GROUP_FIELDS = ("problem", "n", "v", "hs", "ht", "k", "variant", "dtype", "divergence", "mode")
VERDICTS = {True: "PASS", False: "**FAIL**", None: "not measured"}
SECTION = "<!-- benchmarks {key} {edge} -->"  # edge: begin / end
RESULTS_HEADER = """# kdfast benchmark results

Each section below is written by `python -m benchmarks.run --suite <suite> --device <device> --update-results`
(or regenerated from a saved JSON with `--from-json <file> --update-results`); other sections are left alone.
The JSON, Markdown and plots of each run are under `benchmarks/results/<machine>/`.
"""


def group_key(cell: dict) -> tuple:
    return tuple(cell.get(f) for f in GROUP_FIELDS)


def _metric(cell: dict, metric: str):
    if ":" in metric:
        name, other = metric.split(":", 1)
        return cell.get("vs", {}).get(other, {}).get(name)
    return cell.get(metric)


def _matches(cell: dict, where: dict) -> bool:
    return all(cell.get(k) in (v if isinstance(v, tuple) else (v,)) for k, v in where.items())


def derive(result: dict) -> dict:
    """Add the derived metrics to every cell, and the verdict of every bar, to ``result``."""
    copy_bw = result["copy_bandwidth_GBps"] * 1e9
    matmul = result.get("matmul") or {}
    for c in result["cells"]:
        t = c["time"]["median"] if c.get("time") else None
        c["time_ms"] = t
        c["floor_ms"] = c["achieved_GBps"] = c["bw_frac"] = c["x_floor"] = c["peak_over_grad"] = None
        if c.get("bytes"):
            c["floor_ms"] = c["bytes"] / copy_bw * 1e3
            if t:
                c["achieved_GBps"] = c["bytes"] / (t / 1e3) / 1e9
                c["bw_frac"] = c["achieved_GBps"] * 1e9 / copy_bw
        if c.get("flops") and matmul.get("TFLOPs"):
            c["floor_ms"] = c["flops"] / (matmul["TFLOPs"] * 1e12) * 1e3
        if t and c["floor_ms"]:
            c["x_floor"] = t / c["floor_ms"]
        peak = c.get("peak_extra_bytes")
        c["peak_gb"] = None if peak is None else peak / 1e9
        if peak is not None and c.get("grad_bytes"):
            c["peak_over_grad"] = peak / c["grad_bytes"]
    groups = defaultdict(list)
    for c in result["cells"]:
        groups[group_key(c)].append(c)
    for cells in groups.values():
        for c in cells:
            c["vs"] = {}
            for o in cells:
                if o is c:
                    continue
                ratios = {}
                if c["time_ms"] and o["time_ms"]:
                    ratios.update(speedup=o["time_ms"] / c["time_ms"], time_ratio=c["time_ms"] / o["time_ms"])
                if c["peak_gb"] is not None and o["peak_gb"]:
                    ratios["mem_ratio"] = c["peak_gb"] / o["peak_gb"]
                if ratios:
                    c["vs"][o["impl"]] = ratios
    result["bars"] = [_judge(bar, result["cells"]) for bar in result["bar_specs"]]
    return result


def _judge(bar: dict, cells: list[dict]) -> dict:
    ok = {"<=": lambda x, lim: x <= lim, ">=": lambda x, lim: x >= lim}[bar["op"]]
    where = {k: tuple(v) if isinstance(v, list) else v for k, v in bar["where"].items()}
    checks = []
    for c in cells:
        if _matches(c, where):
            value = _metric(c, bar["metric"])
            passed = None if value is None else ok(value, bar["limit"])
            checks.append({"cell": cell_name(c), "value": value, "pass": passed})
    verdicts = [ch["pass"] for ch in checks]
    passed = None if not checks or None in verdicts else all(verdicts)
    return {**bar, "checks": checks, "pass": passed}


def failed_kdfast_cells(result: dict) -> list[dict]:
    return [c for c in result["cells"] if c["kind"] == "kdfast" and c["status"] in ("WRONG", "error")]


# --- formatting ------------------------------------------------------------------------------------

def _size(c: dict) -> str:
    hidden = f" (H {c['hs']}/{c['ht']})" if c.get("hs") else ""
    ids = f", K {c['k']}" if c.get("k") else ""
    variant = f", {c['variant']}" if c.get("variant") else ""  # problems.VARIANTS
    return f"{c['n']} x {c['v']}{hidden}{ids}{variant}"


def cell_name(c: dict) -> str:
    return f"{c['impl']} {_size(c)} {c['dtype']} {c['divergence']} {c['mode']}"


def _num(x, fmt: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, str):
        return x
    return format(x, fmt)


def _check(c: dict) -> str:
    if c["status"] in ("error", "skipped"):
        return f"{c['status']}: {c.get('reason', '')}"
    errs = f"{_num(c['loss_err'], '.1e')} / {_num(c.get('grad_err'), '.1e')}"
    return f"**WRONG** {errs}" if c["status"] == "WRONG" else f"{c['status']} {errs}"


def _ms(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def _time(c: dict) -> str:
    if not c.get("time"):
        return "–"
    t = c["time"]
    return f"{_ms(t['median'])} [{_ms(t['p20'])}–{_ms(t['p80'])}]"


def _speedups(c: dict, peers: set[str]) -> str:
    if c["kind"] != "kdfast":
        return ""
    return ", ".join(f"{v['speedup']:.3g}x {name}" for name, v in c["vs"].items() if name in peers and "speedup" in v)


def environment_lines(result: dict) -> list[str]:
    env = result["environment"]
    hw = f"{env['cpu']}, {env['cpu_count']} cores, torch threads {env['torch_threads']}, {env['memory_gib']} GiB"
    if env.get("gpu"):
        hw = f"{env['gpu']} ({env['gpu_memory_gib']} GiB); host {hw}"
    versions = ", ".join(f"{k} {env[k]}" for k in ("python", "torch", "cuda", "triton", "liger_kernel", "kdfast")
                         if env.get(k))
    lines = [f"- Command: `{result['command']}`",
             f"- Date: {result['date']} (wall time {result['wall_s']:.0f} s)",
             f"- Machine: {hw}",
             f"- Versions: {versions}",
             f"- Load average (1/5/15 min) before: {env['load_avg_before']}, after: {result['load_avg_after']}",
             f"- Copy bandwidth: **{result['copy_bandwidth_GBps']:.4g} GB/s** (bytes read + written, "
             f"{result['copy_bytes'] / 2**20:.0f} MiB copied)"]
    if result.get("matmul"):
        m = result["matmul"]
        lines.append(f"- Matmul rate: **{m['TFLOPs']:.4g} TFLOP/s** ({m['dtype']}, {' x '.join(map(str, m['shape']))})")
    s = result["settings"]
    lines.append(f"- Loss: T = {s['temperature']}, batchmean, times T^2; jsd beta {s['jsd_beta']}. Tolerances "
                 f"(relative loss error / gradient rel-L2): "
                 + "; ".join(f"{k} {v['loss']:g} / {v['grad']:g}" for k, v in s["tolerances"].items()))
    return lines


def markdown(result: dict, plots: list[Path], relative_to: Path) -> str:
    """The run as Markdown: context, bars, one table per (dtype, divergence, mode), skipped implementations."""
    out = [f"## `{result['suite']}` on {result['device']}: {result['machine']}", "", result["description"], "",
           *environment_lines(result), ""]
    if result["bars"]:
        out += ["### Bars", "", "| bar | cell | value | limit | verdict |", "|---|---|---|---|---|"]
        for bar in result["bars"]:
            for ch in bar["checks"] or [{"cell": "(no such cell)", "value": None, "pass": None}]:
                out.append(f"| {bar['label']} | {ch['cell']} | {_num(ch['value'], '.4g')} "
                           f"| {bar['op']} {bar['limit']:.3g} | {VERDICTS[ch['pass']]} |")
        out.append("")
    peers = {c["impl"] for c in result["cells"] if c["kind"] == "peer"}
    tables = defaultdict(list)
    for c in result["cells"]:
        tables[(c["problem"], c["dtype"], c["divergence"], c["mode"])].append(c)
    for (problem, dtype, divergence, mode), cells in tables.items():
        floor_name = "GEMM floor" if problem == "fused" else "traffic floor"
        teacher = "sparse teacher, " if problem == "sparse" else ""
        out += [f"### {teacher}{dtype}, {divergence}, {mode}", "",
                f"| N x V | implementation | check: loss / grad error | ms, median [p20–p80] | x {floor_name} "
                "| of copy BW | peak+ GB | peak+ / grad | kdfast speed-up |",
                "|---|---|---|---|---|---|---|---|---|"]
        for size in dict.fromkeys(_size(c) for c in cells):
            rows = [c for c in cells if _size(c) == size]
            floor = next((c["floor_ms"] for c in rows if c.get("floor_ms")), None)
            grad_gb = rows[0]["grad_bytes"] / 1e9 if rows[0].get("grad_bytes") else None
            copy_share = "–" if problem == "fused" else "100%"
            out.append(f"| {size} | *{floor_name}* | | {_num(floor and _ms(floor))} | 1 | {copy_share} "
                       f"| {_num(grad_gb)} (grad) | | |")
            for c in rows:
                frac = None if c["bw_frac"] is None else f"{c['bw_frac']:.0%}"
                out.append(f"| | {c['impl']} | {_check(c)} | {_time(c)} | {_num(c['x_floor'])} | {_num(frac)} "
                           f"| {_num(c['peak_gb'])} | {_num(c['peak_over_grad'])} | {_speedups(c, peers)} |")
        out.append("")
    labels = {c["impl"]: c["label"] for c in result["cells"]}
    out += ["Implementations: " + "; ".join(f"`{k}`: {v}" for k, v in labels.items()) + "."]
    if result["skipped_impls"]:
        out += ["", "Not run here: " + "; ".join(f"`{k}`: {v}" for k, v in result["skipped_impls"].items()) + "."]
    out += ["", "Method: CPU times are wall-clock medians of single runs after warm-up; GPU times are medians of "
            "`triton.testing.do_bench` (CUDA events, L2 flushed). peak+ is the memory on top of the inputs during one "
            "run, gradient included (CPU: the rise of the process's VmHWM over its RSS after resetting it through "
            "/proc/self/clear_refs; GPU: `max_memory_allocated`). Every cell is checked against the float64 "
            "reference before it is timed; a WRONG cell is not timed. See `benchmarks/measure.py`."]
    for p in plots:
        out += ["", f"![{p.stem}]({os.path.relpath(p, relative_to)})"]
    return "\n".join(out) + "\n"


# --- plots -----------------------------------------------------------------------------------------

def plot(result: dict, out_dir: Path, stem: str) -> list[Path]:
    """Time and peak memory against V (or N, or K: whichever varies most): one panel per (dtype, mode) x
    divergence."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = [c for c in result["cells"] if c.get("time")]
    if not cells:
        return []
    sizes = ("v", "n", "k")
    x_field = max(sizes, key=lambda f: len({c.get(f) for c in cells}))
    series_fields = [f for f in sizes if f != x_field and len({c.get(f) for c in cells}) > 1]
    for c in cells:
        c["_series"] = c["impl"] + "".join(f" {f}={c[f]}" for f in series_fields if c.get(f) is not None)
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(c["_series"] for c in cells))}
    rows = list(dict.fromkeys((c["dtype"], c["mode"]) for c in cells))
    cols = list(dict.fromkeys(c["divergence"] for c in cells))
    paths = []
    for metric, reference, ylabel, name in (("time_ms", "floor_ms", "ms (median)", "time"),
                                             ("peak_gb", "grad_bytes", "peak extra GB", "memory")):
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(4.5 * len(cols), 3.4 * len(rows)), squeeze=False)
        for (dtype, mode), ax_row in zip(rows, axes):
            for divergence, ax in zip(cols, ax_row):
                panel = [c for c in cells if (c["dtype"], c["mode"], c["divergence"]) == (dtype, mode, divergence)]
                _panel(ax, panel, metric, reference, x_field, colors)
                ax.set_title(f"{dtype} {divergence} {mode}", fontsize=9)
                ax.set_ylabel(ylabel, fontsize=8)
        handles = [plt.Line2D([], [], color=color, marker="o", label=label) for label, color in colors.items()]
        handles.append(plt.Line2D([], [], color="k", linestyle="--",
                                  label="floor" if reference == "floor_ms" else "gradient size"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 5), fontsize=8)
        fig.suptitle(f"{result['suite']} on {result['machine']} ({result['date'][:10]})", fontsize=10)
        fig.tight_layout(rect=(0, 0.04 + 0.02 * (len(handles) // 5), 1, 1))
        path = out_dir / f"{stem}-{name}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    for c in cells:
        del c["_series"]
    return paths


def _panel(ax, cells, metric, reference, x_field, colors) -> None:
    series, refs = defaultdict(dict), {}
    for c in cells:
        if c.get(metric) is not None:
            series[c["_series"]][c[x_field]] = c[metric]
        ref = c.get(reference)
        if ref:
            refs[c[x_field]] = ref / 1e9 if reference == "grad_bytes" else ref
    xs = sorted({x for points in series.values() for x in points} | set(refs))
    if len(xs) > 1:
        for name, points in series.items():
            ax.plot(sorted(points), [points[x] for x in sorted(points)], marker="o", color=colors[name])
        if refs:
            ax.plot(sorted(refs), [refs[x] for x in sorted(refs)], "k--")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x / 1000:.0f}k" if x >= 1000 else str(x) for x in xs], fontsize=7)
        ax.minorticks_off()
        ax.set_xlabel(x_field.upper(), fontsize=8)
    else:
        names = list(series)
        ax.bar(range(len(names)), [next(iter(series[n].values())) for n in names], color=[colors[n] for n in names])
        if refs:
            ax.axhline(next(iter(refs.values())), color="k", linestyle="--")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
    if any(v > 0 for points in series.values() for v in points.values()):
        ax.set_yscale("log")
    ax.tick_params(labelsize=7)


# --- files -----------------------------------------------------------------------------------------

def _jsonable(x):
    if isinstance(x, float) and not math.isfinite(x):
        return "inf" if x > 0 else "nan" if x != x else "-inf"
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write_json(result: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=1))
    tmp.replace(path)  # never leave a half-written file behind, even if the run is killed


def section_key(result: dict) -> str:
    return f"{result['suite']}/{result['device']}"


def update_results_md(path: Path, key: str, body: str) -> None:
    """Replace (or append) the section of ``key`` in RESULTS.md, leaving the others alone."""
    begin, end = SECTION.format(key=key, edge="begin"), SECTION.format(key=key, edge="end")
    text = path.read_text() if path.exists() else RESULTS_HEADER
    block = f"{begin}\n{body.rstrip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


def write_outputs(result: dict, out_dir: Path, results_md: Path | None) -> list[Path]:
    """JSON, Markdown and plots into out_dir (and a section of RESULTS.md when asked); returns the files."""
    derive(result)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{result['suite']}-{result['device']}"
    json_path = out_dir / f"{stem}.json"
    write_json(result, json_path)
    plots = plot(result, out_dir, stem)
    md_path = out_dir / f"{stem}.md"
    md_path.write_text(markdown(result, plots, out_dir))
    if results_md is not None:
        update_results_md(results_md, section_key(result), markdown(result, plots, results_md.parent))
    return [json_path, md_path, *plots]
