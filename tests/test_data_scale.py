"""The data path at scale, end to end: a 200 MB corpus in five formats (.jsonl, .jsonl.gz, .jsonl.zst, .parquet
and one 40 MB .txt document) prepared by the real CLI with two workers and an 8,192-token BPE: the peak memory
of its whole process tree, sampled documents' ids against the tokenizer's own encoding, a SIGKILL half way and a
resume to the very same shards, and training on the result."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from benchmarks.data import documents, make_corpus, prepare_cmd, run_measured, train_tokenizer
from jaxgpt.loader import open_dataset
from tests import launch

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
MB = 200
PEAK_LIMIT = 1.5e9  # bytes of PSS, summed over the prepare's processes
SHARD = 4_000_000


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    pytest.importorskip("pyarrow", reason="the parquet input needs pyarrow (pip install 'jaxgpt[data]')")
    root = tmp_path_factory.mktemp("scale")
    files = make_corpus(root / "corpus", MB)
    tok = train_tokenizer(root / "tokenizer.json")
    return root, files, tok


def find(stream: np.ndarray, pattern: np.ndarray) -> np.ndarray:
    """Every start of `pattern` in `stream`."""
    at = np.flatnonzero(stream[:len(stream) - len(pattern) + 1] == pattern[0])
    for k in range(1, len(pattern)):
        at = at[stream[at + k] == pattern[k]]
    return at


def test_a_200_mb_corpus_in_flat_memory_exact_resumable_and_trainable(made):
    root, files, tok_path = made
    assert sum(f.stat().st_size for f in files if f.suffix in (".jsonl", ".txt")) > 80e6
    cmd = prepare_cmd(files, root / "data" / "web", tok_path, 2, f"--shard_tokens={SHARD}")
    whole = run_measured(cmd)
    assert whole["returncode"] == 0, whole["stderr"][-3000:]
    print(f"\nprepare, 2 workers: {whole['wall_s']:.1f} s, peak PSS of the process tree "
          f"{whole['peak_pss_bytes'] / 2**20:.0f} MiB")
    assert 0 < whole["peak_pss_bytes"] < PEAK_LIMIT, f"peak PSS {whole['peak_pss_bytes'] / 2**20:.0f} MiB"
    meta = json.loads((root / "data" / "web" / "meta.json").read_text())
    shards = [s["name"] for s in meta["shards"]["train"]]
    assert len(shards) >= 8

    # sampled documents: each one's own encoding, with an end-of-text before and after, in input order
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(str(tok_path))
    ds = open_dataset(str(root / "data"), "web")
    stream = np.concatenate([ds.stream(s).read(0, ds.stream(s).n_tokens) for s in ("val", "train")])
    eot = meta["eot_id"]
    rng = np.random.default_rng(0)
    last = -1
    for i in range(4):  # the jsonl, jsonl.gz, jsonl.zst and parquet files, in order
        docs = documents(int(MB * 1e6 / 5), i)  # what make_corpus wrote into file i
        for k in sorted(rng.choice(len(docs), 3, replace=False)):
            ids = np.array(tok.encode(docs[k], add_special_tokens=False).ids + [eot])
            at = find(stream, ids)
            assert len(at) == 1 and stream[at[0] - 1] == eot, f"file {i} document {k}: not found once at a boundary"
            assert at[0] > last, "documents out of input order"
            last = at[0]
    text = files[4].read_text(encoding="utf-8")
    ends = np.flatnonzero(stream == eot)
    assert ends[-2] > last and ends[-1] == len(stream) - 1  # the .txt is the last document, and one document
    assert tok.decode(stream[ends[-2] + 1:-1].tolist(), skip_special_tokens=False) == text

    # SIGKILL half way, then the same command again: the same shards, byte for byte
    killed = prepare_cmd(files, root / "data" / "again", tok_path, 2, f"--shard_tokens={SHARD}")
    proc = launch.Popen(killed, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while len(list((root / "data" / "again").glob("train_*.bin"))) < len(shards) // 2:
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    t0 = time.perf_counter()
    resumed = subprocess.run(killed, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    print(f"resume after a kill at half way: {time.perf_counter() - t0:.1f} s")
    for name in [*shards, *(s["name"] for s in meta["shards"]["val"])]:
        a, b = root / "data" / "web" / name, root / "data" / "again" / name
        assert a.stat().st_size == b.stat().st_size and a.read_bytes() == b.read_bytes(), name

    # training reads the shards, in epoch order, a few steps
    run = launch.run([sys.executable, str(ROOT / "scripts" / "train.py"), "--dataset=web", f"--data_dir={root / 'data'}",
                      f"--out_dir={root / 'out'}", "--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64",
                      "--batch_size=8", "--max_iters=20", "--eval_interval=10", "--eval_iters=2", "--data_order=epoch",
                      "--val_tokens=20000", "--progress=false", "--plot=false", "--learning_rate=3e-3"],
                     capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    losses = [json.loads(line)["train_loss"] for line in (root / "out" / "metrics.jsonl").read_text().splitlines()]
    assert losses[-1] < losses[0] - 0.5, losses
    scored = launch.run([sys.executable, str(ROOT / "scripts" / "eval.py"), str(root / "out"), "--json", "--progress=false"],
                        capture_output=True, text=True, timeout=600)
    assert scored.returncode == 0, scored.stderr[-3000:]
    result = json.loads(scored.stdout)  # the whole val split, its bytes from meta.json
    assert result["tokens"] == meta["val_tokens"] - 1 and result["bytes"] == meta["val_bytes"], result
