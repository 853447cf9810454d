"""HellaSwag, scored as build-nanogpt and llm.c score GPT-2 (completion style, no prompt format).

Each example is a context and four endings. Row i is the context's tokens followed by the tokens of
" " + ending i; the model predicts every token of the row from the ones before it, and only the ending's
tokens count. `acc` picks the ending with the lowest summed loss, `acc_norm` the lowest mean loss per
ending token (ties: the first, as numpy's and torch's argmin). OpenAI's GPT-2 124M scores acc 0.2859,
acc_norm 0.2955 this way (llm.c); chance is 0.25.

A row longer than the model's block_size cannot be scored as the method says, so such an example is
refused (counted in the result), never cut. Rows are padded to a few bucketed lengths, examples batched:
one compiled program per (batch, bucket).
"""
from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import paths
from jaxgpt.errors import UserError
from jaxgpt.sample import prompt_bucket

URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"  # 10,042 examples
ENDINGS = 4


@dataclass(frozen=True)
class Example:
    context: list[int]
    endings: list[list[int]]  # tokens of " " + ending, one list per ending
    label: int

    @property
    def longest(self) -> int:
        return len(self.context) + max(len(e) for e in self.endings)


@dataclass(frozen=True)
class HellaSwagResult:
    examples: int  # scored
    acc: float
    acc_norm: float
    refused: int  # longer than block_size
    choices: list[tuple[int, int]] = field(repr=False)  # per scored example: (acc's pick, acc_norm's pick)

    def to_dict(self) -> dict[str, Any]:
        return {"examples": self.examples, "acc": self.acc, "acc_norm": self.acc_norm, "refused": self.refused}


def fetch(cache: Path | None = None) -> Path:
    """HellaSwag's validation file from its canonical address, kept in the user's cache folder."""
    dst = (cache or paths.cache_home() / "hellaswag") / "hellaswag_val.jsonl"
    if not dst.exists():
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = dst.with_suffix(".part")
        try:
            with urllib.request.urlopen(URL, timeout=60) as r, open(tmp, "wb") as f:
                f.write(r.read())
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot download HellaSwag from {URL} ({paths.describe(e)}); download it elsewhere and "
                            f"pass the file: --hellaswag hellaswag_val.jsonl") from None
        tmp.replace(dst)
    return dst


def read(source: str) -> list[dict[str, Any]]:
    """HellaSwag's jsonl (local, gs:// or any URL): one object per line with `ctx`, `endings` (4) and `label`."""
    try:
        with paths.open_read(source) as f:
            lines = f.read().decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read HellaSwag file {source} ({paths.describe(e)}); pass hellaswag_val.jsonl") from None
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            ok = isinstance(d["ctx"], str) and len(d["endings"]) == ENDINGS and int(d["label"]) in range(ENDINGS)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise UserError(f"{source}:{n} is not a HellaSwag example (a JSON object with 'ctx', 4 'endings' and "
                            f"a 'label' 0-3)")
        out.append(d)
    if not out:
        raise UserError(f"{source} holds no HellaSwag examples")
    return out


def encode(examples: Iterable[dict[str, Any]], tokenizer: Any) -> list[Example]:
    """Token ids of each context and of " " + each ending (GPT-2's BPE attaches the space to the word)."""
    return [Example([int(t) for t in tokenizer.encode(d["ctx"])],
                    [[int(t) for t in tokenizer.encode(" " + e)] for e in d["endings"]], int(d["label"]))
            for d in examples]


def _row_losses(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, y: jax.Array,
                mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per row: the summed loss of its masked-in targets and their count (float32)."""
    logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(jnp.where(mask, losses, 0.0), axis=1), jnp.sum(mask, axis=1)


row_losses = jax.jit(_row_losses, static_argnums=0)


def rows(batch: list[Example], width: int, slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, mask) of `slots` examples' 4 rows each, `width` positions: y is x shifted by one, mask marks
    the targets that are ending tokens. Missing examples (a short last batch) are rows of padding."""
    x = np.zeros((slots * ENDINGS, width + 1), np.int32)
    mask = np.zeros((slots * ENDINGS, width + 1), bool)
    for i, ex in enumerate(batch):
        for j, end in enumerate(ex.endings):
            n = len(ex.context)
            x[i * ENDINGS + j, :n + len(end)] = ex.context + end
            mask[i * ENDINGS + j, n:n + len(end)] = True
    return x[:, :-1], x[:, 1:], mask[:, 1:]


def score(model: Any, examples: list[Example], batch_size: int = 8,
          progress: Callable[[int], None] | None = None) -> HellaSwagResult:
    """acc and acc_norm of `model` (eval mode, float32 logits) on the examples that fit its block."""
    block = model.config.block_size
    fits = [i for i, ex in enumerate(examples) if ex.longest <= block]
    if not fits:
        raise UserError(f"all {len(examples)} HellaSwag examples are longer than the model's block_size of {block} "
                        f"tokens (the shortest needs {min(ex.longest for ex in examples)})")
    model.eval()
    graphdef, params = nnx.split(model)
    order = sorted(fits, key=lambda i: examples[i].longest)  # similar lengths share a bucket
    picks: dict[int, tuple[int, int]] = {}
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = [examples[i] for i in idx]
        width = prompt_bucket(max(ex.longest for ex in batch), block)
        x, y, mask = rows(batch, width, batch_size)
        sums, counts = jax.device_get(row_losses(graphdef, params, jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask)))
        sums, counts = sums.reshape(-1, ENDINGS), counts.reshape(-1, ENDINGS)
        for k, i in enumerate(idx):
            picks[i] = (int(np.argmin(sums[k])), int(np.argmin(sums[k] / counts[k])))
        if progress is not None:
            progress(len(idx))
    choices = [picks[i] for i in fits]
    labels = np.array([examples[i].label for i in fits])
    acc = float(np.mean(np.array([c[0] for c in choices]) == labels))
    acc_norm = float(np.mean(np.array([c[1] for c in choices]) == labels))
    return HellaSwagResult(len(fits), acc, acc_norm, len(examples) - len(fits), choices)
