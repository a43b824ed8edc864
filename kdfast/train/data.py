"""Token streams cut into fixed-length windows, in an order that makes resuming and DDP exact.

A training batch is a pure function of (seed, batch index, rank): window k of the
global order is ``perm_e[k % n]`` with e = k // n and perm_e a permutation drawn from
(seed, e). A run resumes from its step alone, and W processes with batch B read the
same windows as one process with batch W * B. :class:`MaskedWindows` are such windows whose
targets are ignore_index where a token is not to be learnt (e.g. a prompt).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor


class TokenWindows:
    """Windows of ``context + 1`` tokens from a 1-D token stream: (inputs, targets) of length context.
    ``tokenizer``: the identity of the tokenizer that made the tokens (e.g. the sha256 of its file), when known;
    part of the windows' identity (sha256), so that a teacher cache is refused for another tokenizer's ids."""

    def __init__(self, tokens: Union[Tensor, np.ndarray], context: int, seed: int = 0,
                 tokenizer: Optional[str] = None):
        tokens = torch.as_tensor(tokens)
        if tokens.dim() != 1 or tokens.dtype.is_floating_point:
            raise ValueError(f"tokens must be a 1-D integer tensor, got {tokens.dtype} of shape {tuple(tokens.shape)}")
        if context < 1:
            raise ValueError(f"context must be >= 1, got {context}")
        self.tokens = tokens
        self.context = context
        self.seed = seed
        self.tokenizer = tokenizer
        self.n_windows = (len(tokens) - 1) // context
        if self.n_windows < 1:
            raise ValueError(f"{len(tokens)} tokens do not fill one window of context {context} (+1 target)")
        self._epoch, self._perm = -1, None

    def _offsets(self, window_ids: Tensor) -> Tensor:
        """The stream positions of the given windows, (len(window_ids), context + 1)."""
        return window_ids[:, None] * self.context + torch.arange(self.context + 1)

    def rows(self, window_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, targets) of the given windows: window k is tokens[k * context : (k + 1) * context + 1]."""
        rows = self.tokens[self._offsets(window_ids)].long()
        return rows[:, :-1], rows[:, 1:]

    def _order(self, k: int) -> int:
        """The window at position k of the endless shuffled order."""
        epoch, index = divmod(k, self.n_windows)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_windows, generator=gen)
        return int(self._perm[index])

    def batch_windows(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> Tensor:
        """The window numbers of batch ``index`` of this rank: its batch_size windows of the global batch."""
        first = (index * world_size + rank) * batch_size
        return torch.tensor([self._order(k) for k in range(first, first + batch_size)])

    def batch(self, index: int, batch_size: int, rank: int = 0, world_size: int = 1) -> tuple[Tensor, Tensor]:
        """Batch number ``index`` of this rank: (inputs, targets) of batch_windows(index, ...)."""
        return self.rows(self.batch_windows(index, batch_size, rank, world_size))

    def sha256(self) -> str:
        """The identity of the windows (context, the tokens they cover and their tokenizer when known), whatever
        dtype holds the tokens: a teacher cache is valid for exactly these sequences."""
        digest = hashlib.sha256(f"context={self.context};".encode())
        if self.tokenizer is not None:
            digest.update(f"tokenizer={self.tokenizer};".encode())
        covered = self.tokens[:self.n_windows * self.context + 1].to(torch.int64).contiguous()
        digest.update(covered.numpy().astype("<i8").tobytes())
        return digest.hexdigest()

    def spread(self, max_windows: int, batch_size: int, rank: int = 0,
               world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
        """max_windows windows evenly spaced over the stream (all when there are fewer), in stream
        order, this rank's share: a fixed held-out sample that covers every part of the data."""
        count = min(max_windows, self.n_windows)
        mine = (torch.arange(count) * self.n_windows // count)[rank::world_size]
        for chunk in mine.split(batch_size):
            yield self.rows(chunk)


class MaskedWindows(TokenWindows):
    """TokenWindows whose targets are ``ignore_index`` where ``counted`` is False: (input_ids, targets) pairs in
    which only some tokens are learnt, e.g. prompt/response pairs packed into one stream with the prompts
    masked (:meth:`from_pairs`). ``counted[i]`` says whether token i is a target. The windows, their order
    and their identity (sha256) are TokenWindows': a teacher cache of the same tokens serves them too, since
    the teacher's distribution does not depend on which targets count."""

    def __init__(self, tokens: Union[Tensor, np.ndarray], counted: Union[Tensor, np.ndarray], context: int,
                 seed: int = 0, ignore_index: int = -100, tokenizer: Optional[str] = None):
        super().__init__(tokens, context, seed, tokenizer)
        counted = torch.as_tensor(counted)
        if counted.dtype != torch.bool or counted.shape != self.tokens.shape:
            raise ValueError(f"counted must be a bool tensor of the tokens' shape {tuple(self.tokens.shape)}, got "
                             f"{counted.dtype} of shape {tuple(counted.shape)}")
        self.counted, self.ignore_index = counted, ignore_index

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[Sequence[int], Sequence[int]]], context: int, seed: int = 0,
                   ignore_index: int = -100) -> MaskedWindows:
        """(prompt ids, response ids) pairs, concatenated in their order into one stream in which only the
        response tokens are targets. Windows cut the stream wherever they fall, as packed training does: a
        window may start inside a pair, and its positions attend to the pairs before them in it."""
        tokens, counted = [], []
        for prompt, response in pairs:
            for ids, learnt in ((prompt, False), (response, True)):
                ids = torch.as_tensor(ids, dtype=torch.long).flatten()
                tokens.append(ids)
                counted.append(torch.full(ids.shape, learnt))
        if not tokens:
            raise ValueError("no (prompt, response) pairs given")
        return cls(torch.cat(tokens), torch.cat(counted), context, seed, ignore_index)

    def rows(self, window_ids: Tensor) -> tuple[Tensor, Tensor]:
        """(inputs, targets) as TokenWindows.rows, with ignore_index at the targets that do not count."""
        inputs, targets = super().rows(window_ids)
        counted = self.counted[self._offsets(window_ids)[:, 1:]]
        return inputs, targets.masked_fill(~counted, self.ignore_index)


def load_tokens(path: Union[str, Path]) -> Tensor:
    """A 1-D token tensor from a .npy file or a torch.save'd tensor (.pt)."""
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, mmap_mode="r").astype(np.int32))
    return torch.load(path, weights_only=True)


def save_tokens(tokens: Tensor, path: Union[str, Path]) -> None:
    """Stores tokens as .npy in the smallest unsigned dtype that holds them."""
    array = tokens.numpy()
    dtype = np.uint16 if array.max(initial=0) < 2**16 else np.uint32
    np.save(path, array.astype(dtype))
