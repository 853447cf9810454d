"""Generation: one prefill of the prompt into a KV cache, then one token per step inside a
jitted `lax.scan` — compiled once per (batch, prompt length, new tokens, sampling params).

Sampling is inverse-CDF on uniform draws over temperature-scaled, top-k/top-p filtered
probabilities. The draws can be passed in, which is how parity proves torchref picks the
same tokens; everyday use draws them from a jax key.

Past block_size the model sees only the last block_size tokens, exactly like nanoGPT's
crop. With learned absolute position embeddings every cached key is then stale (each token
moves to a new position), so those steps run a full forward over the window.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import GPT


def check_sampling(temperature: float, top_k: int | None, top_p: float, vocab_size: int, num_samples: int = 1) -> None:
    """Raise UserError for sampling parameters that cannot work."""
    if not temperature >= 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and not 1 <= top_k <= vocab_size:
        raise UserError(f"--top_k must be in [1, {vocab_size}] (the vocabulary size), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top_p must be in (0, 1], got {top_p}")
    if num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {num_samples}")


def filter_probs(logits: jax.Array, temperature: float, top_k: int | None, top_p: float) -> jax.Array:
    """(B, V) logits -> (B, V) float32 probabilities after temperature, top-k and top-p."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    if top_p < 1.0:
        order = jnp.argsort(-probs, axis=-1, stable=True)
        sorted_p = jnp.take_along_axis(probs, order, axis=-1)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) >= top_p
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(drop_sorted)
        probs = jnp.where(drop, 0.0, probs)
    return probs


def pick(logits: jax.Array, u: jax.Array, temperature: float, top_k: int | None, top_p: float) -> jax.Array:
    """Next tokens (B,) from logits (B, V) and uniforms u (B,) in [0, 1); temperature 0 = argmax."""
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    cdf = jnp.cumsum(filter_probs(logits, temperature, top_k, top_p), axis=-1)
    token = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)  # first index whose cdf exceeds u
    return jnp.minimum(token, logits.shape[-1] - 1).astype(jnp.int32)


@partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p", "on_token", "return_logits"))
def _generate(graphdef: nnx.GraphDef, state: nnx.State, prompt: jax.Array, uniforms: jax.Array, *,
              temperature: float, top_k: int | None, top_p: float, on_token: Callable | None,
              return_logits: bool) -> tuple[jax.Array, jax.Array | None]:
    model = nnx.merge(graphdef, state)
    bs = model.config.block_size
    B, P = prompt.shape
    N = uniforms.shape[0]
    tokens = jnp.concatenate([prompt, jnp.zeros((B, N), jnp.int32)], axis=1)

    def emit(tokens, logits, j):  # sample token P + j from logits, write it, stream it
        tok = pick(logits, uniforms[j], temperature, top_k, top_p)
        if on_token is not None:
            jax.debug.callback(on_token, tok, ordered=True)
        return jax.lax.dynamic_update_slice(tokens, tok[:, None], (0, P + j)), tok, logits

    def windowed(tokens, j):  # context longer than block_size: full forward over the last bs tokens
        window = jax.lax.dynamic_slice(tokens, (0, P + j - bs), (B, bs))
        return emit(tokens, model(window)[:, -1], j)[0::2]

    n_cached = 0
    all_logits = []
    if P <= bs:
        cache = model.init_cache(B, state_dtype(state))
        logits, cache = model.decode(prompt, cache, 0)  # the prefill
        tokens, tok, first = emit(tokens, logits[:, -1], 0)
        all_logits.append(first[None])
        n_cached = max(0, min(N - 1, bs - P))

        def cached(carry, j):  # feed the newest token at position P + j - 1
            tokens, tok, cache = carry
            logits, cache = model.decode(tok[:, None], cache, P + j - 1)
            tokens, tok, logits = emit(tokens, logits[:, 0], j)
            return (tokens, tok, cache), logits

        (tokens, _, _), logits = jax.lax.scan(cached, (tokens, tok, cache), jnp.arange(1, 1 + n_cached))
        all_logits.append(logits)
    start = 1 + n_cached if P <= bs else 0
    if start < N:
        tokens, logits = jax.lax.scan(windowed, tokens, jnp.arange(start, N))
        all_logits.append(logits)
    return tokens, (jnp.concatenate(all_logits) if return_logits else None)


def state_dtype(state: nnx.State) -> jnp.dtype:
    return jax.tree.leaves(state)[0].dtype


def generate(model: GPT, prompt: np.ndarray | jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, key: jax.Array | None = None,
             uniforms: np.ndarray | jax.Array | None = None, on_token: Callable[[np.ndarray], None] | None = None,
             return_logits: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Continue `prompt` (B, P) int by max_new_tokens tokens -> (B, P + max_new_tokens).

    Draws come from `uniforms` (max_new_tokens, B) if given, else from `key`. `on_token` is
    called with each new (B,) token array as it is produced (for streaming). With
    return_logits, also returns the (max_new_tokens, B, V) logits each token was drawn from."""
    prompt = jnp.asarray(prompt, jnp.int32)
    if prompt.ndim != 2:
        raise UserError(f"prompt must be a (batch, length) array, got shape {prompt.shape}")
    check_sampling(temperature, top_k, top_p, model.config.vocab_size, prompt.shape[0])
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if prompt.shape[1] == 0:
        raise UserError(f"prompt must hold at least one token, got shape {prompt.shape}")
    if uniforms is None:
        key = jax.random.key(0) if key is None else key
        uniforms = jax.random.uniform(key, (max_new_tokens, prompt.shape[0]))
    uniforms = jnp.asarray(uniforms, jnp.float32)
    if uniforms.shape != (max_new_tokens, prompt.shape[0]):
        raise UserError(f"uniforms must have shape {(max_new_tokens, prompt.shape[0])}, got {uniforms.shape}")
    model.eval()
    model.check_input(prompt[:, -model.config.block_size:])
    graphdef, state = nnx.split(model)
    tokens, logits = _generate(graphdef, state, prompt, uniforms, temperature=float(temperature),
                               top_k=top_k, top_p=float(top_p), on_token=on_token, return_logits=return_logits)
    tokens = np.asarray(tokens)
    return (tokens, np.asarray(logits)) if return_logits else tokens
