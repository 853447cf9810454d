"""Reading prepared data: a dataset folder (local or gs://) opened as token streams, checked once,
and the batches a run draws from it.

Three layouts are read: prepare.py's shard folders (meta.json lists train_/val_ shards in llm.c's format),
llm.c / modded-nanogpt shard folders as they are (`*train*.bin` / `*val*.bin` with llm.c's header, no
meta.json: the vocabulary from --vocab_size), and nanoGPT's headerless train.bin / val.bin. A gs:// folder's
shards are fetched on first read, in ranged chunks, into the user's cache and checked against meta.json's
sha256 once per file version (the verdict is kept), so a host fetches only the shards it reads.
Batches are nanoGPT's get_batch -- random windows of block_size+1 tokens -- or, with order='epoch', every
window once per epoch (shards.EpochOrder); both drawn from (seed, split, step) alone: a resumed run draws
exactly the batches an uninterrupted run would, and every process cuts its own rows out of the same global batch.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxgpt import paths, shards
from jaxgpt.errors import UserError
from jaxgpt.shards import Shard, TokenStream
from jaxgpt.tokenizer import BYTES_IDENTITY, TOKENIZER_FILE

SPLITS = ("train", "val")
VERIFIED_FILE = ".verified.json"  # a folder's hash verdicts, keyed by file size and mtime


def _again(folder: Any) -> str:
    return f"prepare the data again (python scripts/prepare.py ... --data_dir {paths.path(folder).parent})"


def read_meta(folder: str | Path) -> dict:
    """A prepared dataset's meta.json, with the defaults of byte-level data written before
    tokenizers were recorded."""
    path = paths.path(folder) / "meta.json"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({paths.describe(e, 80)}); {_again(folder)}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; {_again(folder)}")
    meta.setdefault("tokenizer_identity", dict(BYTES_IDENTITY))
    meta.setdefault("dtype", "uint8")
    counts = {k: meta.get(k) for k in ("vocab_size", "train_tokens", "val_tokens") if k in meta}
    bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if meta.get("dtype") not in ("uint8", "uint16", "uint32"):
        bad.append("dtype")
    if not isinstance(meta["tokenizer_identity"], dict) or not isinstance(meta.get("files", {}), dict):
        bad.append("tokenizer_identity/files")
    if meta.get("format") == "shards" and not all(isinstance(meta.get("shards", {}).get(s), list) for s in SPLITS):
        bad.append("shards")
    if bad or "vocab_size" not in meta:
        raise UserError(f"{path} is damaged ({', '.join(bad) or 'vocab_size missing'} not what prepare.py writes); "
                        f"{_again(folder)}")
    return meta


def data_vocab(data_dir: str, dataset: str) -> int | None:
    """The vocabulary a prepared dataset records (local or gs://), None where it records none (yet)."""
    folder = paths.path(data_dir) / dataset
    try:
        present = (folder / "meta.json").exists()
    except Exception:  # an unreachable bucket: the run's own checks say so in one line
        return None
    return read_meta(folder)["vocab_size"] if present else None


# --- verdicts: a file's sha256 checked once per version ------------------------------------------------------

def _verdict_cache(folder: Path) -> Path:
    """Where a folder's verdicts are kept: in it, or (read-only data) in the user's cache."""
    if os.access(folder, os.W_OK):
        return folder / VERIFIED_FILE
    return paths.cache_home() / "verified" / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16] + ".json")


def _verified(path: Path, want: str) -> bool:
    """True when `path` has sha256 `want`; hashed only when its size or mtime changed since the last verdict."""
    cache = _verdict_cache(path.parent)
    try:
        verdicts = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        verdicts = {}
    stat = path.stat()
    key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": want}
    if verdicts.get(path.name) == key:
        return True
    if paths.sha256(path) != want:
        return False
    verdicts[path.name] = key
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        paths.write_bytes(cache, json.dumps(verdicts, indent=1).encode())
    except OSError:  # a cache that cannot be written only costs hashing again next time
        pass
    return True


