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
from typing import Any

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


# --- bench.py --sections=data --------------------------------------------------------------------------------

GPT2_HOST_BATCH = (8, 16, 1024)  # devices, rows per device, block: GPT-2 124M on one v5e-8 host


def _tokens(out: Path) -> int:
    meta = json.loads((out / "meta.json").read_text())
    return meta["train_tokens"] + meta["val_tokens"]


def prepare_figures(mb: float, workers: list[int], txt_mb: float, log) -> list:
    """Peak PSS and tokens/s of prepare.py for each worker count, against the plain process-pool script on the
    same files (the corpus without its .txt: the baseline reads a .txt whole), the resume after a SIGKILL at
    half way, and the peak for a corpus that is one .txt of txt_mb."""
    import tempfile

    from benchmarks.harness import Figure
    figures = []
    with tempfile.TemporaryDirectory(prefix="jaxgpt-data-bench-") as tmp:
        root = Path(tmp)
        log(f"data: making a {mb:g} MB corpus (jsonl, jsonl.gz, jsonl.zst, parquet) and a tokenizer")
        files = make_corpus(root / "corpus", mb, formats=("jsonl", "jsonl.gz", "jsonl.zst", "parquet"))
        tok = train_tokenizer(root / "tokenizer.json")
        size = f"{sum(f.stat().st_size for f in files) / 1e6:.0f} MB of files"
        walls = {}
        for w in workers:
            r = run_measured(prepare_cmd(files, root / "out" / f"w{w}", tok, w))
            if r["returncode"]:
                raise RuntimeError(r["stderr"][-2000:])
            n = _tokens(root / "out" / f"w{w}")
            walls[w] = r["wall_s"]
            log(f"  prepare.py, {w} worker(s): {r['wall_s']:.1f} s, {n / r['wall_s'] / 1e6:.2f} M tokens/s, "
                f"peak PSS {r['peak_pss_bytes'] / 2**20:.0f} MiB")
            figures += [Figure("data", f"prepare.py text, {w} worker(s): tokens/s", n / r["wall_s"], "tokens/s",
                               f"{n / 1e6:.0f} M tokens, {size}, whole process {r['wall_s']:.1f} s"),
                        Figure("data", f"prepare.py text, {w} worker(s): peak PSS of the process tree",
                               r["peak_pss_bytes"] / 2**20, "MiB", "target < 1,431 MiB (1.5 GB)")]
        w = max(workers)
        r = run_measured(baseline_cmd(files, root / "out" / "baseline", tok, w))
        if r["returncode"]:
            raise RuntimeError(r["stderr"][-2000:])
        log(f"  plain process pool, {w} workers: {r['wall_s']:.1f} s, peak PSS {r['peak_pss_bytes'] / 2**20:.0f} MiB")
        figures += [Figure("data", f"plain process pool ({w} workers, tokenizers' encode): whole process", r["wall_s"], "s",
                           f"peak PSS {r['peak_pss_bytes'] / 2**20:.0f} MiB; benchmarks/baseline.py"),
                    Figure("data", f"prepare.py / plain process pool, {w} workers: wall-clock ratio", walls[w] / r["wall_s"],
                           "x", "< 1: prepare.py is faster (same files, same tokenizer, same session)")]
        r = run_measured(prepare_cmd(files, root / "out" / "hf", tok, w, "--encoder=tokenizers"))
        log(f"  prepare.py --encoder=tokenizers, {w} workers: {r['wall_s']:.1f} s, peak PSS {r['peak_pss_bytes'] / 2**20:.0f} MiB")
        figures.append(Figure("data", f"prepare.py --encoder=tokenizers / plain process pool, {w} workers: wall-clock ratio",
                              r["wall_s"] / figures[-2].value, "x", "the pipeline alone: the same encoder as the plain pool"))
        figures.append(_resume_after_kill(prepare_cmd(files, root / "out" / "killed", tok, w, "--shard_tokens=10000000"),
                                          root / "out" / "killed", walls[w], log))
        if txt_mb:
            big = write_big_txt(root / "corpus" / "one.txt", txt_mb)
            r = run_measured(prepare_cmd([big], root / "out" / "txt", tok, w))
            log(f"  one {txt_mb:g} MB .txt, {w} workers: {r['wall_s']:.1f} s, peak PSS {r['peak_pss_bytes'] / 2**20:.0f} MiB")
            figures.append(Figure("data", f"one {txt_mb:g} MB .txt document, {w} workers: peak PSS of the process tree",
                                  r["peak_pss_bytes"] / 2**20, "MiB", f"{r['wall_s']:.1f} s; target < 1,431 MiB"))
    return figures


def _resume_after_kill(cmd: list[str], out: Path, whole_s: float, log) -> Any:
    """The same prepare SIGKILLed at half the uninterrupted run's time, then run again: the second run's time."""
    import signal

    from benchmarks.harness import Figure
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(whole_s / 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("train_*.bin")))
    r = run_measured(cmd)
    log(f"  resume after a SIGKILL at {whole_s / 2:.0f} s ({done} shards done): {r['wall_s']:.1f} s")
    return Figure("data", "resume after a SIGKILL at half the run's time", r["wall_s"], "s",
                  f"{done} shards of 10 M tokens were done; the whole run takes {whole_s:.1f} s")


