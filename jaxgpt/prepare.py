"""`prepare.py text`: a corpus of any size -> train_/val_ token shards + meta.json, on every core, in flat
memory, resumable, straight into a local folder or a gs:// bucket.

The main process reads pieces of documents (jaxgpt.corpus) and hands batches of them to `workers`
tokenizing processes through a bounded window of jobs, so memory stays the same whatever the corpus;
results come back in input order and are appended to the open shard. The first documents, up to
--val_tokens, are the val split; the rest fill train shards of exactly --shard_tokens. After each
finished shard a ledger (.progress/task_NNNN.json) records the shards and the place in the corpus where
the next shard begins, so the same command run again after a kill continues there and writes the same
bytes. `--task=I --tasks=N` prepares the I-th of N slices of the inputs (an array job); the task that finds
every ledger done writes meta.json.
"""
from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import corpus, paths, shards
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import BYTES_IDENTITY, EOT_BYTE, EOT_TEXT, TOKENIZER_FILE, HFTokenizer, tiktoken_twin

DEFAULT_SHARD_TOKENS = 100_000_000  # llm.c's fineweb.py
AUTO_VAL_TOKENS = 10_000_000  # build-nanogpt evaluates 20 x 0.5 M tokens; nanoGPT's OpenWebText val.bin is ~4 M
PROGRESS = ".progress"
JOB_CHARS = 1 << 20  # text per job handed to a worker
ENCODERS = ("auto", "tokenizers", "tiktoken")


@dataclass(frozen=True)
class CorpusJob:
    """One `prepare.py text` command: what to read, how to tokenize it, and where the shards go."""

    inputs: list[str]
    out: str  # data_dir/name, local or gs://
    tokenizer: str | None = None  # a tokenizer.json; None = bytes
    text_field: str = "text"
    workers: int = 0  # 0 = the cores
    shard_tokens: int = DEFAULT_SHARD_TOKENS
    val_tokens: int = 0  # 0 = auto
    task: int = 0
    tasks: int = 1
    piece_chars: int = corpus.PIECE_CHARS
    progress: bool = True
    encoder: str = "auto"  # auto: tiktoken where it is proven to give tokenizers' ids, else tokenizers

    def __post_init__(self) -> None:
        if not (isinstance(self.shard_tokens, int) and 1 <= self.shard_tokens < 2**31):
            raise UserError(f"--shard_tokens must be in [1, 2**31), got {self.shard_tokens}")
        if self.val_tokens < 0:
            raise UserError(f"--val_tokens must be >= 0 (0 = auto), got {self.val_tokens}")
        if not (self.tasks >= 1 and 0 <= self.task < self.tasks):
            raise UserError(f"--task must be in [0, --tasks={self.tasks}), got {self.task}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 1 (0 = the cores), got {self.workers}")
        if self.encoder not in ENCODERS:
            raise UserError(f"--encoder must be one of {ENCODERS}, got {self.encoder!r}")


# --- where shards and the ledger go ---------------------------------------------------------------------------

@dataclass
class _Ledger:
    fingerprint: dict[str, Any]
    task: int
    val: dict[str, Any] | None = None
    train: list[dict[str, Any]] = field(default_factory=list)
    train_bytes: int = 0
    position: list[int] | None = None  # [file, doc, piece, ids of that piece already in finished shards]
    done: bool = False