def check_dataset(folder: str | Path, meta: dict) -> None:
    """Refuse a local nanoGPT-layout folder that is not what prepare.py wrote, with one line naming the file
    and the remedy: each split's size against meta.json (every time), its sha256 once per file version."""
    folder = Path(folder)
    itemsize = np.dtype(meta.get("dtype", "uint8")).itemsize
    for split in SPLITS:
        path, tokens = folder / f"{split}.bin", meta.get(f"{split}_tokens")
        if tokens is not None and path.stat().st_size != tokens * itemsize:
            raise UserError(f"{path} holds {path.stat().st_size:,} bytes but meta.json says {tokens:,} tokens "
                            f"({tokens * itemsize:,} bytes): the file is truncated or replaced; {_again(folder)}")
    for name, want in (meta.get("files") or {}).items():
        if (folder / name).exists():
            _check_hash(folder / name, want, folder)


def _check_hash(path: Path, want: str, folder: Any) -> None:
    """One line when `path` is not the file meta.json lists (hashed once per file version: _verified)."""
    if not _verified(path, want):
        raise UserError(f"{path} does not match the sha256 in its meta.json (changed since it was prepared); "
                        f"{_again(folder)}")


# --- a dataset: its splits as shards ------------------------------------------------------------------------

@dataclass
class Dataset:
    """A prepared dataset: meta.json's contents (or what stands for them) and each split's shards."""

    folder: str  # where it lives, for messages (local path or gs:// URL)
    local: Path  # a local folder holding (or caching) its files
    meta: dict[str, Any]
    splits: dict[str, list[Shard]]

    def stream(self, split: str) -> TokenStream:
        return TokenStream(self.splits[split])

    def split_bytes(self, split: str) -> int | None:
        """UTF-8 bytes of a split's text where prepare.py counted them (bits per byte without decoding)."""
        value = self.meta.get(f"{split}_bytes")
        return value if isinstance(value, int) else None


def _fetcher(remote: Any, local: Path, want: str | None, tokens: int, dtype: str, offset: int) -> Any:
    """A shard's fetch: the cached copy when its verdict holds, else a chunked download, checked."""
    def fetch() -> str:
        size = offset + tokens * np.dtype(dtype).itemsize
        if local.exists() and local.stat().st_size == size and (want is None or _verified(local, want)):
            return str(local)
        paths.download(remote, local)
        if local.stat().st_size != size or (want is not None and not _verified(local, want)):
            local.unlink(missing_ok=True)
            raise UserError(f"{remote} does not match its meta.json (size or sha256); prepare the data again")
        return str(local)
    return fetch


def open_dataset(data_dir: str, dataset: str, vocab_size: int | None = None) -> Dataset:
    """The dataset `dataset` under `data_dir` (local or gs://), in whichever of the three layouts it is."""
    root = paths.path(data_dir) / dataset
    remote = paths.is_remote(data_dir)
    if remote:
        paths.check_gcs(root)
    local = paths.cache_home() / "data" / hashlib.sha256(str(root).encode()).hexdigest()[:16] / dataset if remote else Path(root)
    if (root / "meta.json").exists():
        meta = read_meta(root)
        if meta.get("format") == "shards":
            listed = {s: [(e["name"], int(e["tokens"]), e.get("sha256"), shards.HEADER_BYTES) for e in meta["shards"][s]]
                      for s in SPLITS}
        else:  # nanoGPT's train.bin / val.bin
            itemsize = np.dtype(meta["dtype"]).itemsize
            if not remote:
                _require_files(root, data_dir, dataset)
                check_dataset(root, meta)
            tokens = {s: int(meta.get(f"{s}_tokens") or 0) if remote else os.path.getsize(Path(root) / f"{s}.bin") // itemsize
                      for s in SPLITS}
            listed = {s: [(f"{s}.bin", tokens[s], (meta.get("files") or {}).get(f"{s}.bin"), 0)] for s in SPLITS}
        dtype = meta["dtype"]
    else:
        meta, listed, dtype = _llmc(root, data_dir, dataset, vocab_size)
    if remote:
        local.mkdir(parents=True, exist_ok=True)
        if (root / TOKENIZER_FILE).exists():
            paths.write_bytes(local / TOKENIZER_FILE, (root / TOKENIZER_FILE).read_bytes())
        splits = {s: [Shard(str(local / n), t, dtype, off, _fetcher(root / n, local / n, sha, t, dtype, off))
                      for n, t, sha, off in entries] for s, entries in listed.items()}
    else:
        splits = {s: [Shard(str(Path(root) / n), t, dtype, off) for n, t, _, off in entries] for s, entries in listed.items()}
        if meta.get("format") == "shards":
            _check_local_shards(Path(root), meta, splits)
    for s in SPLITS:
        if not splits[s]:
            raise UserError(f"dataset {dataset!r} in {data_dir} has no {s} shards; {_again(root)}")
    return Dataset(str(root), local, meta, splits)


