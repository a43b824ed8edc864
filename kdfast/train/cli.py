"""The ``kdfast`` command (also ``python -m kdfast``): ``distill``, ``cache-teacher`` and ``demo``.

All read a YAML or TOML config; ``--set key.sub=value`` overrides any entry, so sizes,
steps and device change without editing the file. Under ``torchrun`` they train
data-parallel, unchanged.
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import json
import sys
from pathlib import Path
from typing import Optional

import torch

from kdfast import LossOptions

from .config import apply_overrides, build, build_model, check_keys, load_config, require, save_weights, section
from .corpus import encode_texts, read_texts, split_files
from .data import TokenWindows, load_tokens
from .runtime import init_distributed, leave_distributed, resolve_device
from .teacher_cache import CacheConfig, TeacherCache, capture_teacher
from .trainer import PRECISIONS, TEACHER_DTYPES, DistillTrainer, TrainConfig

DISTILL_EXAMPLE = """\
example config (YAML; TOML with the same keys works too; paths are relative to the folder
it runs in, numbers such as 1e-3 are numbers):

  data:
    train_tokens: data/train.npy   # a 1-D token array (.npy, or a torch.save'd tensor)
    eval_tokens: data/eval.npy     # optional held-out tokens
    vocab_size: 4096               # the tokenizer's size, for gpt models
    context: 128
    # or text files and a tokenizer (split into train / held-out by file):
    # text: ["corpus/**/*.txt"]
    # tokenizer: tokenizer.json    # a Hugging Face `tokenizers` file
    # eval_fraction: 0.05
  teacher: {hf: path/to/model}     # or {gpt: {n_layer: 4, d_model: 256}, weights: teacher.safetensors},
                                   # or {cache: DIR}: a teacher cache of train_tokens (kdfast cache-teacher)
  student: {hf_config: {model_type: llama, hidden_size: 256, num_hidden_layers: 2,
                        num_attention_heads: 4, intermediate_size: 512}}
  train: {out_dir: runs/distill, steps: 1000, batch_size: 16, lr: 1e-3, precision: bf16}
  loss: {temperature: 2.0, hard_weight: 0.5, soft_weight: 0.5}

