"""A teacher run once, cached: its top-k (or sampled) tokens and log-probabilities per position of a fixed
set of sequences, from which any number of students are then distilled with ``kdfast.sparse_kd_loss``.

A teacher's distribution at a position depends on the context before it, so a cache is over the windows of
a :class:`~kdfast.train.data.TokenWindows` (window w = tokens[w * T : (w + 1) * T + 1]), not over a stream
read at random offsets. A student trained from it reads exactly those windows, in TokenWindows' seeded,
resumable order.

Layout of a cache directory (numpy ``.npy`` files, read back memory-mapped):

- ``shard-NNNNN.ids.npy``: (sequences, T, K) token ids in the smallest integer type holding V - 1 and the
  empty slot (int16 up to V = 32768, then uint16 with 65535 as the empty slot, then int32);
- ``shard-NNNNN.logprobs.npy``: (sequences, T, K) log-probabilities at the cache's temperature, float32,
  float16, or bfloat16 stored as its uint16 bit patterns (numpy has no bfloat16);
- ``shard-NNNNN.json``: the size and SHA-256 of the shard's two files, written after them;
- ``plan.json``: the cache's settings and identities, written first, so that a resumed capture can tell
  whether the shards already there belong to it;
- ``manifest.json``: the settings, identities and every shard's checksums, written last: a cache without
  one is unfinished.

Each file is written to a temporary name, flushed to disk and renamed into place, so a capture killed at
any moment leaves whole shards or none; run again, it recomputes only the missing or damaged ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

import kdfast

from .checkpoint import _fsync, _sha256
from .data import TokenWindows
from .lm import autocast, logits_of

FORMAT = 1
MANIFEST, PLAN = "manifest.json", "plan.json"
MODES = ("topk", "sample")
# Stored numpy dtype and torch dtype of each log-prob precision (bf16 as its bit patterns).
LOGPROB_DTYPES = {"fp32": (np.float32, torch.float32), "fp16": (np.float16, torch.float16),
                  "bf16": (np.uint16, torch.bfloat16)}
SHARD_BYTES = 64 << 20  # the default shard size: big enough to read fast, small enough to redo on a resume
IDENTITY_KEYS = ("vocab_size", "k", "temperature", "mode", "n", "context", "sequences", "teacher", "data_sha256")


def id_dtype(vocab_size: int) -> tuple[np.dtype, int]:
    """(numpy dtype, stored value of an empty slot): the smallest integer type holding ids 0..V-1 and the
    empty slot, which is -1 in signed types and the largest value in unsigned ones."""
    if vocab_size <= 2**15:
        return np.dtype(np.int16), -1
    if vocab_size < 2**16:
        return np.dtype(np.uint16), 2**16 - 1
    if vocab_size <= 2**31:
        return np.dtype(np.int32), -1
    return np.dtype(np.int64), -1


def bytes_per_token(vocab_size: int, k: int, logprob_dtype: str) -> int:
    return k * (id_dtype(vocab_size)[0].itemsize + np.dtype(LOGPROB_DTYPES[logprob_dtype][0]).itemsize)


def model_sha256(model: nn.Module) -> str:
    """The identity of a model: SHA-256 of its config (when it has one) and of every tensor of its state dict
    (names, dtypes, shapes and bytes), so the same weights cast to another dtype are another teacher."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if hasattr(config, "to_dict"):  # a Hugging Face config, less the library version that saved it
        settings = {k: v for k, v in config.to_dict().items() if k != "transformers_version"}
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    elif config is not None:
        digest.update(repr(config).encode())
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _write_atomic(path: Path, write: Callable) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, value: dict) -> None:
    _write_atomic(path, lambda f: f.write(json.dumps(value, indent=1).encode()))