def _check_local_shards(folder: Path, meta: dict, splits: dict[str, list[Shard]]) -> None:
    for shard in (s for split in SPLITS for s in splits[split]):
        path = Path(shard.path)
        want = shard.offset + shard.tokens * np.dtype(shard.dtype).itemsize
        if not path.exists() or path.stat().st_size != want:
            have = f"{path.stat().st_size:,} bytes" if path.exists() else "missing"
            raise UserError(f"{path} is {have}, not the {want:,} bytes meta.json lists: truncated or removed; {_again(folder)}")
        sha = (meta.get("files") or {}).get(path.name)
        if sha:
            _check_hash(path, sha, folder)


def _llmc(root: Any, data_dir: str, dataset: str, vocab_size: int | None) -> tuple[dict, dict, str]:
    """An llm.c / modded-nanogpt folder: *train*.bin and *val*.bin shards with llm.c's header, no meta.json."""
    names = sorted(p.name for p in root.glob("*.bin")) if root.exists() else []
    listed: dict[str, list] = {"train": [], "val": []}
    dtypes: set[str] = set()
    if "train.bin" in names or not names:  # nanoGPT's layout without its meta.json, or nothing at all
        _require_files(root, data_dir, dataset)
    for name in names:
        split = "val" if "val" in name else "train" if "train" in name else None
        if split is None:
            continue
        count, kind = shards.parse_header(paths.read_range(root / name, 0, shards.HEADER_BYTES),
                                          paths.size(root / name), root / name)
        dtypes.add(kind.name)
        listed[split].append((name, count, None, shards.HEADER_BYTES))
    if not any(listed.values()):
        _require_files(root, data_dir, dataset)
    if len(dtypes) > 1:
        raise UserError(f"{root} mixes shard versions ({', '.join(sorted(dtypes))}); keep one tokenizer's shards per folder")
    if vocab_size is None:
        raise UserError(f"{root} holds llm.c shards without a meta.json: give the vocabulary with --vocab_size "
                        f"(50257 for GPT-2's tokenizer, or 50304 padded)")
    dtype = str(dtypes.pop())
    meta = {"format": "llm.c", "tokenizer": "unknown", "tokenizer_identity": {"kind": "unknown", "vocab_size": vocab_size},
            "vocab_size": vocab_size, "dtype": dtype, **{f"{s}_tokens": sum(e[1] for e in listed[s]) for s in SPLITS}}
    return meta, listed, dtype


def _require_files(root: Any, data_dir: str, dataset: str) -> None:
    missing = [f for f in ("train.bin", "val.bin", "meta.json") if not (root / f).exists()]
    if missing:
        kind = dataset if dataset in ("shakespeare", "tinystories") else f"text --input FILES --name {dataset}"
        raise UserError(f"dataset {dataset!r} is not prepared ({root}/{missing[0]} missing); "
                        f"run: python scripts/prepare.py {kind} --data_dir {data_dir}")


def dataset_dir(data_dir: str | Path, dataset: str) -> Path:
    """A nanoGPT-layout dataset's local folder (a gs:// one copied into the user's cache and checked);
    a clear error with the prepare command when it is missing."""
    ds = open_dataset(str(data_dir), dataset)
    for split in SPLITS:
        for shard in ds.splits[split]:
            if shard.fetch:
                shard.fetch()
    return ds.local


