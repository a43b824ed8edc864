"""The main job: distil a teacher LM into a small student on real text, and report how it went.

The text is this Python's own standard library source, split by file into train and
held-out sets, so nothing is downloaded. Stages:

1. train a byte-level BPE tokenizer on the train split and encode both splits;
2. train the teacher on hard labels;
3. train the same student (same initial weights, data order, steps and tokens) three times:
   on hard labels alone (the baseline), distilled from the teacher with kdfast, and distilled
   from a cache of the teacher's top-k captured once over the students' sequences (no teacher
   forward while training: kdfast.sparse_kd_loss);
4. evaluate all of them on the same held-out windows and write report.md, loss_curves.png
   and results.json.

The tokenizer, the encoded data and the trained teacher are cached under ``cache_dir``,
keyed by everything they depend on, so a second run trains only the students.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import torch

from kdfast import LossOptions, __version__

from .checkpoint import ensure_writable_dir
from .config import build, build_model, check_keys, load_weights, require, save_weights, section
from .corpus import encode_texts, python_stdlib_files, read_texts, split_files, train_tokenizer
from .data import TokenWindows, load_tokens, save_tokens
from .lm import evaluate_models
from .runtime import resolve_device
from .teacher_cache import TeacherCache, capture_teacher
from .trainer import PRECISIONS, DistillTrainer, TrainConfig

STUDENT_PIECES = 64  # stretches of the training stream the students' windows come from
TOP_LEVEL = ("seed", "device", "cache_dir", "data", "tokenizer", "teacher", "teacher_cache", "student", "loss",
             "eval")


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _log(message: str) -> None:
    print(f"[kdfast demo] {message}", flush=True)


class Demo:
    def __init__(self, config: dict, out_dir: str):
        check_keys(config, TOP_LEVEL, "the demo config")
        self.config = config
        self.seed = int(config.get("seed", 0))
        self.device = resolve_device(config.get("device", "auto"))
        self.out = ensure_writable_dir(out_dir)
        self.cache = ensure_writable_dir(config.get("cache_dir", "runs/cache"))
        self.data_cfg = section(config, "data")
        check_keys(self.data_cfg, ("eval_fraction", "context"), "data")
        self.context = int(self.data_cfg.get("context", 128))
        self.loss_options = build(LossOptions, section(config, "loss"), "loss")
        self.eval_cfg = section(config, "eval")
        check_keys(self.eval_cfg, ("windows", "batch_size"), "eval")
        self.cache_cfg = section(config, "teacher_cache")
        check_keys(self.cache_cfg, ("mode", "k", "n", "logprob_dtype"), "teacher_cache")
        self.timings: dict[str, float] = {}

    # --- stage 1: data ---

    def prepare_data(self) -> None:
        started = time.perf_counter()
        root, names = python_stdlib_files()
        train_names, eval_names = split_files(names, float(self.data_cfg.get("eval_fraction", 0.05)))
        train_texts, eval_texts = read_texts(root, train_names), read_texts(root, eval_names)
        content = [hashlib.sha256(t.encode()).hexdigest() for t in train_texts + eval_texts]
        tok_cfg = section(self.config, "tokenizer")
        check_keys(tok_cfg, ("vocab_size",), "tokenizer")
        vocab_size = int(tok_cfg.get("vocab_size", 4096))
        self.data_key = _key(train_names, eval_names, content, vocab_size)
        folder = self.cache / f"data-{self.data_key}"
        tk = require("tokenizers", "demo", "the demo's tokenizer")
        if not (folder / "eval.npy").is_file():
            _log(f"training a {vocab_size}-token byte-level BPE tokenizer on {len(train_names)} files")
            tmp = folder.with_name(folder.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            tokenizer = train_tokenizer(train_texts, vocab_size)
            tokenizer.save(str(tmp / "tokenizer.json"))
            save_tokens(encode_texts(train_texts, tokenizer), tmp / "train.npy")
            save_tokens(encode_texts(eval_texts, tokenizer), tmp / "eval.npy")
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
        self.tokenizer = tk.Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer_hash = hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self.train_tokens, self.eval_tokens = load_tokens(folder / "train.npy"), load_tokens(folder / "eval.npy")
        self.data_info = {"source": f"Python {platform.python_version()} standard library ({root})",
                          "train_files": len(train_names), "eval_files": len(eval_names),
                          "train_bytes": sum(len(t.encode()) for t in train_texts),
                          "train_tokens": len(self.train_tokens), "eval_tokens": len(self.eval_tokens),
                          "vocab_size": self.vocab_size, "context": self.context}
        self.timings["data"] = time.perf_counter() - started

    def windows(self, tokens: torch.Tensor) -> TokenWindows:
        return TokenWindows(tokens, self.context, seed=self.seed, tokenizer=self.tokenizer_hash)

    # --- models and runs ---

    def _model(self, role: str) -> torch.nn.Module:
        spec = dict(section(section(self.config, role, required=True), "model", required=True))
        if "gpt" in spec:
            spec["gpt"] = {"context": self.context, **(spec["gpt"] or {})}
        torch.manual_seed(self.seed)  # the same initial student for both runs
        return build_model(spec, f"{role}.model", self.vocab_size)

    def _train_config(self, role: str, out_dir: Path) -> TrainConfig:
        role_cfg = section(self.config, role, required=True)
        check_keys(role_cfg, ("model", "train"), role)
        values = {"seed": self.seed, "device": str(self.device), **section(role_cfg, "train")}
        return build(TrainConfig, values, f"{role}.train", out_dir=str(out_dir))

    def student_tokens(self) -> torch.Tensor:
        """The training tokens the students see: as many windows as their steps take (one epoch, in one
        seeded order for every student), so that the teacher cache holds only those; taken as STUDENT_PIECES
        stretches spread evenly over the training stream (its first stretch alone would be its first few
        files), packed one after the other."""
        config = self._train_config("student", Path("."))
        n_windows = config.steps * config.batch_size * config.grad_accum
        if n_windows * self.context + 1 >= len(self.train_tokens):
            return self.train_tokens
        pieces = min(STUDENT_PIECES, n_windows)
        stride = (len(self.train_tokens) - 1) // pieces
        stretches = [self.train_tokens[i * stride:i * stride + (n_windows * (i + 1) // pieces - n_windows * i // pieces)
                                       * self.context] for i in range(pieces)]
        end = (pieces - 1) * stride + len(stretches[-1])
        return torch.cat([*stretches, self.train_tokens[end:end + 1]])  # the last target

    def _run(self, name: str, role: str, out_dir: Path, teacher, tokens: torch.Tensor):
        model = self._model(role)
        config = self._train_config(role, out_dir)
        _log(f"training the {name} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
             f"{config.steps} steps) in {out_dir}")
        started = time.perf_counter()
        summary = DistillTrainer(model, self.windows(tokens), config, teacher=teacher,
                                 eval_data=self.windows(self.eval_tokens), loss_options=self.loss_options).train()
        self.timings[name] = time.perf_counter() - started
        return model, summary

    def teacher(self) -> tuple[torch.nn.Module, dict]:
        """The trained teacher, from the cache when a run with the same inputs trained it before."""
        settings = self._train_config("teacher", Path(".")).run_settings()
        spec = section(self.config["teacher"], "model")
        key = _key(self.data_key, self.tokenizer_hash, self.context, self.seed, spec, settings, __version__)
        folder = self.teacher_dir = self.cache / f"teacher-{key}"
        weights = folder / "teacher.safetensors"
        if weights.is_file() and (folder / "summary.json").is_file():
            _log(f"using the cached teacher {folder}")
            model = self._model("teacher")
            load_weights(model, weights)
            self.timings["teacher"] = 0.0
            return model.to(self.device), {**json.loads((folder / "summary.json").read_text()), "cached": True}
        model, summary = self._run("teacher", "teacher", folder, None, self.train_tokens)
        save_weights(model, weights)
        return model, summary

    def teacher_cache(self, teacher: torch.nn.Module, tokens: torch.Tensor) -> TeacherCache:
        """The teacher's top-k over the students' sequences, captured afresh (its time is part of the comparison)."""
        folder = self.out / "teacher-cache"
        shutil.rmtree(folder, ignore_errors=True)
        mode, dtype = str(self.cache_cfg.get("mode", "topk")), str(self.cache_cfg.get("logprob_dtype", "fp16"))
        k, n = int(self.cache_cfg.get("k", 32)), self.cache_cfg.get("n")
        what = f"top-{k}" if mode == "topk" else f"{n} draws"
        _log(f"caching the teacher's {what} ({dtype} log-probs) over the students' sequences in {folder}")
        started = time.perf_counter()
        capture_teacher(teacher, self.windows(tokens), folder, k=k, mode=mode, n=None if n is None else int(n),
                        temperature=self.loss_options.temperature, dtype=dtype, progress=False, log=_log)
        self.timings["cache_capture"] = time.perf_counter() - started
        cache = TeacherCache(folder)
        size = sum(f.stat().st_size for f in folder.iterdir())
        self.cache_info = {"mode": mode, "k": cache.k, "logprob_dtype": dtype, "sequences": cache.sequences,
                           "bytes": size,
                           "bytes_per_token": size / (cache.sequences * cache.context),
                           "capture_seconds": self.timings["cache_capture"]}
        return cache

    # --- the whole job ---

    def run(self) -> dict:
        started = time.perf_counter()
        self.prepare_data()
        teacher, teacher_summary = self.teacher()
        runs = {"teacher": teacher_summary}
        students = {}
        tokens = self.student_tokens()
        for name in ("baseline", "distilled", "from_cache"):
            out_dir = self.out / name
            shutil.rmtree(out_dir, ignore_errors=True)  # each demo run trains the students afresh
            source = (None if name == "baseline" else teacher if name == "distilled"
                      else self.teacher_cache(teacher, tokens))  # what the student learns from
            students[name], runs[name] = self._run(name, "student", out_dir, source, tokens)
        eval_started = time.perf_counter()
        held_out = self.windows(self.eval_tokens).spread(int(self.eval_cfg.get("windows", 512)),
                                                         int(self.eval_cfg.get("batch_size", 32)))
        precision = PRECISIONS[self._train_config("student", self.out).precision]
        final = evaluate_models(students, teacher, ((x.to(self.device), y.to(self.device)) for x, y in held_out),
                                self.loss_options, precision)
        self.timings["final_eval"] = time.perf_counter() - eval_started
        self.timings["total"] = time.perf_counter() - started
        params = {"teacher": teacher, **students}
        results = {"data": self.data_info, "config": self.config, "device": str(self.device),
                   "timings_s": self.timings, "teacher_cache": self.cache_info, "kdfast_version": __version__,
                   "torch_version": torch.__version__,
                   "models": {name: {"parameters": sum(p.numel() for p in params[name].parameters()),
                                     "held_out": final[name], "training": runs[name]} for name in params}}
        (self.out / "results.json").write_text(json.dumps(results, indent=1))
        plot_curves(self.out / "loss_curves.png",
                    {"teacher": self.teacher_dir, **{name: self.out / name for name in students}})
        (self.out / "report.md").write_text(render_report(results))
        _log(f"report written to {self.out / 'report.md'} ({self.timings['total']:.0f} s in all)")
        return results


def _read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def plot_curves(path: Path, run_dirs: dict[str, Path]) -> None:
    """Training loss on hard labels and held-out loss against tokens seen, one line per run."""
    matplotlib = require("matplotlib", "demo", "the demo's plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for name, run_dir in run_dirs.items():
        records = _read_metrics(run_dir)
        train = [r for r in records if r["split"] == "train" and r["hard"] > 0]
        evals = [r for r in records if r["split"] == "eval"]
        # eval records carry no token count: it follows from the step and the run's tokens per step
        per_step = train[-1]["tokens"] / train[-1]["step"] if train else 0
        if train:
            train_ax.plot([r["tokens"] for r in train], [r["hard"] for r in train], label=name)
        if evals:
            eval_ax.plot([r["step"] * per_step for r in evals], [r["loss"] for r in evals], marker="o", label=name)
    for ax, title in ((train_ax, "training cross-entropy on hard labels"), (eval_ax, "held-out loss")):
        ax.set_title(title)
        ax.set_xlabel("training tokens")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _cache_lines(results: dict) -> list[str]:
    cache = results["teacher_cache"]
    what = (f"top-{cache['k']} tokens per position" if cache.get("mode", "topk") == "topk" else
            f"{cache['k']} draws per position (unbiased: each drawn token weighted by its count / {cache['k']})")
    lines = [f"The from_cache student learnt from the teacher's {what} with "
             f"{cache['logprob_dtype']} log-probabilities, captured once over the {cache['sequences']:,} sequences "
             f"the students train on: {_mib(cache['bytes'])} on disk, {cache['bytes_per_token']:.0f} bytes per token "
             f"(the full fp32 logits would be {4 * results['data']['vocab_size']:,}), in "
             f"{cache['capture_seconds']:.0f} s. Every student saw the same sequences in the same order.", "",
             "| bar | value | limit | |", "|---|---:|---:|---|"]
    for what, value, op, limit in cache_bars(results):
        met = value >= limit if op == ">=" else value <= limit
        lines.append(f"| {what} | {value:.2f} | {op} {limit} | {'met' if met else 'MISSED'} |")
    return lines


def _mib(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.0f} MiB"


def cache_bars(results: dict) -> list[tuple[str, float, str, float]]:
    """The cached student's bars, from the run's own figures: (what, value, op, limit)."""
    models = results["models"]
    base, dist, cached = (models[name]["held_out"]["loss"] for name in ("baseline", "distilled", "from_cache"))
    step = {name: models[name]["training"]["train_seconds"] / models[name]["training"]["steps"]
            for name in ("baseline", "distilled", "from_cache")}
    capture_and_run = results["timings_s"]["cache_capture"] + models["from_cache"]["training"]["train_seconds"]
    recovered = (base - cached) / (base - dist) if base != dist else float("nan")
    return [("share of the distilled student's held-out-loss gain recovered", recovered, ">=", 0.8),
            ("training step speed-up over the distilled student", step["distilled"] / step["from_cache"], ">=", 1.5),
            ("training step time over the baseline's", step["from_cache"] / step["baseline"], "<=", 1.3),
            ("capture + cached training over the distilled training time",
             capture_and_run / models["distilled"]["training"]["train_seconds"], "<=", 1.2)]


def render_report(results: dict) -> str:
    data, models, timings = results["data"], results["models"], results["timings_s"]
    base, dist = models["baseline"]["held_out"], models["distilled"]["held_out"]
    gain = base["loss"] - dist["loss"]
    verdict = "beats" if gain > 0 else "does not beat"
    lines = [
        "# kdfast demo: distilling a teacher on the Python standard library", "",
        f"Data: {data['source']}: {data['train_files']} files ({data['train_tokens']:,} tokens) for training, "
        f"{data['eval_files']} other files ({data['eval_tokens']:,} tokens) held out; byte-level BPE with "
        f"{data['vocab_size']:,} tokens, trained on the training files. Device: {results['device']}; "
        f"kdfast {results['kdfast_version']}, torch {results['torch_version']}.", "",
        f"**The distilled student {verdict} the baseline student**: held-out loss {dist['loss']:.4f} against "
        f"{base['loss']:.4f} ({gain:+.4f} nats/token; perplexity {dist['ppl']:.2f} against {base['ppl']:.2f}), "
        "with the same initial weights, data order, steps and tokens.", "",
        "| model | parameters | steps | training tokens | held-out loss | perplexity | top-1 agreement with "
        "teacher | KL(teacher ‖ model) | training tokens/s | peak memory | training time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, model in models.items():
        held, run = model["held_out"], model["training"]
        agreement = f"{held['agreement']:.1%}" if "agreement" in held else "—"
        kl = f"{held['kl']:.4f}" if "kl" in held else "—"
        cached = " (cached)" if run.get("cached") else ""
        lines.append(f"| {name} | {model['parameters'] / 1e6:.2f}M | {run['steps']:,} | {run['tokens']:,} | "
                     f"{held['loss']:.4f} | {held['ppl']:.2f} | {agreement} | {kl} | {run['tokens_per_s']:,.0f} | "
                     f"{_mib(run['peak_memory_bytes'])} | {run['train_seconds']:.0f} s{cached} |")
    kind = models["baseline"]["training"]["peak_memory_kind"]
    memory_note = ("peak CUDA memory allocated by tensors" if kind == "cuda_allocated"
                   else "peak resident memory of the process during that run")
    lines += [
        "", f"Held-out figures are over {base['tokens']:,} held-out tokens: {base['tokens'] // data['context']:,} "
        f"sequences of {data['context']} spread evenly over the held-out files. Peak memory: {memory_note}. "
        "Training tokens/s counts student tokens (the distilled run also runs the teacher).", "",
        *_cache_lines(results), "",
        "![loss curves](loss_curves.png)", "",
        "Wall time: " + ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in timings.items()) + ".", "",
        "## Configuration", "", "```json", json.dumps(results["config"], indent=1), "```", "",
    ]
    return "\n".join(lines)