class _Out:
    """The dataset folder: shards land in it whole (renamed locally, uploaded streaming to gs://)."""

    def __init__(self, url: str):
        self.url, self.remote = url, paths.is_remote(url)
        self.local = Path(tempfile.mkdtemp(prefix="jaxgpt-prepare-")) if self.remote else Path(url)
        self.local.mkdir(parents=True, exist_ok=True)

    def ledger_url(self, task: int) -> Any:
        return paths.path(self.url) / PROGRESS / f"task_{task:04d}.json"

    def read_ledger(self, task: int) -> dict | None:
        p = self.ledger_url(task)
        return json.loads(paths.retrying(f"reading {p}", p.read_text)) if p.exists() else None

    def write_ledger(self, ledger: _Ledger) -> None:
        paths.write_text(self.ledger_url(ledger.task), json.dumps(asdict(ledger), indent=1))

    def publish(self, tmp: Path, name: str) -> None:
        if self.remote:
            paths.upload(tmp, paths.path(self.url) / name)
            tmp.unlink()
        else:
            os.replace(tmp, self.local / name)

    def size(self, name: str) -> int | None:
        p = paths.path(self.url) / name
        return paths.size(p) if p.exists() else None

    def close(self) -> None:
        if self.remote:
            shutil.rmtree(self.local, ignore_errors=True)


# --- the run --------------------------------------------------------------------------------------------------

def _tokenizer(job: CorpusJob) -> tuple[HFTokenizer | None, dict, int | None, np.dtype]:
    if job.tokenizer is None:
        return None, dict(BYTES_IDENTITY), EOT_BYTE, shards.shard_dtype(256)
    tok = HFTokenizer(job.tokenizer)
    return tok, tok.identity(), tok.tok.token_to_id(EOT_TEXT), shards.shard_dtype(tok.vocab_size)


