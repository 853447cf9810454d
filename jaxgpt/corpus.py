"""A corpus as a stream of documents cut into pieces, and the workers that tokenize them: the reading
and encoding halves of `prepare.py text` (jaxgpt.prepare runs them and writes the shards).

Inputs are files and globs, local or gs://, of .txt (one document), .jsonl / .jsonl.gz / .jsonl.zst (a
document per line, its text in --text_field) and .parquet (a document per row). Documents keep their
input order. A long document is cut into pieces of about PIECE_CHARS characters at a place where the
tokenizer cannot join the two sides (a non-space character followed by a space: byte-level BPE's
pre-tokenizer splits there, so the pieces' ids are the whole document's; `cuts_are_exact` proves it for a
given tokenizer), so no worker ever holds more than a piece of any document. Every piece carries its
place (file, document, piece), from which a killed prepare starts again.
"""
from __future__ import annotations

import codecs
import contextlib
import gzip
import io
import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from jaxgpt import paths
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import tiktoken_twin

PIECE_CHARS = 1 << 20  # a piece's target length: a worker's memory is a few hundred bytes per character
SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet")
PROBE = ("Hello  world,\n\n\nit's 2024 -- naïve café 東京 \t tabs\r\n  lead 12,345.67!!  ?? \n"
         "end.   spaces\u00a0nbsp x\n \n y    \n\nz'll  we've\n I'M DON'T 'quoted' \U0001F600 emoji\n")
_CUT = re.compile(r"\S(?=\s)")  # a cut goes after the match: between a non-space and a space


@dataclass(frozen=True)
class Input:
    """One input file and what identifies its version (a changed file must not be mixed into a resumed prepare)."""

    url: str
    size: int
    version: str  # mtime locally, the object's generation or checksum on Cloud Storage

    @property
    def kind(self) -> str:
        return next(s for s in SUFFIXES if self.url.endswith(s))


@dataclass(frozen=True)
class Piece:
    """A piece of a document: its place in the corpus, its text, whether it ends the document, and how many
    bytes of its input file had been read when it was cut (the progress bar's measure: compressed bytes too)."""

    file: int
    doc: int
    piece: int
    text: str
    last: bool
    read: int = 0


def _stat(url: str) -> Input:
    try:
        size, version = paths.version(url)
    except FileNotFoundError:
        raise UserError(f"input file {url} does not exist; pass existing files or globs with --input") from None
    return Input(url, size, version)


def expand_inputs(patterns: list[str]) -> list[Input]:
    """Files and globs (sorted matches) in the order given, each file once; refuses unknown formats,
    missing files and globs that match nothing. Local paths, gs:// and other fsspec URLs (hf://)."""
    urls: list[str] = []
    for pattern in patterns:
        if any(c in pattern for c in "*?["):
            matches = paths.glob_urls(pattern)
            if not matches:
                raise UserError(f"--input {pattern} matches no file; check the pattern (quote it so the shell leaves it)")
            urls.extend(matches)
        else:
            urls.append(pattern)
    seen: set[str] = set()
    out = []
    for url in urls:
        if url in seen:
            continue
        seen.add(url)
        if not url.endswith(SUFFIXES):
            raise UserError(f"{url}: not a format prepare.py reads; give {', '.join(SUFFIXES)} files")
        out.append(_stat(url))
    if not out:
        raise UserError("no input files; pass --input FILE [FILE ...] (files or globs)")
    return out


