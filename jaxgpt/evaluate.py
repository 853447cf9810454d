"""Evaluation over a whole text or split: deterministic, every token scored once.

The tokens are cut into consecutive, non-overlapping windows of block_size + 1; each window's
block_size targets are predicted from the tokens before them inside the window (the first
target of a window sees one token of context, the last sees block_size), so every token but
the very first is scored exactly once, as in training, and no sampling of batches is involved.
The last window is padded and masked. Loss per token is nats; bits per byte divide the total
nats by ln 2 and by the UTF-8 bytes of the scored text, which compares a byte-level model with a
BPE model (the enwik8/text8 convention).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxgpt import platform
from jaxgpt.errors import UserError
from jaxgpt.loader import eval_batches, num_windows

EVAL_MEMORY_FRACTION = 0.25  # of the device (or host) memory a batch of windows may take


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean nats per scored token
    tokens: int  # scored tokens
    bytes: int | None  # UTF-8 bytes of the scored text (None when unknown)

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf

    @property
    def bits_per_byte(self) -> float | None:
        return self.loss * self.tokens / math.log(2) / self.bytes if self.bytes else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


def make_nll(graphdef: nnx.GraphDef, dtype: Any = jnp.float32) -> Callable:
    """jitted (params, x, y, mask) -> (sum of nats over the masked-in targets, their count), float32."""
    def nll(params: nnx.State, x: jax.Array, y: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        if dtype != jnp.float32:
            params = jax.tree.map(lambda p: p.astype(dtype), params)
        logits = nnx.merge(graphdef, params)(x).astype(jnp.float32)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(mask)
    return jax.jit(nll)


def batch_size_for(cfg: Any, n_windows: int, devices: int = 1, limit: int | None = None) -> int:
    """Windows per forward, by memory: the logits and a generous 16 activations of (T, C) per layer per
    window must fit EVAL_MEMORY_FRACTION of one device; a multiple of `devices`; at most `limit`
    (default: the platform's, platform.eval_batch_limit)."""
    limit = platform.eval_batch_limit() if limit is None else limit
    memory, _ = platform.memory_limit()
    per_window = 4 * cfg.block_size * (cfg.vocab_size + 16 * cfg.n_layer * cfg.n_embd)
    fits = max(1, int((memory or 2**30) * EVAL_MEMORY_FRACTION) // per_window) * devices
    size = max(1, min(limit, fits, n_windows))
    return -(-size // devices) * devices


def score(nll: Callable, params: nnx.State, tokens: np.ndarray, block_size: int, batch_size: int,
          to_device: Callable[[np.ndarray], Any] = jnp.asarray, progress: Callable[[int], None] | None = None
          ) -> tuple[float, int]:
    """(total nats, scored tokens) of `tokens` under the model. Batches are dispatched without
    waiting; their sums are fetched once at the end and added in float64."""
    if len(tokens) < 2:
        raise UserError(f"the text holds {len(tokens)} token(s); evaluation needs at least 2")
    sums = []
    for x, y, mask in eval_batches(tokens, block_size, batch_size):
        sums.append(nll(params, to_device(x), to_device(y), to_device(mask)))
        if progress is not None:
            progress(int(mask.any(axis=1).sum()))
    fetched = jax.device_get(sums)
    return float(sum(np.float64(s) for s, _ in fetched)), int(sum(int(c) for _, c in fetched))


def text_bytes(tokens: np.ndarray, tokenizer: Any | None) -> int:
    """UTF-8 bytes of the scored text tokens[1:]: one per token for bytes, the decoded text's otherwise."""
    if tokenizer is None or getattr(tokenizer, "name", "bytes") == "bytes":
        return len(tokens) - 1
    return len(tokenizer.decode(np.asarray(tokens[1:])).encode("utf-8"))


def split_scorer(tokens: np.ndarray, n_bytes: int | None, graphdef: nnx.GraphDef, cfg: Any, compute_dtype: Any, *,
                 to_device: Callable[[np.ndarray], Any] = jnp.asarray, devices: int = 1,
                 tokenizer: Any | None = None) -> Callable[[nnx.State], EvalResult]:
    """A function scoring all of `tokens` (a prepared split, or its first --val_tokens) for given parameters:
    the windows, the compiled program and the byte count (`n_bytes`, else counted from the tokens) are made once."""
    nll = make_nll(graphdef, compute_dtype)
    size = batch_size_for(cfg, num_windows(len(tokens), cfg.block_size), devices)
    n_bytes = text_bytes(tokens, tokenizer) if n_bytes is None else n_bytes

    def run(params: nnx.State) -> EvalResult:
        total, count = score(nll, params, tokens, cfg.block_size, size, to_device)
        return EvalResult(total / count, count, n_bytes)
    return run