def write_big_txt(path: Path, mb: float) -> Path:
    """One .txt document of `mb` MB (the corpus's documents joined by blank lines), written 50 MB at a time."""
    with open(path, "w", encoding="utf-8") as f:
        written, seed = 0, 0
        while written < mb * 1e6:
            chunk = "\n\n".join(documents(50_000_000, seed))[:int(mb * 1e6 - written)]
            f.write(chunk)
            written, seed = written + len(chunk), seed + 1
    return path


def write_shards(folder: Path, n_shards: int, shard_tokens: int, seed: int = 0) -> list[tuple[str, int]]:
    """A val shard of 1 M and n_shards train shards of random GPT-2 ids in llm.c's format: (name, tokens) each."""
    from jaxgpt import shards
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    listing = []
    for i in range(n_shards + 1):
        name = f"{'val' if i == 0 else 'train'}_{i:06d}.bin"
        ids = rng.integers(0, 50257, shard_tokens if i else 1_000_000, dtype=np.uint16)
        (folder / name).write_bytes(shards.header(len(ids), ids.dtype) + ids.tobytes())
        listing.append((name, len(ids)))
    return listing


def upload_dataset(folder: Path, listing: list[tuple[str, int]], url: str) -> None:
    """write_shards' folder to gs:// with the meta.json training reads (sizes and sha256 per shard)."""
    from jaxgpt import paths
    meta: dict[str, Any] = {"format": "shards", "vocab_size": 50257, "dtype": "uint16",
                            "tokenizer_identity": {"kind": "unknown", "vocab_size": 50257},
                            "shards": {s: [{"name": n, "tokens": t, "sha256": paths.sha256(folder / n)}
                                           for n, t in listing if n.startswith(s)] for s in ("train", "val")}}
    meta["files"] = {e["name"]: e["sha256"] for split in meta["shards"].values() for e in split}
    for name, _ in listing:
        paths.upload(folder / name, f"{url}/{name}")
    paths.write_text(f"{url}/meta.json", json.dumps(meta))


def loader_rate(data_dir: str, order: str, steps: int, batch: int, block: int) -> float:
    """Tokens/s jaxgpt.loader.BatchSampler delivers over `steps` batches of batch x block from data_dir/synth."""
    from jaxgpt.loader import BatchSampler, open_dataset
    ds = open_dataset(data_dir, "synth", 50304)
    sampler = BatchSampler(ds.stream("train"), block, batch, seed=0, order=order)  # type: ignore[arg-type]
    t0 = time.perf_counter()
    for step in range(steps):
        sampler.get(step)
    return steps * batch * block / (time.perf_counter() - t0)


def loader_figures(log, steps: int = 40, shard_tokens: int = 20_000_000, n_shards: int = 4) -> list:
    """Tokens/s one host's loader delivers at GPT-2 124M's host batch from local shards and from gs:// shards
    (the emulator: cold = fetching, warm = cached), random and epoch order, beside the tokens/s a v5e-8 step
    consumes at its roofline (jaxgpt.plan.targets' peak, jaxgpt.plan.perf's FLOP formula: the compile-only plan's bound)."""
    import shutil
    import tempfile

    from benchmarks.gcs_emulator import Emulator, available
    from benchmarks.harness import Figure
    from jaxgpt import GPTConfig, paths
    from jaxgpt.plan.perf import flops_per_token
    from jaxgpt.plan.targets import parse
    devices, rows, block = GPT2_HOST_BATCH
    v5e = parse("v5e-8")
    need = v5e.devices * v5e.chip.peak_flops / flops_per_token(GPTConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024,
                                                                          vocab_size=50304))
    figures = [Figure("data", "a v5e-8 step consumes, at the roofline (GPT-2 124M)", need, "tokens/s",
                      "peak bf16 FLOP/s / training FLOPs per token: the compile-only plan's bound")]

    def measure(data_dir: str, order: str, label: str) -> None:
        rate = loader_rate(data_dir, order, steps, devices * rows, block)
        log(f"  loader, {label}, {order}: {rate / 1e6:.2f} M tokens/s ({rate / need:.1f}x a v5e-8 step's need)")
        figures.append(Figure("data", f"loader {label}, {order} order: {devices * rows} x {block} per step", rate,
                              "tokens/s", f"{rate / need:.1f}x what a v5e-8 consumes; {steps} steps"))
    with tempfile.TemporaryDirectory(prefix="jaxgpt-loader-bench-") as tmp:
        folder = Path(tmp) / "data" / "synth"
        listing = write_shards(folder, n_shards, shard_tokens)
        for order in ("random", "epoch"):
            measure(str(folder.parent), order, "local shards")
        if available():
            log(f"  loader from gs://: skipped ({available()})")
            return figures
        emulator, old = Emulator(), {k: os.environ.get(k) for k in ("STORAGE_EMULATOR_HOST", "XDG_CACHE_HOME")}
        try:  # this bench process only: the CLIs' way to talk to an emulator
            os.environ.update(STORAGE_EMULATOR_HOST=emulator.url, XDG_CACHE_HOME=str(Path(tmp) / "cache"))
            paths.configure_gcs()
            upload_dataset(folder, listing, f"{emulator.create_bucket('jaxgpt-loader-bench')}/data/synth")
            for order in ("epoch", "random"):
                shutil.rmtree(Path(tmp) / "cache", ignore_errors=True)
                measure("gs://jaxgpt-loader-bench/data", order, "gs:// shards, cold cache")
                measure("gs://jaxgpt-loader-bench/data", order, "gs:// shards, warm cache")
        finally:
            emulator.stop()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return figures
