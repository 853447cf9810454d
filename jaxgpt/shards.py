"""Token shards: llm.c's file format, a dataset as one stream of shards, and the order windows are read in.

A shard is llm.c's `dev/data/fineweb.py` format, so shards made here train llm.c and modded-nanogpt and
theirs train here: a 1024-byte header of 256 little-endian int32 (magic 20240520, version 1 = uint16 ids,
2 = uint32 ids, the token count), then the ids. nanoGPT's headerless train.bin is a stream of one shard
with no header. A split is the concatenation of its shards in order (`TokenStream`); windows are cut from
it either at random offsets (nanoGPT's get_batch, `--data_order=random`) or every window once per epoch
(`EpochOrder`, `--data_order=epoch`), both a function of (seed, step) alone: no sampler state to save,
the same batches on any number of hosts, and each host reads only its rows.
"""
from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from jaxgpt import paths
from jaxgpt.errors import UserError

MAGIC = 20240520  # llm.c's
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
VERSIONS: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}  # llm.c: 1 = GPT-2's uint16 ids, 2 = LLaMA-3's uint32


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 where every id fits (byte-level data too: llm.c's format has no uint8), else uint32."""
    return VERSIONS[1] if vocab_size <= 1 << 16 else VERSIONS[2]


def header(n_tokens: int, dtype: np.dtype) -> bytes:
    """The 1024-byte header of a shard of n_tokens ids of `dtype`."""
    if n_tokens >= 2**31:
        raise UserError(f"a shard of {n_tokens:,} tokens does not fit llm.c's int32 count; use a smaller --shard_tokens")
    h = np.zeros(HEADER_INTS, "<i4")
    h[0], h[1], h[2] = MAGIC, 1 if np.dtype(dtype).itemsize == 2 else 2, n_tokens
    return h.tobytes()


def parse_header(raw: bytes, size: int, name: object) -> tuple[int, np.dtype]:
    """(token count, dtype) of an llm.c shard of `size` bytes from its first bytes `raw`; one clear error
    for anything else."""
    h = np.frombuffer(raw[:HEADER_BYTES], "<i4") if len(raw) >= HEADER_BYTES else np.zeros(HEADER_INTS, "<i4")
    if h[0] != MAGIC:
        raise UserError(f"{name} is not an llm.c token shard (its header does not start with the magic {MAGIC}); "
                        f"give a folder of shards written by prepare.py or llm.c")
    if int(h[1]) not in VERSIONS:
        raise UserError(f"{name}: llm.c shard version {int(h[1])} is not one this reads (1 = uint16, 2 = uint32 ids)")
    dtype, count = VERSIONS[int(h[1])], int(h[2])
    if size != HEADER_BYTES + count * dtype.itemsize:
        raise UserError(f"{name} holds {size:,} bytes but its header says {count:,} tokens "
                        f"({HEADER_BYTES + count * dtype.itemsize:,} bytes): the file is truncated or damaged; "
                        f"prepare or download it again")
    return count, dtype


class ShardWriter:
    """The open shard: a temporary file with a placeholder header, the header written when it is finished."""

    def __init__(self, folder: Path, dtype: np.dtype, task: int = 0):
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".shard-{task:04d}-")
        self.path, self.f, self.tokens, self.dtype = Path(name), os.fdopen(fd, "wb"), 0, dtype
        self.f.write(bytes(HEADER_BYTES))

    def write(self, ids: np.ndarray) -> None:
        self.f.write(ids.astype(self.dtype, copy=False).tobytes())
        self.tokens += len(ids)

    def finish(self) -> tuple[Path, str]:
        self.f.seek(0)
        self.f.write(header(self.tokens, self.dtype))
        self.f.close()
        return self.path, paths.sha256(self.path)

    def discard(self) -> None:
        self.f.close()
        self.path.unlink(missing_ok=True)


@dataclass(frozen=True)
class Shard:
    """One file of a split: `tokens` ids of `dtype` starting `offset` bytes in (1024 with a header, 0 without).
    `fetch` (remote data) makes the local file exist and returns its path; None: `path` is local already."""

    path: str
    tokens: int
    dtype: str
    offset: int = HEADER_BYTES
    fetch: Callable[[], str] | None = None