def _read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _shard_problem(directory: Path, index: int, sequences: int) -> Optional[str]:
    """Why shard ``index`` is not whole (missing, cut short, damaged), or None when it matches its record."""
    name = _shard_name(index)
    record = _read_json(directory / f"{name}.json")
    if record is None:
        return f"{name}.json is missing or unreadable"
    if record.get("sequences") != sequences:
        return f"{name}.json records {record.get('sequences')} sequences, expected {sequences}"
    for file, expected in record["files"].items():
        path = directory / file
        if not path.is_file():
            return f"{file} is missing"
        if path.stat().st_size != expected["bytes"] or _sha256(path) != expected["sha256"]:
            return f"{file} does not match its checksum (damaged or changed)"
    return None


def _to_storage(ids: Tensor, logprobs: Tensor, vocab_size: int, logprob_dtype: str) -> tuple[np.ndarray, np.ndarray]:
    dtype, empty = id_dtype(vocab_size)
    ids = ids.to(torch.int64).cpu()
    ids_np = torch.where(ids < 0, empty, ids).numpy().astype(dtype)
    stored, torch_dtype = LOGPROB_DTYPES[logprob_dtype]
    logprobs = logprobs.to(torch_dtype).cpu()
    if logprob_dtype == "bf16":
        return ids_np, logprobs.view(torch.int16).numpy().view(np.uint16)
    return ids_np, logprobs.numpy().astype(stored)


def _write_shard(directory: Path, index: int, ids: np.ndarray, logprobs: np.ndarray) -> None:
    name = _shard_name(index)
    files = {}
    for kind, array in (("ids", ids), ("logprobs", logprobs)):
        path = directory / f"{name}.{kind}.npy"
        _write_atomic(path, lambda f, a=array: np.save(f, np.ascontiguousarray(a)))
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    _write_json(directory / f"{name}.json", {"sequences": int(ids.shape[0]), "files": files})


def _dist_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _barrier(world: int) -> None:
    if world > 1:
        dist.barrier()


def _differences(then: dict, now: dict) -> list[str]:
    return [f"{key}: {then.get(key)!r} (cache) vs {now.get(key)!r} (now)" for key in now if then.get(key) != now[key]]