def task_slice(inputs: list[Input], task: int, tasks: int) -> range:
    """The contiguous run of input files task `task` of `tasks` prepares: files go to tasks by where their
    first byte falls in the corpus, so slices are near equal in bytes whatever the file count, and the first
    file (where the val split begins) is task 0's."""
    total = sum(max(f.size, 1) for f in inputs)
    owner, at = [], 0
    for f in inputs:
        owner.append(at * tasks // total)
        at += max(f.size, 1)
    mine = [i for i, t in enumerate(owner) if t == task]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def cut_points(text: str, start: int, piece_chars: int) -> int:
    """Where the piece beginning at `start` ends: the last cut in its second half, else the first one after.
    Searched backwards from the end in growing windows (a cut is near the end in any text with spaces)."""
    end = start + piece_chars
    if end >= len(text):
        return len(text)
    lo, hi, span = start + piece_chars // 2, end, 256
    while hi > lo:
        a = max(lo, hi - span)
        last = None
        for m in _CUT.finditer(text, a, hi):
            last = m.end()
        if last is not None:
            return last
        hi, span = a + 1 if a > lo else lo, span * 4  # +1: the match just below `a` looks ahead at `a`
    after = _CUT.search(text, end)
    return after.end() if after else len(text)


def split_document(text: str, piece_chars: int = PIECE_CHARS) -> Iterator[str]:
    """A document's pieces (one piece when it is short)."""
    start = 0
    while start < len(text):
        end = cut_points(text, start, piece_chars)
        yield text[start:end]
        start = end


def cuts_are_exact(encode: Callable[[str], list[int]]) -> bool:
    """True when encoding a text in pieces cut as `split_document` cuts gives the ids of encoding it whole,
    on a probe of mixed spaces, newlines, digits, punctuation and non-ASCII text cut at every place."""
    probe = PROBE
    whole = encode(probe)
    cuts = [m.end() for m in _CUT.finditer(probe)]
    return all(encode(probe[:c]) + encode(probe[c:]) == whole for c in cuts)


@contextlib.contextmanager
def _open(url: str) -> Iterator[tuple[BinaryIO, Any]]:
    """(a binary stream of the file's decompressed bytes, the file as stored: its tell() is the bytes read);
    gs:// objects are read in ranged chunks. Both are closed on leaving."""
    with paths.open_read(url) as raw:
        if url.endswith(".gz"):
            with gzip.GzipFile(fileobj=raw) as f:
                yield f, raw  # type: ignore[misc]
        elif url.endswith(".zst"):
            try:
                import zstandard
            except ImportError:
                raise UserError(f"{url}: .zst files need the zstandard package; pip install zstandard") from None
            with io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False)) as f:
                yield f, raw
        else:
            yield raw, raw


def _txt_pieces(url: str, index: int, first_piece: int, piece_chars: int) -> Iterator[Piece]:
    """A .txt file as one document, read a megabyte at a time and cut as split_document cuts."""
    decoder, text, start, n, done, at = codecs.getincrementaldecoder("utf-8")(), "", 0, 0, False, 0
    with _open(url) as (f, raw):
        while True:
            while not done and len(text) - start < 2 * piece_chars:
                chunk = f.read(1 << 20)
                try:
                    text = text[start:] + decoder.decode(chunk, final=not chunk)
                except UnicodeDecodeError as e:
                    raise UserError(f"{url} is not UTF-8 text (near byte {at + e.start:,}: {e.reason}); convert it to "
                                    f"UTF-8 first") from None
                at, start, done = at + len(chunk), 0, not chunk
            if start >= len(text):
                if n == 0:
                    raise UserError(f"{url} is empty; give files with some text")
                return
            end = cut_points(text, start, piece_chars)
            if n >= first_piece:
                yield Piece(index, 0, n, text[start:end], done and end >= len(text), raw.tell())
            start, n = end, n + 1


def _records(url: str, text_field: str, first_doc: int) -> Iterator[tuple[int, Any, int]]:
    """(document index, text, bytes of the file read) of a .jsonl(.gz/.zst) or .parquet file from document
    first_doc on."""
    if url.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise UserError(f"{url}: .parquet files need the pyarrow package; pip install pyarrow") from None
        with paths.open_read(url) as f:
            pf = pq.ParquetFile(f)
            if text_field not in pf.schema_arrow.names:
                raise UserError(f"{url} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)}); "
                                f"name the text column with --text_field")
            row = 0
            for g in range(pf.num_row_groups):
                rows = pf.metadata.row_group(g).num_rows
                if row + rows <= first_doc:
                    row += rows
                    continue
                for batch in pf.iter_batches(batch_size=1024, row_groups=[g], columns=[text_field]):
                    for text in batch.column(0).to_pylist():
                        if row >= first_doc:
                            yield row, text, f.tell()
                        row += 1
        return
    with _open(url) as (f, raw):
        for line_no, line in enumerate(f):
            if line_no < first_doc or not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise UserError(f"{url}: line {line_no + 1} is not JSON ({e}); fix or drop that line") from None
            if not isinstance(record, dict) or text_field not in record:
                raise UserError(f"{url}: line {line_no + 1} has no {text_field!r} field; name the text field with "
                                f"--text_field")
            yield line_no, record[text_field], raw.tell()


