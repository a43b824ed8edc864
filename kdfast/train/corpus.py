"""The demo's corpus: text files read, split into train and held-out sets by name, and
tokenized with a byte-level BPE tokenizer trained on them."""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

import torch
from torch import Tensor

from .config import require

END_OF_TEXT = "<|endoftext|>"
# Folders of the standard library that hold tests and third-party packages, not library code.
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def python_stdlib_files() -> tuple[Path, list[str]]:
    """This Python's standard library: its folder and the relative paths of its .py files (tests excluded)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                   if not _STDLIB_SKIP.intersection(p.relative_to(root).parts[:-1]))
    if not names:
        raise FileNotFoundError(f"no .py files found under the standard library folder {root}")
    return root, names


def split_files(names: list[str], eval_fraction: float) -> tuple[list[str], list[str]]:
    """(train, held-out) by a hash of each file's name: stable as files are added or removed."""
    if not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    held_out = {n for n in names if int(hashlib.sha256(n.encode()).hexdigest()[:8], 16) < eval_fraction * 2**32}
    return [n for n in names if n not in held_out], [n for n in names if n in held_out]


def read_texts(root: Path, names: list[str]) -> list[str]:
    return [(root / name).read_text(encoding="utf-8", errors="replace") for name in names]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer (any text encodes, no unknown tokens) with END_OF_TEXT as token 0."""
    tk = require("tokenizers", "demo", "training a tokenizer")
    tokenizer = tk.Tokenizer(tk.models.BPE())
    tokenizer.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[END_OF_TEXT], show_progress=False,
                                     initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def encode_texts(texts: list[str], tokenizer) -> Tensor:
    """One stream: each text's tokens followed by END_OF_TEXT."""
    eot = tokenizer.token_to_id(END_OF_TEXT)
    if eot is None:
        raise ValueError(f"the tokenizer has no {END_OF_TEXT} token")
    ids = []
    for encoding in tokenizer.encode_batch(texts):
        ids.extend(encoding.ids)
        ids.append(eot)
    return torch.tensor(ids, dtype=torch.int32)
