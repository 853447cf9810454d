"""Data: text -> token memmaps (prepare), and reproducible random windows (batches).

Byte-level tokens are exactly uint8, so a dataset is two flat files, train.bin and val.bin,
plus meta.json (a tokenizer.json's ids are uint16 or uint32, and a copy of it sits beside). Batches are nanoGPT's get_batch — random windows of block_size+1 tokens —
but the offsets of step s come from a generator seeded with (seed, split, s): no hidden
sampler state, so a resumed run draws exactly the batches an uninterrupted run would, and
every process of a multi-host run can cut its own rows out of the same global batch.
"""
from __future__ import annotations

import bz2
import hashlib
import json
import math
import os
import tempfile
import urllib.request
from collections.abc import Iterable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any, cast

import numpy as np
from tqdm import tqdm

from jaxgpt import paths
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import BYTES_IDENTITY, TOKENIZER_FILE, HFTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # input.txt, 1,115,394 bytes
# TinyStories: stories are separated by this byte. 0xFF never occurs in UTF-8 text, so it is an
# unambiguous one-token boundary the model can learn, and the vocabulary stays 256.
EOT_BYTE = 0xFF
EOT_TEXT = "<|endoftext|>"
SPLITS = ("train", "val")


def _atomic_write(path: Path, data: bytes | Iterable[bytes]) -> None:
    """Write to a temp file in the same folder and rename: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in ([data] if isinstance(data, bytes) else data):
                f.write(chunk)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bundled_shakespeare() -> bytes:
    """Tiny Shakespeare as shipped in the package (jaxgpt/corpus), checked against its hash."""
    try:
        raw = bz2.decompress(resources.files("jaxgpt").joinpath("corpus/tinyshakespeare.txt.bz2").read_bytes())
    except (OSError, ValueError) as e:
        raise UserError(f"the bundled Tiny Shakespeare cannot be read ({e}); reinstall jaxgpt, or use --download "
                        f"or --input PATH") from None
    if hashlib.sha256(raw).hexdigest() != SHAKESPEARE_SHA256:
        raise UserError("the bundled Tiny Shakespeare does not match its sha256; reinstall jaxgpt, or use --download "
                        "or --input PATH")
    return raw


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as r:
            return r.read()
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); drop --download to use the bundled copy, "
                        f"or pass a local file with --input PATH") from None


def _read_file(input_path: str) -> bytes:
    path = Path(input_path)
    if not path.is_file():
        raise UserError(f"input file {input_path} does not exist; pass an existing text file with --input")
    return path.read_bytes()


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type holding every id: uint8 for bytes, uint16 or uint32 otherwise."""
    return np.dtype(np.uint8 if vocab_size <= 256 else np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def read_meta(folder: str | Path) -> dict:
    """A prepared dataset's meta.json, with the defaults of byte-level data written before
    tokenizers were recorded."""
    path = Path(folder) / "meta.json"
    again = f"prepare the data again (python scripts/prepare.py ... --data_dir {Path(folder).parent})"
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({paths.describe(e, 80)}); {again}") from None
    if not isinstance(meta, dict):
        raise UserError(f"{path} is not a JSON object; {again}")
    meta.setdefault("tokenizer_identity", dict(BYTES_IDENTITY))
    meta.setdefault("dtype", "uint8")
    counts = {k: meta.get(k) for k in ("vocab_size", "train_tokens", "val_tokens") if k in meta}
    bad = [k for k, v in counts.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0]
    if meta.get("dtype") not in ("uint8", "uint16", "uint32"):
        bad.append("dtype")
    if not isinstance(meta["tokenizer_identity"], dict) or not isinstance(meta.get("files", {}), dict):
        bad.append("tokenizer_identity/files")
    if bad or "vocab_size" not in meta:
        raise UserError(f"{path} is damaged ({', '.join(bad) or 'vocab_size missing'} not what prepare.py writes); {again}")
    return meta


def prepare_text(raw: bytes, out_dir: str | Path, source: str, *, tokenizer: HFTokenizer | None = None,
                 val_fraction: float = 0.1) -> dict:
    """One UTF-8 text -> out_dir/{train,val}.bin (first 90% / last 10%, like nanoGPT) + meta.json.
    Bytes by default; with a tokenizer, its ids (uint16 or uint32) and a copy of its
    tokenizer.json, the text split by characters before encoding as nanoGPT's GPT-2 prepare does.

    Idempotent: when meta.json already records the same source and tokenizer, nothing is rewritten."""
    out_dir = Path(out_dir)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{source} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 first") from None
    if not raw:
        raise UserError(f"{source} is empty; give a text file with some content")
    identity = tokenizer.identity() if tokenizer else dict(BYTES_IDENTITY)
    sha = hashlib.sha256(raw).hexdigest()
    meta_path = out_dir / "meta.json"
    if meta_path.exists() and all((out_dir / f"{s}.bin").exists() for s in SPLITS):
        meta = read_meta(out_dir)
        if meta.get("sha256") == sha and meta["tokenizer_identity"] == identity:
            return {**meta, "unchanged": True}
    if tokenizer is None:
        n_train = int(len(raw) * (1 - val_fraction))
        parts, dtype = {"train": raw[:n_train], "val": raw[n_train:]}, np.dtype(np.uint8)
    else:
        cut = int(len(text) * (1 - val_fraction))
        dtype = token_dtype(tokenizer.vocab_size)
        parts = {"train": tokenizer.encode(text[:cut]).astype(dtype).tobytes(),
                 "val": tokenizer.encode(text[cut:]).astype(dtype).tobytes()}
        _atomic_write(out_dir / TOKENIZER_FILE, tokenizer.raw)
    for split, data in parts.items():
        _atomic_write(out_dir / f"{split}.bin", data)
    meta = {"tokenizer": tokenizer.name if tokenizer else "bytes", "tokenizer_identity": identity,
            "vocab_size": identity["vocab_size"], "dtype": dtype.name,
            **{f"{s}_tokens": len(d) // dtype.itemsize for s, d in parts.items()}, "source": source, "sha256": sha,
            "files": {f"{s}.bin": hashlib.sha256(d).hexdigest() for s, d in parts.items()}}
    _atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    return meta


def prepare_shakespeare(data_dir: str | Path, input_path: str | None = None, download: bool = False,
                        tokenizer: HFTokenizer | None = None) -> dict:
    """Tiny Shakespeare from the copy bundled with jaxgpt (no network), a local file, or its
    canonical address (download=True); bytes, or the ids of `tokenizer`."""
    if input_path is not None:
        raw, source = _read_file(input_path), input_path
    elif download:
        raw, source = _download(SHAKESPEARE_URL), SHAKESPEARE_URL
    else:
        raw, source = bundled_shakespeare(), "bundled:jaxgpt/corpus/tinyshakespeare.txt.bz2"
    return prepare_text(raw, Path(data_dir) / "shakespeare", source, tokenizer=tokenizer)


def _stories_from_txt(path: Path, chunk_bytes: int = 1 << 22) -> Iterator[str]:
    """Stream stories separated by <|endoftext|> without reading the file at once."""
    rest = ""
    with open(path, encoding="utf-8", errors="strict") as f:
        while chunk := f.read(chunk_bytes):
            parts = (rest + chunk).split(EOT_TEXT)
            rest = parts.pop()
            yield from parts
    yield rest


def _stories_from_json(path: Path) -> Iterator[str]:
    """.jsonl (one object per line) or .json (a list of objects) with a 'story' or 'text' field."""
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            records: Iterable = (json.loads(line) for line in f if line.strip())
        else:
            records = json.load(f)  # TinyStories_all_data shards are ~50 MB lists
        for rec in records:
            text = rec.get("story", rec.get("text")) if isinstance(rec, dict) else rec
            if not isinstance(text, str):
                raise UserError(f"{path}: records need a 'story' or 'text' string field")
            yield text


def _stories_from_hf(split: str) -> Iterator[str]:
    try:
        import datasets  # optional: only for the online path
    except ImportError:
        raise UserError("no --input given and the `datasets` package is not installed; "
                        "pip install datasets, or pass TinyStories .txt/.json files with --input") from None
    for rec in datasets.load_dataset("roneneldan/TinyStories", split=split, streaming=True):
        yield rec["text"]


def _write_stories(stories: Iterable[str], path: Path, desc: str, tokenizer: HFTokenizer | None) -> tuple[int, int]:
    """Encode stories (each followed by the end-of-text token) into path, streaming; returns
    (stories, tokens). Bytes end with EOT_BYTE; a tokenizer's stories with its <|endoftext|>."""
    counts = [0, 0]
    if tokenizer is not None:
        found = tokenizer.tok.token_to_id(EOT_TEXT)
        if found is None:
            raise UserError(f"the tokenizer has no {EOT_TEXT} token to separate stories; use one that has")
        eot: int = found
        dtype = token_dtype(tokenizer.vocab_size)

    def chunks() -> Iterator[bytes]:
        for story in tqdm(stories, desc=desc, unit=" stories", mininterval=1.0):
            story = story.strip()
            if story:
                if tokenizer is None:
                    data = story.encode("utf-8") + bytes([EOT_BYTE])
                else:
                    data = np.append(tokenizer.encode(story), eot).astype(dtype).tobytes()
                counts[0] += 1
                counts[1] += len(data) // (1 if tokenizer is None else dtype.itemsize)
                yield data

    _atomic_write(path, chunks())
    return counts[0], counts[1]


def prepare_tinystories(data_dir: str | Path, inputs: list[str] | None = None,
                        tokenizer: HFTokenizer | None = None) -> dict:
    """TinyStories from local .txt/.json/.jsonl files (files named *valid* become the val split;
    without one, every 20th story is held out), or from Hugging Face when no files are given."""
    out_dir = Path(data_dir) / "tinystories"
    if inputs:
        files = [Path(p) for p in inputs]
        for p in files:
            if not p.is_file():
                raise UserError(f"input file {p} does not exist; pass TinyStories .txt/.json/.jsonl files")
            if p.suffix not in (".txt", ".json", ".jsonl"):
                raise UserError(f"{p}: expected a .txt, .json or .jsonl file")
        read = lambda p: _stories_from_txt(p) if p.suffix == ".txt" else _stories_from_json(p)  # noqa: E731
        val_paths = [p for p in files if "valid" in p.name.lower()]
        train_paths = [p for p in files if p not in val_paths]

        def split_stories(which: str) -> Iterator[str]:
            if val_paths:
                for p in (val_paths if which == "val" else train_paths):
                    yield from read(p)
            else:
                for i, s in enumerate(s for p in train_paths for s in read(p)):
                    if (i % 20 == 19) == (which == "val"):
                        yield s
        sources = {s: split_stories(s) for s in SPLITS}
    else:
        sources = {"train": _stories_from_hf("train"), "val": _stories_from_hf("validation")}
    identity = tokenizer.identity() if tokenizer else dict(BYTES_IDENTITY)
    vocab = int(cast(int, identity["vocab_size"]))
    meta: dict[str, Any] = {"tokenizer": tokenizer.name if tokenizer else "bytes", "tokenizer_identity": identity,
            "vocab_size": vocab, "dtype": token_dtype(vocab).name,
            "source": [str(p) for p in inputs] if inputs else "roneneldan/TinyStories"}
    if tokenizer is None:
        meta["eot_byte"] = EOT_BYTE
    else:
        _atomic_write(out_dir / TOKENIZER_FILE, tokenizer.raw)
    for split in SPLITS:
        n_stories, n_tokens = _write_stories(sources[split], out_dir / f"{split}.bin", f"tinystories {split}", tokenizer)
        if n_tokens == 0:
            raise UserError(f"no {split} stories found in the TinyStories input; check the files")
        meta[f"{split}_stories"], meta[f"{split}_tokens"] = n_stories, n_tokens
    meta["files"] = {f"{split}.bin": paths.sha256(out_dir / f"{split}.bin") for split in SPLITS}
    _atomic_write(out_dir / "meta.json", json.dumps(meta, indent=2).encode())
    return meta


def prepare_if_missing(data_dir: str | Path, dataset: str) -> dict | None:
    """Tiny Shakespeare needs no separate prepare step: when `shakespeare` is not prepared yet,
    prepare it from the bundled copy and return its meta (None when nothing was done)."""
    if dataset != "shakespeare" or (Path(data_dir) / dataset / "meta.json").is_file():
        return None
    return prepare_shakespeare(data_dir)


def dataset_dir(data_dir: str | Path, dataset: str) -> Path:
    """The prepared dataset's local folder; a clear error with the prepare command when it is
    missing. A gs:// data_dir is copied once into the user's cache and checked by hash."""
    if paths.is_remote(data_dir):
        remote = paths.path(data_dir) / dataset
        paths.check_gcs(remote)
        if not (remote / "meta.json").exists():
            raise UserError(f"dataset {dataset!r} is not prepared in {data_dir} ({remote}/meta.json missing); run: "
                            f"python scripts/prepare.py ... --data_dir {data_dir}")
        expected = json.loads((remote / "meta.json").read_text()).get("files")
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt" / "data" / \
            hashlib.sha256(str(remote).encode()).hexdigest()[:16] / dataset
        paths.local_copy(remote, cache, ["meta.json", "train.bin", "val.bin", TOKENIZER_FILE], expected)
        data_dir = cache.parent
    path = Path(data_dir) / dataset
    missing = [f for f in ("train.bin", "val.bin", "meta.json") if not (path / f).is_file()]
    if missing:
        kind = dataset if dataset in ("shakespeare", "tinystories") else f"text --input FILE --name {dataset}"
        raise UserError(f"dataset {dataset!r} is not prepared ({path}/{missing[0]} missing); "
                        f"run: python scripts/prepare.py {kind} --data_dir {data_dir}")
    return path


VERIFIED_FILE = ".verified.json"  # the folder's hash verdicts, keyed by file size and mtime


def _verdict_cache(folder: Path) -> Path:
    """Where a folder's verdicts are kept: in it, or (read-only data) in the user's cache."""
    if os.access(folder, os.W_OK):
        return folder / VERIFIED_FILE
    home = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxgpt" / "verified"
    return home / (hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:16] + ".json")


def check_dataset(folder: str | Path, meta: dict) -> None:
    """Refuse data that is not what prepare.py wrote, with one line naming the file and the remedy.
    Every time: each split's size against meta.json's token count (cheap). Once per file version:
    its sha256 against meta.json's, the verdict cached by (size, mtime), so a large dataset is hashed
    once, not at every start."""
    folder = Path(folder)
    itemsize = np.dtype(meta.get("dtype", "uint8")).itemsize
    again = f"prepare the data again (python scripts/prepare.py ... --data_dir {folder.parent})"
    for split in SPLITS:
        path, tokens = folder / f"{split}.bin", meta.get(f"{split}_tokens")
        if tokens is not None and path.stat().st_size != tokens * itemsize:
            raise UserError(f"{path} holds {path.stat().st_size:,} bytes but meta.json says {tokens:,} tokens "
                            f"({tokens * itemsize:,} bytes): the file is truncated or replaced; {again}")
    expected = meta.get("files") or {}
    cache = _verdict_cache(folder)
    try:
        verdicts = json.loads(cache.read_text()) if cache.exists() else {}
    except (OSError, ValueError):
        verdicts = {}
    changed = False
    for name, want in expected.items():
        path = folder / name
        if not path.exists():
            continue
        stat = path.stat()
        key = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": want}
        if verdicts.get(name) == key:
            continue
        if paths.sha256(path) != want:
            raise UserError(f"{path} does not match the sha256 in its meta.json (changed since it was prepared); {again}")
        verdicts[name], changed = key, True
    if changed:
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            _atomic_write(cache, json.dumps(verdicts, indent=2).encode())
        except OSError:  # a cache that cannot be written only costs hashing again next time
            pass


class BatchSampler:
    """nanoGPT's get_batch over a uint8 memmap, reproducible from (seed, split, step).

    `get(step)` returns x, y of shape (accum, len(rows), block_size) int32: the `rows` of the
    global (accum, batch_size) batch that this process feeds to its devices (default: all)."""

    def __init__(self, path: str | Path, block_size: int, batch_size: int, *, seed: int, accum: int = 1,
                 rows: slice | None = None, dtype: str = "uint8"):
        self.path = Path(path)
        self.block_size, self.batch_size, self.accum, self.seed = block_size, batch_size, accum, seed
        self.dtype = np.dtype(dtype)
        self.n_tokens = self.path.stat().st_size // self.dtype.itemsize
        if self.n_tokens < block_size + 1:
            raise UserError(f"{self.path} holds {self.n_tokens} tokens, fewer than one block of "
                            f"{block_size + 1}; use more data or a smaller --block_size")
        self.rows = rows or slice(0, batch_size)
        self._split_id = SPLITS.index(self.path.stem) if self.path.stem in SPLITS else 2

    def offsets(self, step: int, stream: int = 0) -> np.ndarray:
        """(accum, batch) window starts of the *global* batch of `step` (stream 1 = evaluation)."""
        rng = np.random.default_rng([self.seed, self._split_id, stream, step])
        return rng.integers(0, self.n_tokens - self.block_size, size=(self.accum, self.batch_size))

    def get(self, step: int, stream: int = 0) -> tuple[np.ndarray, np.ndarray]:
        ix = self.offsets(step, stream)[:, self.rows]
        # re-open per batch: a long-lived memmap keeps growing resident memory (nanoGPT's fix)
        data = np.memmap(self.path, dtype=self.dtype, mode="r")
        win = np.stack([data[i:i + self.block_size + 1] for i in ix.reshape(-1)]).astype(np.int32)
        win = win.reshape(*ix.shape, self.block_size + 1)
        return win[..., :-1], win[..., 1:]

    def state(self, step: int) -> dict:
        """What a checkpoint needs to continue the batch stream exactly."""
        return {"seed": self.seed, "step": step, "batch_size": self.batch_size, "accum": self.accum}


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