def pieces(inputs: list[Input], files: range, text_field: str, start: tuple[int, int, int] = (0, 0, 0),
           piece_chars: int = PIECE_CHARS, cut: bool = True) -> Iterator[Piece]:
    """Every piece of files[...] in order, from (file, doc, piece) = start on. `cut=False` keeps each
    document whole (a tokenizer whose cuts are not exact)."""
    f0, d0, p0 = start
    chars = piece_chars if cut else 1 << 62
    for i in files:
        if i < f0:
            continue
        url = inputs[i].url
        try:
            yield from _file_pieces(url, i, text_field, (d0, p0) if i == f0 else (0, 0), chars)
        except UserError:
            raise
        except Exception as e:  # a damaged archive or parquet file: one line naming it
            raise UserError(f"cannot read {url} ({paths.describe(e)}); check the file, or leave it out of --input") from None


def _file_pieces(url: str, i: int, text_field: str, start: tuple[int, int], chars: int) -> Iterator[Piece]:
    d0, p0 = start
    if url.endswith(".txt"):
        yield from _txt_pieces(url, i, p0, chars)
        return
    for doc, text, read in _records(url, text_field, d0):
        if not isinstance(text, str):
            raise UserError(f"{url}: document {doc} has a {type(text).__name__} in {text_field!r}, not text")
        if not text:
            continue
        parts = list(split_document(text, chars)) if len(text) > chars else [text]
        for n, part in enumerate(parts):
            if doc != d0 or n >= p0:
                yield Piece(i, doc, n, part, n == len(parts) - 1, read)


# --- the tokenizing workers (jaxgpt.prepare starts them) -------------------------------------------------

CHECK_CHARS = 8192  # how much of each job tokenizers encodes too, to check tiktoken

_WORKER: dict[str, Any] = {}


def init_worker(tokenizer_json: bytes | None, eot: int | None, dtype: str, fast: bool) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # this worker process only: one core each
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it ends the pool)
    _die_with_parent()
    tok = twin = None
    if tokenizer_json is not None:
        from tokenizers import Tokenizer
        tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        twin = tiktoken_twin(tokenizer_json) if fast else None
    _WORKER.update(tok=tok, twin=twin, eot=eot, dtype=np.dtype(dtype))


def _die_with_parent() -> None:
    """Linux: this worker is killed when the main process dies (a SIGKILLed prepare leaves no orphans)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def encode_pieces(batch: list[tuple[str, bool]]) -> list[tuple[np.ndarray, int]]:
    """The workers' job: (ids with the end-of-text id after a document's last piece, UTF-8 bytes) for each (text, last).
    With tiktoken, the start of each job's first piece is encoded by tokenizers too: the twin is checked on every job."""
    tok, twin, eot, dtype = _WORKER["tok"], _WORKER["twin"], _WORKER["eot"], _WORKER["dtype"]
    raw = [text.encode("utf-8") for text, _ in batch]
    if tok is None:
        ids = [np.frombuffer(r, np.uint8) for r in raw]
    elif twin is not None:
        ids = [np.asarray(twin.encode(t, allowed_special="all"), np.int64) for t, _ in batch]
        sample = batch[0][0][:cut_points(batch[0][0], 0, CHECK_CHARS)]  # a few KB, cut where cuts are exact
        if tok.encode(sample, add_special_tokens=False).ids != twin.encode(sample, allowed_special="all"):
            raise UserError("tiktoken and tokenizers give different ids for a document of this corpus; run again with "
                            "--encoder=tokenizers")
    else:
        ids = [np.asarray(e.ids, np.int64) for e in tok.encode_batch([t for t, _ in batch], add_special_tokens=False)]
    out = []
    for (_, last), a, r in zip(batch, ids, raw, strict=True):
        if last and eot is not None:
            a = np.append(a, eot)
        out.append((a.astype(dtype), len(r)))
    return out