class TokenStream:
    """The shards of one split read as one array of ids: `read(start, n)` may cross shard boundaries.
    Files are read with os.pread on descriptors opened once (no memmap, so resident memory stays flat),
    and a remote shard is fetched the first time a read touches it."""

    def __init__(self, shards: Sequence[Shard]):
        self.shards = list(shards)
        self.starts = np.cumsum([0] + [s.tokens for s in self.shards])
        self.n_tokens = int(self.starts[-1])
        self._fds: dict[int, int] = {}
        self._lock = threading.Lock()

    def _fd(self, i: int) -> int:
        with self._lock:
            if i not in self._fds:
                shard = self.shards[i]
                self._fds[i] = os.open(shard.fetch() if shard.fetch else shard.path, os.O_RDONLY)
            return self._fds[i]

    def prefetch(self, i: int) -> None:
        """Open (and for remote data fetch) shard i in the background."""
        if 0 <= i < len(self.shards) and i not in self._fds:
            threading.Thread(target=self._fd, args=(i,), daemon=True).start()

    def read(self, start: int, n: int) -> np.ndarray:
        """ids start .. start+n-1 of the stream, in their stored dtype."""
        if start < 0 or start + n > self.n_tokens:
            raise IndexError(f"tokens {start}..{start + n} outside the stream of {self.n_tokens}")
        parts, i = [], int(np.searchsorted(self.starts, start, side="right")) - 1
        while n > 0:
            shard, at = self.shards[i], start - int(self.starts[i])
            take = min(n, shard.tokens - at)
            dtype = np.dtype(shard.dtype)
            raw = os.pread(self._fd(i), take * dtype.itemsize, shard.offset + at * dtype.itemsize)
            parts.append(np.frombuffer(raw, dtype))
            start, n, i = start + take, n - take, i + 1
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def head(self, n: int) -> np.ndarray:
        """The first min(n, all) ids (evaluation reads at most --val_tokens of a split)."""
        return self.read(0, min(n, self.n_tokens) if n else self.n_tokens)

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class EpochOrder:
    """Every window of block_size + 1 tokens of a split once per epoch (windows start at multiples of
    block_size inside a shard and never cross one), in a seeded order: each epoch visits the shards in
    a permutation of their own and, within a shard, its windows in another, so the reads of a stretch
    of steps stay in one shard (llm.c's loader does the same). `starts(i)` maps global window indices
    (step * batch + row) to stream offsets; the permutations are drawn from (seed, epoch, shard) alone."""

    def __init__(self, stream: TokenStream, block_size: int, seed: int):
        self.stream, self.block_size, self.seed = stream, block_size, seed
        self.per_shard = np.array([max(0, (s.tokens - 1) // block_size) for s in stream.shards], np.int64)
        self.windows = int(self.per_shard.sum())
        if self.windows == 0:
            raise UserError(f"no shard holds a whole window of {block_size + 1} tokens; use more data or a "
                            f"smaller --block_size")

    @lru_cache(maxsize=4)  # noqa: B019  (a handful of arrays, freed with the order)
    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.per_shard))
        return order, np.cumsum(self.per_shard[order])

    @lru_cache(maxsize=4)  # noqa: B019
    def _within(self, epoch: int, shard: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch, shard]).permutation(int(self.per_shard[shard]))

    def starts(self, index: np.ndarray) -> np.ndarray:
        """Stream offsets of the windows with these global indices (any shape)."""
        flat = np.asarray(index, np.int64).reshape(-1)
        out = np.empty_like(flat)
        for k, i in enumerate(flat):
            epoch, p = divmod(int(i), self.windows)
            order, ends = self._epoch(epoch)
            pos = int(np.searchsorted(ends, p, side="right"))
            shard = int(order[pos])
            j = p - (int(ends[pos - 1]) if pos else 0)
            out[k] = int(self.stream.starts[shard]) + int(self._within(epoch, shard)[j]) * self.block_size
        return out.reshape(np.shape(index))

    def shard_of(self, index: int) -> int:
        """The shard the window with this global index lies in (to prefetch the next one)."""
        epoch, p = divmod(int(index), self.windows)
        order, ends = self._epoch(epoch)
        return int(order[int(np.searchsorted(ends, p, side="right"))])
