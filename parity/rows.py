"""What every parity check shares, without torch: the Result row, the max |diff| measure, a
jitted jaxgpt forward and a synthetic corpus. (parity/checks.py holds the checks themselves.)"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.model import GPT


@dataclass(frozen=True)
class Result:
    check: str
    case: str
    value: float  # the measured figure, usually max |diff|
    tolerance: float

    @property
    def passed(self) -> bool:
        return bool(self.value <= self.tolerance)  # NaN fails


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def logits_diff(ours, theirs) -> float:
    """max|diff| / max(1, max|theirs|): a trained model's logits reach +-20, where 1e-5 absolute is a
    few fp32 ulps and summation order alone exceeds it; at scales up to 1 this is max|diff|."""
    theirs = np.asarray(theirs, np.float64)
    return max_diff(ours, theirs) / max(1.0, float(np.max(np.abs(theirs))))


@partial(jax.jit, static_argnums=0)
def jit_forward(graphdef: nnx.GraphDef, state: nnx.State, idx: jax.Array) -> jax.Array:
    return nnx.merge(graphdef, state)(idx)


def jax_logits(model: GPT, idx: np.ndarray) -> np.ndarray:
    """Jitted forward (checks call it many times with one shape)."""
    model.check_input(idx)
    return np.asarray(jit_forward(*nnx.split(model), jnp.asarray(idx, jnp.int32)))


def synthetic_corpus(n_bytes: int, seed: int = 0) -> np.ndarray:
    """Word-like text from a fixed generator: structured enough for losses to fall quickly."""
    rng = np.random.default_rng(seed)
    words = ["the", "king", "queen", "of", "and", "to", "my", "lord", "thou", "art", "thee", "\n", "what", "is"]
    text = " ".join(rng.choice(words, size=n_bytes // 3))
    return np.frombuffer(text.encode()[:n_bytes], np.uint8).astype(np.int64)