def auto_val_tokens(inputs: list[corpus.Input], byte_level: bool) -> int:
    """--val_tokens=0: a tenth of the corpus, estimated from the input files' size (1 byte a token for
    bytes, 4 for a BPE tokenizer), at most AUTO_VAL_TOKENS."""
    estimate = sum(f.size for f in inputs) // (1 if byte_level else 4)
    return max(1, min(AUTO_VAL_TOKENS, estimate // 10))


def prepare_corpus(job: CorpusJob) -> dict[str, Any]:
    """Run (or continue) one task of a prepare; returns meta.json's contents once every task is done,
    else this task's ledger."""
    tok, identity, eot, dtype = _tokenizer(job)
    inputs = corpus.expand_inputs(job.inputs)
    val_tokens = job.val_tokens or auto_val_tokens(inputs, tok is None)
    fingerprint = {"inputs": [asdict(f) for f in inputs], "tokenizer": identity, "text_field": job.text_field,
                   "shard_tokens": job.shard_tokens, "val_tokens": val_tokens, "tasks": job.tasks,
                   "piece_chars": job.piece_chars, "eot_id": eot}
    out = _Out(job.out)
    try:
        meta_path = paths.path(job.out) / "meta.json"
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            if meta.get("fingerprint") == fingerprint:
                return {**meta, "unchanged": True}
            raise UserError(f"{job.out} already holds a prepared dataset made by another command or from other input; "
                            f"choose a new --name, or delete {job.out} to prepare it again")
        saved = out.read_ledger(job.task)
        if saved is not None and saved.get("fingerprint") != fingerprint:
            differs = sorted(k for k in fingerprint if saved["fingerprint"].get(k) != fingerprint[k])
            raise UserError(f"{job.out} holds an unfinished prepare begun with another command or input (it differs in: "
                            f"{', '.join(differs)}); run the same command again to finish it, or delete {job.out} "
                            f"(or choose a new --name) to start over")
        ledger = _Ledger(**saved) if saved else _Ledger(fingerprint, job.task)
        for entry in (ledger.val or {}).get("shards", []) + ledger.train:
            if out.size(entry["name"]) != shards.HEADER_BYTES + entry["tokens"] * dtype.itemsize:
                raise UserError(f"{job.out}/{entry['name']} is missing or damaged although the ledger lists it finished; "
                                f"delete {job.out} and prepare again")
        if tok is not None:
            paths.write_bytes(paths.path(job.out) / TOKENIZER_FILE, tok.raw)
        for stale in out.local.glob(f".shard-{job.task:04d}-*"):  # the open shard of a killed run of this task
            stale.unlink(missing_ok=True)
        if not ledger.done:
            _Run(job, out, inputs, ledger, tok, eot, dtype, val_tokens).go()
        return _finalize(job, out, fingerprint, identity, dtype, inputs) or asdict(ledger)
    finally:
        out.close()


class _Run:
    def __init__(self, job: CorpusJob, out: _Out, inputs: list[corpus.Input], ledger: _Ledger, tok: HFTokenizer | None,
                 eot: int | None, dtype: np.dtype, val_tokens: int):
        self.job, self.out, self.inputs, self.ledger, self.tok, self.eot, self.dtype = job, out, inputs, ledger, tok, eot, dtype
        self.files = corpus.task_slice(inputs, job.task, job.tasks)
        self.val_open = job.task == 0 and ledger.val is None
        self.val_limit = val_tokens
        self.val: list[np.ndarray] = []  # whole documents taken into val
        self.val_len = self.val_bytes = 0
        self.doc: list[tuple[tuple[int, int, int], np.ndarray, int]] = []  # the current document while val is open
        self.shard: shards.ShardWriter | None = None
        self.open_bytes = 0
        self.last: list[int] | None = None  # the place after the last piece taken while val is open

    @functools.cached_property
    def twin(self) -> Any:
        """tiktoken's encoding with this tokenizer's ids, or None (jaxgpt.tokenizer.tiktoken_twin): built once."""
        return tiktoken_twin(self.tok.raw) if self.tok is not None else None

    def go(self) -> None:
        pos = self.ledger.position or [self.files.start if len(self.files) else 0, 0, 0, 0]
        tok = self.tok
        cut = tok is None or corpus.cuts_are_exact(lambda t: tok.tok.encode(t, add_special_tokens=False).ids)
        if self.eot is None:
            tqdm.write(f"note: {self.job.tokenizer} has no end-of-text token ({EOT_TEXT}): documents are concatenated "
                       f"without a separator", file=sys.stderr)
        if not cut:
            tqdm.write(f"note: {self.job.tokenizer} joins text across spaces, so documents are tokenized whole "
                       f"(memory then grows with the longest document)", file=sys.stderr)
        source = corpus.pieces(self.inputs, self.files, self.job.text_field, (pos[0], pos[1], pos[2]),
                               self.job.piece_chars, cut)
        sizes = [self.inputs[i].size for i in self.files]
        before = dict(zip(self.files, np.cumsum([0, *sizes])[:-1].tolist(), strict=True))  # the slice's bytes before each file
        bar = tqdm(total=sum(sizes), unit="B", unit_scale=True, disable=not self.job.progress, dynamic_ncols=True, delay=2,
                   desc=f"{Path(self.job.out).name}" + (f" task {self.job.task}/{self.job.tasks}" if self.job.tasks > 1 else ""))
        t0, tokens = time.perf_counter(), 0
        skip = pos[3]
        try:
            for tag, last, read, ids, n_bytes in self._encoded(source):
                if skip and tag == tuple(pos[:3]):
                    ids, base, skip = ids[skip:], skip, 0
                else:
                    base = 0
                self._take(tag, last, ids, base, n_bytes)
                tokens += len(ids)
                bar.update(max(0, before[tag[0]] + read - bar.n))  # input bytes read, compressed ones included
                bar.set_postfix_str(f"{tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f} M tokens/s", refresh=False)
        except BaseException:
            bar.leave = False  # the error line stands alone
            raise
        finally:
            bar.close()
        if self.val_open:
            self._close_val(None)
        if self.shard is not None and self.shard.tokens:
            self._finish_shard(self.ledger.position or [0, 0, 0, 0])
        elif self.shard is not None:
            self.shard.discard()
        if self.job.task == 0 and self.job.tasks == 1 and not self.ledger.train:
            raise UserError(f"the corpus holds {self.val_len:,} tokens, all of them taken by the val split "
                            f"(--val_tokens={self.val_limit:,}); pass a smaller --val_tokens")
        self.ledger.done = True
        self.out.write_ledger(self.ledger)

    def _encoded(self, source: Iterator[corpus.Piece]) -> Iterator[tuple[tuple[int, int, int], bool, int, np.ndarray, int]]:
        """(place, last piece of its document, its file's bytes read, ids, bytes) of every piece, in order, from `workers` processes, at most 2 jobs each in flight."""
        workers = self.job.workers or os.cpu_count() or 1
        ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (JAX, gcsfs)
        init = (self.tok.raw if self.tok else None, self.eot, self.dtype.name, self._fast())
        with ctx.Pool(workers, initializer=corpus.init_worker, initargs=init) as pool:
            window: collections.deque = collections.deque()
            for batch in _batches(source):
                window.append(([((p.file, p.doc, p.piece), p.last, p.read) for p in batch],
                               pool.apply_async(corpus.encode_pieces, ([(p.text, p.last) for p in batch],))))
                while len(window) >= 2 * workers + 1:
                    yield from _results(window.popleft())
            while window:
                yield from _results(window.popleft())

    def _fast(self) -> bool:
        """tiktoken for this tokenizer: where --encoder allows, it can stand for it, and it agrees on a probe."""
        if self.tok is None or self.job.encoder == "tokenizers":
            return False
        twin, hf = self.twin, self.tok.tok
        probe = corpus.PROBE + EOT_TEXT + "x"
        if twin is None or twin.encode(probe, allowed_special="all") != hf.encode(probe, add_special_tokens=False).ids:
            if self.job.encoder == "tiktoken":
                raise UserError(f"--encoder=tiktoken: {self.job.tokenizer} is not a byte-level BPE that tiktoken encodes "
                                f"the same (or tiktoken is not installed); use --encoder=auto")
            return False
        return True

    def _take(self, tag: tuple[int, int, int], last: bool, ids: np.ndarray, base: int, n_bytes: int) -> None:
        if not self.val_open:
            self._train(tag, ids, base, n_bytes)
            return
        self.doc.append((tag, ids, n_bytes))
        self.last = [*tag, len(ids)]
        length = sum(len(a) for _, a, _ in self.doc)
        if self.val_len + length > self.val_limit:
            self._close_val(self.doc)
        elif last:  # a whole document that fits: into val
            self.val.extend(a for _, a, _ in self.doc)
            self.val_len += length
            self.val_bytes += sum(b for _, _, b in self.doc)
            self.doc = []

    def _close_val(self, pending: list | None) -> None:
        """Val is the documents taken so far; a first document longer than val_tokens is cut at val_tokens.
        The rest of `pending` begins train."""
        pending = pending or []
        if not self.val and pending:  # no whole document fits: the first val_tokens ids of the first one
            rest, room = [], self.val_limit
            for tag, a, b in pending:
                if room >= len(a):  # a whole piece: its bytes are known
                    self.val.append(a)
                    self.val_bytes, room = self.val_bytes + b, room - len(a)
                    continue
                part = self._text_bytes(a[:room]) if room else 0  # only the piece that straddles the cut is decoded
                if room:
                    self.val.append(a[:room])
                    self.val_bytes += part
                rest.append((tag, a[room:], room, b - part))
                room = 0
            self.val_len = self.val_limit - room
        else:
            rest = [(tag, a, 0, b) for tag, a, b in pending]
        self.val_open, self.doc = False, []
        names, ids = [], np.concatenate(self.val) if self.val else np.zeros(0, self.dtype)
        for i, start in enumerate(range(0, len(ids), self.job.shard_tokens)):
            f = shards.ShardWriter(self.out.local, self.dtype, self.job.task)
            f.write(ids[start:start + self.job.shard_tokens])
            path, sha = f.finish()
            name = f"val_{i:06d}.bin"
            self.out.publish(path, name)
            names.append({"name": name, "tokens": f.tokens, "sha256": sha})
        self.ledger.val = {"shards": names, "tokens": int(len(ids)), "bytes": int(self.val_bytes)}
        self.val = []
        # train begins at the first id not in val (after val's last piece when nothing is left over)
        self.ledger.position = [*rest[0][0], rest[0][2]] if rest else self.last
        self.out.write_ledger(self.ledger)
        for tag, a, base, b in rest:
            self._train(tag, a, base, b)

    def _text_bytes(self, ids: np.ndarray) -> int:
        """UTF-8 bytes of the text these ids encode (end-of-text ids not counted): exact for bytes and where
        tiktoken stands for the tokenizer; else tokenizers' decoding (a character cut in two counts as U+FFFD)."""
        body = ids[ids != self.eot] if self.eot is not None else ids
        if self.tok is None:
            return len(body)
        if self.twin is not None:
            return len(self.twin.decode_bytes(body.tolist()))
        return len(self.tok.decode(body).encode("utf-8"))

    def _train(self, tag: tuple[int, int, int], ids: np.ndarray, base: int, n_bytes: int) -> None:
        while True:
            if self.shard is None:
                self.shard = shards.ShardWriter(self.out.local, self.dtype, self.job.task)
            room = self.job.shard_tokens - self.shard.tokens
            self.shard.write(ids[:room])
            base += min(room, len(ids))
            if len(ids) <= room:
                self.open_bytes += n_bytes  # the piece ends in this shard
            self.ledger.position = [*tag, base]
            if self.shard.tokens == self.job.shard_tokens:
                self._finish_shard([*tag, base])
            if len(ids) <= room:
                return
            ids = ids[room:]

    def _finish_shard(self, position: list[int]) -> None:
        assert self.shard is not None
        path, sha = self.shard.finish()
        prefix = "train_" if self.job.tasks == 1 else f"train_{self.job.task:04d}_"
        name = f"{prefix}{len(self.ledger.train):06d}.bin"
        self.out.publish(path, name)
        self.ledger.train.append({"name": name, "tokens": self.shard.tokens, "sha256": sha})
        self.ledger.train_bytes += self.open_bytes
        self.ledger.position, self.open_bytes, self.shard = position, 0, None
        self.out.write_ledger(self.ledger)


def _batches(source: Iterator[corpus.Piece]) -> Iterator[list[corpus.Piece]]:
    batch: list[corpus.Piece] = []
    chars = 0
    for p in source:
        batch.append(p)
        chars += len(p.text)
        if chars >= JOB_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def _results(entry: tuple[list, Any]) -> Iterator[tuple[tuple[int, int, int], bool, int, np.ndarray, int]]:
    tags, result = entry
    for (tag, last, read), (ids, n_bytes) in zip(tags, result.get(), strict=True):
        yield tag, last, read, ids, n_bytes


def _finalize(job: CorpusJob, out: _Out, fingerprint: dict, identity: dict, dtype: np.dtype,
              inputs: list[corpus.Input]) -> dict | None:
    """meta.json, once every task's ledger says done (any task may be the one that finds them so)."""
    ledgers = [out.read_ledger(t) for t in range(job.tasks)]
    if not all(lg and lg.get("done") and lg.get("fingerprint") == fingerprint for lg in ledgers):
        return None
    train = [s for lg in ledgers for s in lg["train"]]  # type: ignore[index]
    val = ledgers[0]["val"] or {"shards": [], "tokens": 0, "bytes": 0}  # type: ignore[index]
    meta = {"format": "shards", "tokenizer": "bytes" if identity["kind"] == "bytes" else TOKENIZER_FILE,
            "tokenizer_identity": identity, "vocab_size": identity["vocab_size"], "dtype": dtype.name,
            "eot_id": fingerprint["eot_id"], "train_tokens": sum(s["tokens"] for s in train), "val_tokens": val["tokens"],
            "train_bytes": sum(lg["train_bytes"] for lg in ledgers), "val_bytes": val["bytes"],  # type: ignore[index]
            "shards": {"train": train, "val": val["shards"]},
            "files": {s["name"]: s["sha256"] for s in train + val["shards"]},
            "source": [f.url for f in inputs], "fingerprint": fingerprint}
    paths.write_text(paths.path(job.out) / "meta.json", json.dumps(meta, indent=1))
    return meta

