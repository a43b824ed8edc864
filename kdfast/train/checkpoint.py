"""Checkpoints that survive a kill at any moment.

A checkpoint is a directory ``step-NNNNNNNN`` holding ``state.pt`` and ``manifest.json``
(the size and SHA-256 of every other file in it: a sharded run adds those that
torch.distributed.checkpoint writes, each process's shards). It is written under a
temporary name (begin_checkpoint), the manifest last, flushed to disk, then renamed into
place (finish_checkpoint), so a reader sees a whole checkpoint or none. One whose manifest
is missing or does not match (a disk error, a copy cut short, a hand edit) is set aside as
``NAME.corrupt`` with a warning and the one before it is used: nothing is deleted but
checkpoints older than the last ``keep_last``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Optional, Union

import torch

STATE = "state.pt"
MANIFEST = "manifest.json"
_NAME = re.compile(r"step-(\d+)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def checkpoints(directory: Union[str, Path]) -> list[Path]:
    """The checkpoints in directory, oldest first (corrupt ones set aside are not listed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def begin_checkpoint(directory: Union[str, Path], step: int) -> Path:
    """The empty temporary directory that checkpoint ``step`` is written into before finish_checkpoint
    publishes it; temporary directories left by a writer that was killed are removed first."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = directory / f".tmp-step-{step:08d}"
    tmp.mkdir()
    return tmp


def finish_checkpoint(tmp: Path, step: int, keep_last: int = 3) -> Path:
    """Publishes the checkpoint written into ``tmp`` (begin_checkpoint's): a manifest of the size and SHA-256 of
    every file in it, written last and flushed to disk with them, then the rename into place; then removes all
    but the last keep_last checkpoints."""
    tmp = Path(tmp)
    directory, final = tmp.parent, tmp.parent / f"step-{step:08d}"
    files = sorted(f for f in tmp.rglob("*") if f.is_file())
    for file in files:
        _fsync(file)
    manifest = {"format": 1, "step": step,
                "files": {f.relative_to(tmp).as_posix(): {"bytes": f.stat().st_size, "sha256": _sha256(f)}
                          for f in files}}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    if final.exists():  # the same step written again after resuming from an earlier checkpoint
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(directory)
    for old in checkpoints(directory)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old)
    return final


def save_checkpoint(directory: Union[str, Path], step: int, state: dict, keep_last: int = 3) -> Path:
    """Writes state as checkpoint ``step`` atomically, then removes all but the last keep_last."""
    tmp = begin_checkpoint(directory, step)
    torch.save(state, tmp / STATE)
    return finish_checkpoint(tmp, step, keep_last)


def verify_checkpoint(path: Union[str, Path]) -> Optional[str]:
    """Why the checkpoint at path is not whole, or None when its files match its manifest."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"no readable {MANIFEST} ({exc.__class__.__name__}: {exc})"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != expected["bytes"]:
            return f"{name} has {file.stat().st_size} bytes, the manifest says {expected['bytes']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest"
    return None


def latest_checkpoint(directory: Union[str, Path]) -> Optional[Path]:
    """The newest whole checkpoint; newer corrupt ones are renamed NAME.corrupt, with a warning."""
    for path in reversed(checkpoints(directory)):
        reason = verify_checkpoint(path)
        if reason is None:
            return path
        aside = path.with_name(path.name + ".corrupt")
        n = 1
        while aside.exists():
            n += 1
            aside = path.with_name(f"{path.name}.corrupt{n}")
        path.rename(aside)
        warnings.warn(f"kdfast: checkpoint {path} is corrupt ({reason}); moved it to {aside.name} and using the "
                      f"one before it", stacklevel=2)
    return None


def load_checkpoint(path: Union[str, Path], map_location: Union[str, torch.device] = "cpu") -> dict:
    return torch.load(Path(path) / STATE, map_location=map_location, weights_only=True)


def ensure_writable_dir(path: Union[str, Path]) -> Path:
    """Creates path if needed and checks that files can be written there, with an error that names it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise OSError(f"the output directory {path} is not writable: {exc.strerror or exc}") from exc
    return path
