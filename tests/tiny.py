"""The tiny run the CLI tests train, defined once.

Every flag that shapes a compiled program is here: the model, the batch, and the learning-rate
schedule (its warmup and decay lengths are constants inside the train step; without
--lr_decay_iters the decay follows --max_iters, so each run length was a program of its own).
The CLIs of one session share a compilation cache, so a test that trains with these flags
compiles nothing the first one did not: ~12 s of CPU saved per process on a 2-core VM.
Tests add --dataset=synth and what does not change the program (--max_iters, --eval_interval, --out_dir, ...)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxgpt.data import prepare_text
from parity.rows import synthetic_corpus

MODEL = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=16"]
TRAIN = [*MODEL, "--batch_size=4", "--warmup_iters=2", "--lr_decay_iters=32", "--eval_iters=2",
         "--progress=false"]
CORPUS_BYTES = 20_000


def corpus() -> bytes:
    """The synthetic text every CLI test trains on (deterministic)."""
    return synthetic_corpus(CORPUS_BYTES).astype(np.uint8).tobytes()


def prepare(root: Path) -> Path:
    """root/data/synth prepared from corpus(): the layout `--dataset=synth` reads from root. Returns root."""
    prepare_text(corpus(), root / "data" / "synth", "synthetic")
    return root