class _Writer:
    """The shards of one cache, written by this process (its share under torchrun), then the manifest."""

    def __init__(self, out_dir: Union[str, Path], header: dict, shard_sequences: Optional[int], log):
        self.dir = Path(out_dir)
        self.rank, self.world = _dist_info()
        per_token = bytes_per_token(header["vocab_size"], header["k"], header["logprob_dtype"])
        per_sequence = per_token * header["context"]
        self.shard_sequences = shard_sequences or max(1, SHARD_BYTES // per_sequence)
        self.header = {"format": FORMAT, **header, "id_dtype": id_dtype(header["vocab_size"])[0].name,
                       "id_empty": id_dtype(header["vocab_size"])[1], "bytes_per_token": per_token,
                       "shard_sequences": self.shard_sequences}
        self.log = log if self.rank == 0 else (lambda *_: None)
        n = header["sequences"]
        self.n_shards = -(-n // self.shard_sequences)
        self.log(f"teacher cache {self.dir}: {n} sequences x {header['context']} tokens, K={header['k']}, "
                 f"{per_token} bytes/token, {per_sequence * n / 2**20:.1f} MiB in {self.n_shards} shard(s)")
        # Every process checks the plan, so that all refuse together rather than some waiting at the barrier.
        plan = _read_json(self.dir / PLAN)
        if plan is not None and plan != self.header:
            changed = "\n  ".join(_differences(plan, self.header))
            raise ValueError(f"{self.dir} holds (part of) another cache:\n  {changed}\nchoose another output "
                             "directory, or delete it to start over")
        if self.rank == 0 and plan is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / MANIFEST).unlink(missing_ok=True)
            _write_json(self.dir / PLAN, self.header)
        _barrier(self.world)

    def rows(self, index: int) -> range:
        return range(index * self.shard_sequences, min((index + 1) * self.shard_sequences, self.header["sequences"]))

    def todo(self) -> list[int]:
        """This process's shards that are not yet whole on disk."""
        return [i for i in range(self.rank, self.n_shards, self.world)
                if _shard_problem(self.dir, i, len(self.rows(i))) is not None]

    def finish(self) -> dict:
        """Waits for every process's shards, checks them all and writes the manifest (rank 0); the manifest."""
        _barrier(self.world)
        if self.rank == 0:
            shards = []
            for i in range(self.n_shards):
                problem = _shard_problem(self.dir, i, len(self.rows(i)))
                if problem is not None:
                    raise RuntimeError(f"teacher cache {self.dir}: shard {i} was not written: {problem}")
                shards.append(_read_json(self.dir / f"{_shard_name(i)}.json"))
            _write_json(self.dir / MANIFEST, {**self.header, "shards": shards})
            _fsync(self.dir)
            size = sum(f["bytes"] for s in shards for f in s["files"].values())
            tokens = self.header["sequences"] * self.header["context"]
            self.log(f"teacher cache {self.dir}: written, {size / 2**20:.1f} MiB on disk, "
                     f"{size / max(tokens, 1):.1f} bytes/token")
        _barrier(self.world)
        return json.loads((self.dir / MANIFEST).read_text())


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # optional
        return None
    return tqdm(total=total, unit="seq", dynamic_ncols=True, desc="teacher cache")


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class CacheConfig:
    """The ``cache:`` section of ``kdfast cache-teacher``'s config (see capture_teacher)."""
    k: int = 32
    temperature: Optional[float] = None  # None: the loss section's temperature (else 1.0)
    mode: str = "topk"
    n: Optional[int] = None  # draws per position for mode "sample"
    dtype: str = "fp16"
    batch_size: int = 16
    seed: int = 0
    shard_sequences: Optional[int] = None
    teacher_dtype: str = "fp32"
    precision: str = "fp32"
    device: str = "auto"
    progress: bool = True


@torch.no_grad()
def capture_teacher(teacher: nn.Module, windows: TokenWindows, out_dir: Union[str, Path], k: int = 32,
                    temperature: float = 1.0, mode: str = "topk", n: Optional[int] = None, dtype: str = "fp16",
                    batch_size: int = 16, seed: int = 0, shard_sequences: Optional[int] = None,
                    autocast_dtype: Optional[torch.dtype] = None, progress: bool = True,
                    log: Callable[[str], None] = _stderr) -> dict:
    """Runs ``teacher`` once over every window of ``windows`` and caches, per window and position, its top
    ``k`` tokens (mode "topk", ``kdfast.teacher_topk``) or ``n`` draws (mode "sample", ``kdfast.teacher_sample``,
    seeded per shard) with their log-probabilities at ``temperature``, log-probs stored as ``dtype`` ("fp32",
    "fp16", "bf16"). Returns the manifest. The teacher runs on the device its parameters are on.

    Resumable: run again with the same arguments after an interruption and only missing or damaged shards
    are computed. Under torchrun, each process computes shards rank, rank + world, ... and rank 0 writes the
    manifest; the cache is the one a single process writes. A directory holding a cache of another teacher,
    data or settings is refused.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}; got {mode!r}")
    if dtype not in LOGPROB_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(LOGPROB_DTYPES)}; got {dtype!r}")
    if mode == "sample":
        if n is None:
            raise ValueError("mode 'sample' needs n, the number of draws per position")
        k = n
    elif n is not None:
        raise ValueError("n applies to mode 'sample' only")
    device = next(teacher.parameters()).device
    was_training = teacher.training
    teacher.eval()
    try:
        vocab = logits_of(teacher(windows.rows(torch.tensor([0]))[0][:, :1].to(device))).shape[-1]
        header = {"vocab_size": vocab, "k": k, "temperature": float(temperature), "mode": mode, "n": n,
                  "logprob_dtype": dtype, "context": windows.context, "sequences": windows.n_windows,
                  "teacher": model_sha256(teacher), "data_sha256": windows.sha256(), "tokenizer": windows.tokenizer,
                  "seed": seed}
        writer = _Writer(out_dir, header, shard_sequences, log)
        todo = writer.todo()
        bar = _progress(progress and writer.rank == 0, sum(len(writer.rows(i)) for i in todo))
        for index in todo:
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + index) if mode == "sample" else None
            ids, logprobs = [], []
            for chunk in torch.tensor(writer.rows(index)).split(batch_size):
                with autocast(device, autocast_dtype):
                    logits = logits_of(teacher(windows.rows(chunk)[0].to(device)))
                if mode == "topk":
                    chunk_ids, chunk_logprobs = kdfast.teacher_topk(logits, k, temperature)
                else:
                    chunk_ids, chunk_logprobs = kdfast.teacher_sample(logits, n, temperature, generator)
                stored = _to_storage(chunk_ids, chunk_logprobs, vocab, dtype)
                ids.append(stored[0])
                logprobs.append(stored[1])
                if bar is not None:
                    bar.update(len(chunk))
            _write_shard(writer.dir, index, np.concatenate(ids), np.concatenate(logprobs))
        if bar is not None:
            bar.close()
        return writer.finish()
    finally:
        teacher.train(was_training)


def write_cache(out_dir: Union[str, Path], ids, logprobs, *, windows: TokenWindows, vocab_size: int,
                temperature: float, teacher: str, mode: str = "topk", n: Optional[int] = None, dtype: str = "fp16",
                shard_sequences: Optional[int] = None, log: Callable[[str], None] = _stderr) -> dict:
    """Writes a teacher cache from arrays computed elsewhere (e.g. an inference server's prompt log-probs).

    Args:
        ids: (windows.n_windows, windows.context, K) integer token ids, -1 for an empty slot; row w, position t
            is the teacher's support for the token after ``windows.rows([w])[0][0, t]``.
        logprobs: the same shape, the teacher's log-probabilities of those ids at ``temperature``.
        windows: the sequences the arrays are for; their hash is the cache's data identity.
        vocab_size: the teacher's vocabulary size V.
        teacher: the teacher's identity, recorded in the manifest (e.g. "org/model@revision").
        mode, n: "topk", or "sample" with n draws per position (log-probs then log(count / n)).
        dtype: the stored log-prob precision, "fp32", "fp16" or "bf16".
    Returns the manifest; the cache reads back with :class:`TeacherCache`.
    """
    ids, logprobs = torch.as_tensor(ids), torch.as_tensor(logprobs)
    expected = (windows.n_windows, windows.context)
    if ids.dim() != 3 or tuple(ids.shape[:2]) != expected or ids.shape != logprobs.shape:
        raise ValueError(f"ids and logprobs must both have shape {(*expected, 'K')} (windows x context x K); got "
                         f"{tuple(ids.shape)} and {tuple(logprobs.shape)}")
    if ids.numel() and (int(ids.max()) >= vocab_size or int(ids.min()) < -1):
        raise ValueError(f"ids must lie in [0, {vocab_size}) or be -1 (an empty slot)")
    header = {"vocab_size": vocab_size, "k": ids.shape[-1], "temperature": float(temperature), "mode": mode, "n": n,
              "logprob_dtype": dtype, "context": windows.context, "sequences": windows.n_windows,
              "teacher": teacher, "data_sha256": windows.sha256(), "tokenizer": windows.tokenizer, "seed": None}
    if mode not in MODES or dtype not in LOGPROB_DTYPES:
        raise ValueError(f"mode must be one of {MODES} and dtype one of {tuple(LOGPROB_DTYPES)}; got {mode!r}, "
                         f"{dtype!r}")
    writer = _Writer(out_dir, header, shard_sequences, log)
    for index in writer.todo():
        rows = writer.rows(index)
        _write_shard(writer.dir, index, *_to_storage(ids[rows.start:rows.stop], logprobs[rows.start:rows.stop],
                                                     vocab_size, dtype))
    return writer.finish()


class TeacherCache:
    """A finished teacher cache, opened for reading: every shard checked against the manifest's checksums
    (``verify=False`` skips the hashing, not the presence and size checks) and memory-mapped."""

    def __init__(self, directory: Union[str, Path], verify: bool = True):
        self.dir = Path(directory)
        manifest = _read_json(self.dir / MANIFEST)
        if manifest is None:
            unfinished = " (its capture is unfinished: run it again to complete it)" if (self.dir / PLAN).exists() \
                else ""
            raise FileNotFoundError(f"teacher cache {self.dir} has no readable {MANIFEST}{unfinished}")
        if manifest.get("format") != FORMAT:
            raise ValueError(f"teacher cache {self.dir} has format {manifest.get('format')!r}; this kdfast reads "
                             f"format {FORMAT}")
        self.manifest = manifest
        self.vocab_size, self.k, self.temperature = manifest["vocab_size"], manifest["k"], manifest["temperature"]
        self.mode, self.context, self.sequences = manifest["mode"], manifest["context"], manifest["sequences"]
        self.logprob_dtype = manifest["logprob_dtype"]
        self.shard_sequences = manifest["shard_sequences"]
        self._ids, self._logprobs = [], []
        for index, record in enumerate(manifest["shards"]):
            for file, expected in record["files"].items():
                path = self.dir / file
                if not path.is_file():
                    raise FileNotFoundError(f"teacher cache {self.dir}: shard file {file} is missing")
                if path.stat().st_size != expected["bytes"] or (verify and _sha256(path) != expected["sha256"]):
                    raise ValueError(f"teacher cache {self.dir}: shard file {file} does not match the manifest's "
                                     "checksum (damaged or changed); capture it again")
            name = _shard_name(index)
            self._ids.append(np.load(self.dir / f"{name}.ids.npy", mmap_mode="r"))
            self._logprobs.append(np.load(self.dir / f"{name}.logprobs.npy", mmap_mode="r"))

    @property
    def tail(self) -> str:
        """The sparse_kd_loss tail that fits the cache: "bucket" for top-k, "raw" (unbiased) for samples."""
        return "bucket" if self.mode == "topk" else "raw"

    def identity(self) -> dict:
        return {key: self.manifest[key] for key in (*IDENTITY_KEYS, "logprob_dtype")}

    def check(self, windows: Optional[TokenWindows] = None, vocab_size: Optional[int] = None,
              temperature: Optional[float] = None, k: Optional[int] = None, teacher: Optional[str] = None) -> None:
        """Refuses (ValueError naming each difference) a cache made for other data, vocabulary, temperature,
        K or teacher than the run's; arguments left None are not checked."""
        now = {"vocab_size": vocab_size, "temperature": None if temperature is None else float(temperature),
               "k": k, "teacher": teacher}
        if windows is not None:
            now.update(context=windows.context, sequences=windows.n_windows, data_sha256=windows.sha256())
        changed = _differences(self.manifest, {key: value for key, value in now.items() if value is not None})
        if windows is not None and self.manifest.get("tokenizer") != windows.tokenizer:  # None is a value here
            changed.append(f"tokenizer: {self.manifest.get('tokenizer')!r} (cache) vs {windows.tokenizer!r} (now)")
        if changed:
            raise ValueError(f"teacher cache {self.dir} does not match this run:\n  " + "\n  ".join(changed))

    def lookup(self, window_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(ids int64 with -1 for empty slots, log-probs) of the given windows, each (len(window_ids), T, K)."""
        empty = self.manifest["id_empty"]
        picks = [divmod(int(w), self.shard_sequences) for w in window_ids]
        ids = torch.from_numpy(np.stack([self._ids[s][r] for s, r in picks]).astype(np.int64))
        if empty != -1:
            ids[ids == empty] = -1
        logprobs = np.stack([self._logprobs[s][r] for s, r in picks])
        if self.logprob_dtype == "bf16":
            return ids, torch.from_numpy(logprobs.view(np.int16)).view(torch.bfloat16)
        return ids, torch.from_numpy(logprobs)

    def __repr__(self) -> str:
        return (f"TeacherCache({str(self.dir)!r}, V={self.vocab_size}, K={self.k}, T={self.temperature}, "
                f"mode={self.mode!r}, {self.sequences} x {self.context} tokens)")