The trained student is written to OUT_DIR/student.safetensors (or OUT_DIR/student/ for a
Hugging Face model). Run it again to resume after an interruption; under torchrun
(torchrun --nproc_per_node N -m kdfast distill ...) it trains data-parallel, each process
holding whole models (train.parallel: ddp, the default) or shards of them (train.parallel: fsdp).
"""


def _load_data(spec: dict, seed: int) -> tuple[TokenWindows, Optional[TokenWindows], Optional[int]]:
    """(train windows, held-out windows or None, the tokenizer's vocabulary size when known)."""
    check_keys(spec, ("train_tokens", "eval_tokens", "vocab_size", "text", "tokenizer", "eval_fraction", "context"),
               "data")
    context = int(spec.get("context", 128))
    tokenizer_id = None  # known when the text is encoded here
    if "train_tokens" in spec:
        train, held_out = load_tokens(spec["train_tokens"]), spec.get("eval_tokens")
        held_out = load_tokens(held_out) if held_out else None
        vocab = spec.get("vocab_size")
    elif "text" in spec and "tokenizer" in spec:
        patterns = [spec["text"]] if isinstance(spec["text"], str) else spec["text"]
        names = sorted({name for pattern in patterns for name in glob.glob(pattern, recursive=True)
                        if Path(name).is_file()})
        if not names:
            raise ValueError(f"data.text matches no files: {patterns}")
        tokenizer = require("tokenizers", "demo", "data.tokenizer").Tokenizer.from_file(str(spec["tokenizer"]))
        train_names, eval_names = split_files(names, float(spec.get("eval_fraction", 0.05)))
        train = encode_texts(read_texts(Path("."), train_names), tokenizer)
        held_out = encode_texts(read_texts(Path("."), eval_names), tokenizer) if eval_names else None
        vocab = tokenizer.get_vocab_size()
        tokenizer_id = hashlib.sha256(Path(spec["tokenizer"]).read_bytes()).hexdigest()
    else:
        raise ValueError("the data section needs train_tokens (a token file), or text and tokenizer")
    return (TokenWindows(train, context, seed, tokenizer_id),
            None if held_out is None else TokenWindows(held_out, context, seed, tokenizer_id), vocab)


CACHE_EXAMPLE = """\
example config (YAML; the data and teacher sections are those of kdfast distill, so one file
serves both commands; paths are relative to the folder it runs in):

  data: {train_tokens: data/train.npy, eval_tokens: data/eval.npy, vocab_size: 4096, context: 128}
  teacher: {gpt: {n_layer: 4, n_head: 4, d_model: 256}, weights: teacher.safetensors}
  student: {gpt: {n_layer: 2, n_head: 4, d_model: 128}}
  train: {out_dir: runs/cached, steps: 1000, batch_size: 16, lr: 3e-3}
  loss: {temperature: 1.0, hard_weight: 0.5, soft_weight: 0.5}
  cache: {k: 32, dtype: fp16, batch_size: 16}   # mode: sample and n: 64 for sampled tokens

then distil any number of students from the cache, with no teacher model loaded:

  kdfast cache-teacher --config cached.yaml --out runs/teacher-cache
  kdfast distill --config cached.yaml --set 'teacher={cache: runs/teacher-cache}'

cache keys: k (tokens per position), temperature (default: the loss's), mode (topk or
sample), n (draws per position for sample), dtype (log-probs: fp32, fp16 or bf16),
batch_size, seed (of the draws), shard_sequences, teacher_dtype, precision, device, progress.
A killed capture resumes where it stopped when run again; under torchrun each process
captures its share of the shards.
"""


def cache_teacher(config: dict, out_dir: str) -> dict:
    """Captures config's teacher on its training windows into out_dir; returns the manifest."""
    check_keys(config, ("data", "teacher", "student", "train", "loss", "cache"), "the config")
    cfg = build(CacheConfig, section(config, "cache"), "cache")
    if cfg.temperature is None:
        cfg.temperature = build(LossOptions, section(config, "loss"), "loss").temperature
    for name, choices in (("teacher_dtype", TEACHER_DTYPES), ("precision", PRECISIONS)):
        if getattr(cfg, name) not in choices:
            raise ValueError(f"cache.{name} must be one of {', '.join(choices)}; got {getattr(cfg, name)!r}")
    train, _, vocab = _load_data(section(config, "data", required=True), cfg.seed)
    spec = section(config, "teacher", required=True)
    if "cache" in spec:
        raise ValueError("cache-teacher needs a teacher model in the 'teacher' section, not a cache")
    rank, _, local_rank = init_distributed()
    teacher = build_model(spec, "teacher", vocab).to(resolve_device(cfg.device, local_rank),
                                                     dtype=TEACHER_DTYPES[cfg.teacher_dtype])
    manifest = capture_teacher(teacher, train, out_dir, k=cfg.k, temperature=cfg.temperature, mode=cfg.mode,
                               n=cfg.n, dtype=cfg.dtype, batch_size=cfg.batch_size, seed=cfg.seed,
                               shard_sequences=cfg.shard_sequences, autocast_dtype=PRECISIONS[cfg.precision],
                               progress=cfg.progress)
    if rank == 0:
        print(json.dumps({key: value for key, value in manifest.items() if key != "shards"}, indent=1))
    return manifest


def _teacher(spec: dict, vocab: Optional[int]):
    """The teacher model, or an opened TeacherCache for ``{cache: DIR}``."""
    if "cache" in spec:
        check_keys(spec, ("cache",), "teacher")
        return TeacherCache(spec["cache"])
    return build_model(spec, "teacher", vocab)


def distill(config: dict) -> dict:
    """Distils config's teacher (or teacher cache) into its student; returns the training summary."""
    check_keys(config, ("data", "teacher", "student", "train", "loss", "cache"), "the config")  # cache: cache-teacher's
    train_cfg = build(TrainConfig, section(config, "train"), "train")
    loss_options = build(LossOptions, section(config, "loss"), "loss")
    train, held_out, vocab = _load_data(section(config, "data", required=True), train_cfg.seed)
    teacher = _teacher(section(config, "teacher", required=True), vocab)
    torch.manual_seed(train_cfg.seed)
    student = build_model(section(config, "student", required=True), "student", vocab)
    trainer = DistillTrainer(student, train, train_cfg, teacher=teacher, eval_data=held_out, loss_options=loss_options)
    summary = trainer.train()
    state = trainer.student_state_dict()  # whole on rank 0, gathered by every process from a sharded student
    if trainer.rank == 0:
        out = Path(train_cfg.out_dir)
        if hasattr(student, "save_pretrained"):
            student.save_pretrained(out / "student", state_dict=state)
        else:
            save_weights(student, out / "student.safetensors", state)
        print(json.dumps(summary, indent=1))
    return summary


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdfast", description="Fast, memory-efficient knowledge distillation.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    overrides = dict(action="append", default=[], metavar="KEY=VALUE",
                     help="override a config entry, e.g. --set train.steps=100 (repeatable)")
    run = commands.add_parser("distill", help="distil a teacher into a student from a config file",
                              description="Distil a teacher LM into a student LM.", epilog=DISTILL_EXAMPLE,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--config", required=True, help="a YAML or TOML file")
    run.add_argument("--set", dest="overrides", **overrides)
    cache = commands.add_parser("cache-teacher", help="run a teacher once over the training data and cache its "
                                "top-k (or sampled) distributions",
                                description="Cache a teacher's top-k (or sampled) tokens and log-probs on the "
                                            "training windows, for kdfast distill with teacher: {cache: DIR}.",
                                epilog=CACHE_EXAMPLE, formatter_class=argparse.RawDescriptionHelpFormatter)
    cache.add_argument("--config", required=True, help="a YAML or TOML file")
    cache.add_argument("--out", required=True, help="the cache's folder (created; an unfinished capture there "
                                                    "is resumed)")
    cache.add_argument("--set", dest="overrides", **overrides)
    demo = commands.add_parser(
        "demo", help="the main job: train a tokenizer, a teacher and three students on the Python standard library",
        description="Train a tokenizer and a teacher on this Python's standard library source, then the same "
                    "student three times (hard labels; distilled; distilled from a cache of the teacher), and "
                    "write a report comparing them.")
    demo.add_argument("--config", default="configs/demo.yaml", help="a YAML or TOML file (default: %(default)s)")
    demo.add_argument("--out", default="runs/demo", help="the report's folder (default: %(default)s)")
    demo.add_argument("--set", dest="overrides", **overrides)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = _parser().parse_args(argv)
    finished = False
    try:
        config = apply_overrides(load_config(args.config), args.overrides)
        if args.command == "distill":
            distill(config)
        elif args.command == "cache-teacher":
            cache_teacher(config, args.out)
        else:
            from .demo import Demo

            Demo(config, args.out).run()
        finished = True
    except (ValueError, OSError, ImportError) as exc:  # bad input: a message, not a traceback
        print(f"kdfast {args.command}: error: {exc}", file=sys.stderr)
        return 2
    finally:
        leave_distributed(finished)
    return 0
