"""The data section of bench.py: corpora made to order, the prepare's memory and speed against a plain
process-pool script, and what one host's loader delivers at GPT-2 124M's shape.

- `make_corpus`: a deterministic corpus of about N MB in several formats (.jsonl, .jsonl.gz, .jsonl.zst,
  .parquet and one large .txt), documents drawn from the Tiny Shakespeare bundled with jaxgpt with a seeded
  generator (lines shuffled, numbers mixed in), so the tests and the bench need no download.
- `train_tokenizer`: a byte-level BPE tokenizer.json with <|endoftext|>, trained on that text.
- `peak_pss`: the largest sum of PSS over a process and all its descendants, sampled from /proc.
- `baseline.py` beside this file is the plain process-pool script (build-nanogpt's fineweb.py shape).
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from jaxgpt.data import bundled_shakespeare

FORMATS = ("jsonl", "jsonl.gz", "jsonl.zst", "parquet", "txt")


def _lines() -> list[str]:
    return [line for line in bundled_shakespeare().decode("utf-8").splitlines() if line.strip()]


def documents(n_bytes: int, seed: int = 0) -> list[str]:
    """Documents of 200 B - 20 KB (log-uniform, as web text) totalling about n_bytes, seeded."""
    lines = np.array(_lines(), dtype=object)
    rng = np.random.default_rng(seed)
    docs, total = [], 0
    while total < n_bytes:
        size = int(np.exp(rng.uniform(np.log(200), np.log(20_000))))
        picked = lines[rng.integers(0, len(lines), size // 30 + 1)]
        numbers = rng.integers(0, 10_000, len(picked) // 8 + 1)
        text = "\n".join(picked) + "\n" + " ".join(map(str, numbers))
        docs.append(text)
        total += len(text)
    return docs


def make_corpus(folder: Path, mb: float, seed: int = 0, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """About `mb` MB of text as one file per format (the .txt is one document), returned in order."""
    folder.mkdir(parents=True, exist_ok=True)
    share = int(mb * 1e6 / len(formats))
    out = []
    for i, fmt in enumerate(formats):
        path = folder / f"part{i:02d}.{fmt}"
        docs = documents(share, seed * 100 + i)
        if fmt == "txt":
            path.write_text("\n\n".join(docs), encoding="utf-8")
        elif fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq
            pq.write_table(pa.table({"text": docs, "id": np.arange(len(docs))}), path, row_group_size=2000)
        else:
            body = "".join(json.dumps({"id": k, "text": d}) + "\n" for k, d in enumerate(docs)).encode("utf-8")
            if fmt.endswith(".gz"):
                body = gzip.compress(body, compresslevel=1)
            elif fmt.endswith(".zst"):
                import zstandard
                body = zstandard.ZstdCompressor(level=3).compress(body)
            path.write_bytes(body)
        out.append(path)
    return out


def train_tokenizer(path: Path, vocab_size: int = 8192) -> Path:
    """A byte-level BPE tokenizer.json (GPT-2's pre-tokenizer) with <|endoftext|>, trained on Tiny Shakespeare."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([bundled_shakespeare().decode("utf-8")], trainer)
    tok.save(str(path))
    return path


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo.extend(int(c) for c in f.read().split())
        except OSError:
            pass
    return out


def _pss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_measured(cmd: list[str], env: dict | None = None, interval: float = 0.05) -> dict:
    """Run cmd; its wall time and the peak of the PSS summed over its process tree (sampled every interval s)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while proc.poll() is None:
            peak[0] = max(peak[0], sum(_pss(p) for p in _tree(proc.pid)))
            time.sleep(interval)
    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    out, err = proc.communicate()
    thread.join()
    return {"returncode": proc.returncode, "wall_s": time.perf_counter() - t0, "peak_pss_bytes": peak[0],
            "stdout": out, "stderr": err}


def prepare_cmd(inputs: list[Path], out: Path, tokenizer: Path | None, workers: int, *extra: str) -> list[str]:
    root = Path(__file__).resolve().parents[1]
    return [sys.executable, str(root / "scripts" / "prepare.py"), "text", "--input", *map(str, inputs),
            "--name", out.name, "--data_dir", str(out.parent), "--workers", str(workers), "--progress=false",
            *(["--tokenizer", str(tokenizer)] if tokenizer else []), *extra]


def baseline_cmd(inputs: list[Path], out: Path, tokenizer: Path, workers: int) -> list[str]:
    return [sys.executable, str(Path(__file__).with_name("baseline.py")), str(tokenizer), str(out), str(workers),
            *map(str, inputs)]


def env_without_threads() -> dict:
    return {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