# --- batches ------------------------------------------------------------------------------------------------

class BatchSampler:
    """nanoGPT's get_batch over a split, reproducible from (seed, split, step).

    `get(step)` returns x, y of shape (accum, len(rows), block_size) int32: the `rows` of the global
    (accum, batch_size) batch that this process feeds to its devices (default: all). `source` is a
    TokenStream or a headerless token file; `limit` > 0 reads only the split's first `limit` tokens."""

    def __init__(self, source: TokenStream | str | Path, block_size: int, batch_size: int, *, seed: int, accum: int = 1,
                 rows: slice | None = None, dtype: str = "uint8", split: str | None = None,
                 order: Literal["random", "epoch"] = "random", limit: int = 0):
        if not isinstance(source, TokenStream):
            path = Path(source)
            split = split or path.stem
            source = TokenStream([Shard(str(path), path.stat().st_size // np.dtype(dtype).itemsize, dtype, 0)])
        self.stream, self.path = source, source.shards[0].path
        self.block_size, self.batch_size, self.accum, self.seed, self.order = block_size, batch_size, accum, seed, order
        self.n_tokens = min(limit, source.n_tokens) if limit else source.n_tokens
        if self.n_tokens < block_size + 1:
            raise UserError(f"{self.path} holds {self.n_tokens} tokens, fewer than one block of "
                            f"{block_size + 1}; use more data or a smaller --block_size")
        self.rows = rows or slice(0, batch_size)
        self._split_id = SPLITS.index(split) if split in SPLITS else 2
        self.epochs = shards.EpochOrder(source, block_size, seed) if order == "epoch" else None

    def offsets(self, step: int, stream: int = 0) -> np.ndarray:
        """(accum, batch) window starts of the *global* batch of `step` (stream 1 = evaluation)."""
        if self.epochs is not None and stream == 0:
            per_step = self.accum * self.batch_size
            return self.epochs.starts(step * per_step + np.arange(per_step).reshape(self.accum, self.batch_size))
        rng = np.random.default_rng([self.seed, self._split_id, stream, step])
        return rng.integers(0, self.n_tokens - self.block_size, size=(self.accum, self.batch_size))

    def get(self, step: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        ix = self.offsets(step, stream)[:, self.rows]
        win = np.stack([self.stream.read(int(i), self.block_size + 1) for i in ix.reshape(-1)]).astype(np.int32)
        win = win.reshape(*ix.shape, self.block_size + 1)
        if self.epochs is not None and stream == 0:  # the next step's shard, in the background
            self.stream.prefetch(self.epochs.shard_of((step + 1) * self.accum * self.batch_size))
        return win[..., :-1], win[..., 1:]

    def state(self, step: int) -> dict:
        """What a checkpoint needs to continue the batch stream exactly."""
        return {"seed": self.seed, "step": step, "batch_size": self.batch_size, "accum": self.accum, "order": self.order}


# --- evaluation windows (jaxgpt/evaluate.py): every token of a split scored once, no sampling ---

def num_windows(n_tokens: int, block_size: int) -> int:
    return max(0, math.ceil((n_tokens - 1) / block_size))


def eval_windows(tokens: np.ndarray, block_size: int, first: int = 0, count: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Windows first .. first+count-1 as (x, y, mask), each (count, block_size); padding is masked out."""
    total = num_windows(len(tokens), block_size)
    count = total - first if count is None else count
    x = np.zeros((count, block_size), np.int32)
    y = np.zeros((count, block_size), np.int32)
    mask = np.zeros((count, block_size), bool)
    for row, w in enumerate(range(first, min(first + count, total))):
        seg = np.asarray(tokens[w * block_size:(w + 1) * block_size + 1], np.int64)
        n = len(seg) - 1
        x[row, :n], y[row, :n], mask[row, :n] = seg[:-1], seg[1:], True
    return x, y, mask


def eval_batches(tokens: np.ndarray, block_size: int, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every window in batches of exactly batch_size (the last padded and masked: one compiled shape)."""
    for first in range(0, num_windows(len(tokens), block_size), batch_size):
        yield eval_windows(tokens, block_size, first, batch_size)
