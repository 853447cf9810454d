"""Small datasets the nanoGPT way: one text -> train.bin and val.bin (Tiny Shakespeare, TinyStories, a text).

Byte-level tokens are exactly uint8, so a dataset is two flat files, train.bin and val.bin, plus meta.json
(a tokenizer.json's ids are uint16 or uint32, and a copy of it sits beside). A corpus of any size goes
through jaxgpt.prepare instead (shards, every core, resumable); reading either is jaxgpt.loader's.
"""
from __future__ import annotations

import bz2
import hashlib
import json
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
from jaxgpt.loader import SPLITS, read_meta
from jaxgpt.tokenizer import BYTES_IDENTITY, EOT_BYTE, EOT_TEXT, TOKENIZER_FILE, HFTokenizer

SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"  # input.txt, 1,115,394 bytes


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


