"""Generation: a prefill of the prompt into a KV cache, then one token per step inside a
jitted `lax.scan` of CHUNK steps, called as often as needed — compiled once per (batch, prompt
bucket, chunk, sampling params), with memory independent of the number of new tokens.

Sampling is inverse-CDF on uniform draws over temperature-scaled, top-k/top-p filtered
probabilities. The draws can be passed in, which is how parity proves torchref picks the
same tokens; everyday use draws them from a jax key.

Past block_size the model sees only the last block_size tokens, exactly like nanoGPT's
crop. With learned absolute position embeddings every cached key is then stale (each token
moves to a new position), so those steps run the window again — all layers but the last over
every position, the last layer, ln_f and the head for the newest position only (GPT.last_logits).
RoPE models do the same by default. They can also decode with a rolling KV cache
(past_context="slide", layers.CausalSelfAttention._cached): every step stays a cached step, but
the result is sliding-window attention over the whole text, not the crop — a cached key of layer
l > 0 was computed when its token still saw the tokens that have since left the window. With one
layer the two agree; with more they differ (tests/test_sample.py shows both), so it is opt-in.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.sharding import abstract


@dataclass(frozen=True)
class Program:
    """A jitted function with its arguments (arrays or ShapeDtypeStructs carrying their shardings). The
    run, the planner (jaxgpt.plan.aot) and the export (jaxgpt.plan.export) take their programs from one
    builder each (abstract_chunk; jaxgpt.serve.engine.programs), so the program planned is the one run."""

    fn: Any  # a jax.jit-wrapped function
    args: tuple
    kwargs: dict = field(default_factory=dict)

    def lower(self) -> Any:
        return self.fn.lower(*self.args, **self.kwargs)

    def compile(self) -> Any:
        """The compiled executable; call it with the dynamic arguments only (static ones are baked in)."""
        return self.lower().compile()

    def export(self, platforms: tuple[str, ...], disabled_checks: tuple = ()) -> Any:
        from jax import export
        return export.export(self.fn, platforms=platforms, disabled_checks=list(disabled_checks))(*self.args, **self.kwargs)


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


def kth_largest(x: jax.Array, k: jax.Array) -> jax.Array:
    """(B, V) values, (B,) k in [1, V] -> (B, 1): each row's k-th largest value, exactly (the value a
    descending sort puts at k - 1), k differing per row. A bisection over the values' order-preserving
    integer keys: 32 rounds of counting, one pass over the batch for every row's k, where a full sort
    per row (or lax.top_k, which needs one static k) cost 6x more here."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    key = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))  # float order == unsigned order
    k = k.astype(jnp.uint32)[:, None]

    def halve(_: int, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        lo, hi = bounds  # the answer's key is in [lo, hi]: the largest t with count(key >= t) >= k
        mid = lo + ((hi - lo) >> 1) + ((hi - lo) & 1)
        ok = jnp.sum(key >= mid, axis=-1, keepdims=True, dtype=jnp.uint32) >= k
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
    lo = jnp.zeros_like(k)
    lo, _ = jax.lax.fori_loop(0, 32, halve, (lo, jnp.full_like(k, 0xFFFFFFFF)))
    return jnp.max(jnp.where(key == lo, x, -jnp.inf), axis=-1, keepdims=True)


def pick_rows(logits: jax.Array, u: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array) -> jax.Array:
    """pick() with parameters per row, (B,) arrays: the server's slots each sample with their own
    settings inside one batch. Row by row it gives pick()'s tokens for that row's values
    (top_k = vocab size and top_p = 1 turn those filters off, temperature 0 is greedy)."""
    V = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def top_k_filter(scaled: jax.Array) -> jax.Array:
        kth = kth_largest(scaled, jnp.clip(top_k, 1, V))
        return jnp.where((top_k < V)[:, None] & (scaled < kth), -jnp.inf, scaled)

    def top_p_filter(probs: jax.Array) -> jax.Array:
        order = jnp.argsort(-probs, axis=-1, stable=True)
        sorted_p = jnp.take_along_axis(probs, order, axis=-1)
        drop_sorted = (jnp.cumsum(sorted_p, axis=-1) - sorted_p) >= top_p[:, None]
        drop = jnp.zeros_like(drop_sorted).at[jnp.arange(probs.shape[0])[:, None], order].set(drop_sorted)
        return jnp.where((top_p < 1.0)[:, None] & drop, 0.0, probs)

    # each filter's work runs only when some row of the batch asks for it (the sort of top-p above all)
    scaled = jax.lax.cond(jnp.any(top_k < V), top_k_filter, lambda s: s, scaled)
    probs = jax.nn.softmax(scaled, axis=-1)
    probs = jax.lax.cond(jnp.any(top_p < 1.0), top_p_filter, lambda p: p, probs)
    cdf = jnp.cumsum(probs, axis=-1)
    token = jnp.minimum(jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1), V - 1).astype(jnp.int32)
    return jnp.where(temperature > 0, token, greedy)


CHUNK = 128  # tokens per compiled call: memory stays flat however many tokens are asked for
MIN_BUCKET = 16  # prompt lengths are padded to powers of two from here up to block_size

Carry = tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array]]  # (context window, its length, KV cache)


def prompt_bucket(length: int, block_size: int) -> int:
    """Padded prefill length for a prompt of `length` tokens: compiled programs are shared by
    every prompt of a bucket. 0 for a prompt longer than the context (it runs windowed)."""
    if length == 0 or length > block_size:
        return 0
    return min(block_size, max(MIN_BUCKET, 1 << (length - 1).bit_length()))


@partial(jax.jit, static_argnames=("graphdef", "bucket"))
def _start(graphdef: nnx.GraphDef, state: nnx.State, ctx: jax.Array, n: jax.Array, bucket: int) -> Carry:
    """Prefill the KV cache with the first `bucket` positions of the context window. Positions
    past the prompt hold padding; each is overwritten before any query can see it."""
    model = nnx.merge(graphdef, state)
    cache = model.init_cache(ctx.shape[0], state_dtype(state))
    if bucket:
        _, cache = model.decode(ctx[:, :bucket], cache, 0)  # logits unused: XLA drops the head
    return ctx, n, cache


def chunk_mode(length: int, steps: int, block_size: int, rolling: bool = False) -> str:
    """Which program a chunk of `steps` tokens runs when the context holds `length` tokens:
    'cache' (every step inside the context, or any step with a rolling RoPE cache), 'window'
    (every step past it), or 'mixed' (the one chunk that crosses block_size: cached steps, then
    windowed ones). A runtime branch in each step instead (lax.cond) made XLA:CPU copy the whole
    KV cache per token."""
    if rolling or length + steps - 1 <= block_size:
        return "cache"
    return "window" if length > block_size else "mixed"


@partial(jax.jit, static_argnames=("graphdef", "temperature", "top_k", "top_p", "on_token", "return_logits", "mode"),
         donate_argnames=("carry",))
def chunk_program(graphdef: nnx.GraphDef, state: nnx.State, carry: Carry, uniforms: jax.Array, j0: jax.Array,
           limit: jax.Array, *, temperature: float, top_k: int | None, top_p: float, on_token: Callable | None,
           return_logits: bool, mode: str) -> tuple[Carry, jax.Array, jax.Array | None]:
    """uniforms.shape[0] more tokens for every sequence (the first `limit` of them wanted).
    Inside the context each step feeds the newest token through the KV cache; past it, the
    window of the last block_size tokens is run again (exact crop, absolute positions) with the
    work only the next token needs, and only for wanted tokens (such a step is a full forward)."""
    model = nnx.merge(graphdef, state)
    bs = model.config.block_size

    def step(carry: Carry, xs: tuple[jax.Array, jax.Array], cached: bool) -> tuple[Carry, tuple]:
        ctx, n, cache = carry
        u, j = xs
        if cached:  # the token at position n - 1 (the window's newest) attends to the cache
            newest = jax.lax.dynamic_slice_in_dim(ctx, jnp.minimum(n, bs) - 1, 1, axis=1)
            logits, cache = model.decode(newest, cache, n - 1)
            logits = logits[:, 0]
        else:
            logits = model.last_logits(ctx)
        tok = pick(logits, u, temperature, top_k, top_p)
        if on_token is not None:
            jax.debug.callback(on_token, tok, j, ordered=True)
        grown = jax.lax.dynamic_update_slice_in_dim(ctx, tok[:, None], jnp.minimum(n, bs - 1), axis=1)
        ctx = jnp.where(n < bs, grown, jnp.concatenate([ctx[:, 1:], tok[:, None]], axis=1))
        return (ctx, n + 1, cache), (tok, logits if return_logits else None)

    steps = jnp.arange(uniforms.shape[0]) + j0
    if mode == "cache":  # cheap steps: a fixed-length scan, surplus steps included
        carry, (tokens, logits) = jax.lax.scan(partial(step, cached=True), carry, (uniforms, steps))
        return carry, tokens.T, logits
    # Past block_size (from step k on; k is known at run time) loops stop at `limit`.
    count, B, V = uniforms.shape[0], uniforms.shape[1], model.config.vocab_size
    out = (jnp.zeros((count, B), jnp.int32), jnp.zeros((count, B, V), state_dtype(state)) if return_logits else None)

    def body(cached: bool) -> Callable:
        def run(i: jax.Array, loop: tuple) -> tuple:
            carry, (toks, lgs) = loop
            carry, (tok, lg) = step(carry, (uniforms[i], steps[i]), cached)
            toks = toks.at[i].set(tok)
            return carry, (toks, None if lg is None else lgs.at[i].set(lg))
        return run

    k = jnp.minimum(bs + 1 - carry[1], limit) if mode == "mixed" else jnp.int32(0)
    if mode == "mixed":
        carry, out = jax.lax.fori_loop(0, k, body(True), (carry, out))
    carry, (tokens, logits) = jax.lax.fori_loop(k, limit, body(False), (carry, out))
    return carry, tokens.T, logits


@partial(jax.jit, static_argnames=("batch", "count"))
def _draws(key: jax.Array, j0: jax.Array, batch: int, count: int) -> jax.Array:
    """Uniforms for new tokens j0 .. j0+count-1, token j's from fold_in(key, j): the same draws
    whatever the chunk size."""
    return jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j), (batch,)))(j0 + jnp.arange(count))


def abstract_chunk(model_cfg: GPTConfig, batch: int = 1, *, dtype: Any = jnp.float32, steps: int = CHUNK,
                   sharding: Any = None, temperature: float = 0.8, top_k: int | None = 200, top_p: float = 1.0,
                   mode: str = "mixed") -> Program:
    """generate.py's chunk program (chunk_program) over abstract inputs: `batch` sequences, weights and KV
    cache in `dtype`, `steps` tokens, the given sampling, no per-token callback (as it runs on GPU/TPU,
    streams_by_callback), every input on `sharding` (None: unplaced, for jax.export). 'mixed', the chunk
    that crosses block_size (cached steps, then windowed ones), holds both kinds of step."""
    model = nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0)))
    model.eval()
    graphdef, params = nnx.split(model)
    params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, dtype), params)
    cache = jax.eval_shape(lambda: model.init_cache(batch, dtype))
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    carry = (jax.ShapeDtypeStruct((batch, model_cfg.block_size), jnp.int32), i32, cache)
    uniforms = jax.ShapeDtypeStruct((steps, batch), jnp.float32)
    top_k = None if top_k is None else min(top_k, model_cfg.vocab_size)
    return Program(chunk_program, (graphdef, *abstract((params, carry, uniforms, i32, i32), sharding)),
                   dict(temperature=temperature, top_k=top_k, top_p=top_p, on_token=None, return_logits=False, mode=mode))


def state_dtype(state: nnx.State) -> jnp.dtype:
    return jax.tree.leaves(state)[0].dtype


PAST_CONTEXT = ("crop", "slide")  # past block_size: nanoGPT's exact crop, or a rolling cache (RoPE only)


def generate_chunks(model: GPT, prompt: np.ndarray | jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
                    top_k: int | None = None, top_p: float = 1.0, key: jax.Array | None = None,
                    uniforms: np.ndarray | jax.Array | None = None, on_token: Callable[[np.ndarray], None] | None = None,
                    return_logits: bool = False, chunk: int = CHUNK,
                    past_context: str = "crop") -> Iterator[np.ndarray | tuple[np.ndarray, np.ndarray]]:
    """Continue `prompt` (B, P) int, yielding the new tokens as (B, k) arrays, k <= chunk, in
    order until max_new_tokens; only the last block_size tokens are ever held, so memory does
    not grow with max_new_tokens.

    Draws come from `uniforms` (max_new_tokens, B) if given, else from `key` (token j uses
    fold_in(key, j)). `on_token(tokens (B,))` is called as each token is produced (streaming).
    With return_logits, yields (tokens, logits (k, B, V)) pairs: the logits each token was drawn from.
    past_context: 'crop' (nanoGPT: the model sees exactly the last block_size tokens) or, for RoPE
    models, 'slide' (a rolling cache: sliding-window attention, no recomputation; see the module doc)."""
    prompt = np.asarray(prompt)
    if prompt.ndim != 2:
        raise UserError(f"prompt must be a (batch, length) array, got shape {prompt.shape}")
    B, P = prompt.shape
    check_sampling(temperature, top_k, top_p, model.config.vocab_size, B)
    if max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {max_new_tokens}")
    if P == 0:
        raise UserError(f"prompt must hold at least one token, got shape {prompt.shape}")
    if uniforms is not None and np.shape(uniforms) != (max_new_tokens, B):
        raise UserError(f"uniforms must have shape {(max_new_tokens, B)}, got {np.shape(uniforms)}")
    bs = model.config.block_size
    if past_context not in PAST_CONTEXT:
        raise UserError(f"--past_context must be one of {PAST_CONTEXT}, got {past_context!r}")
    rolling = past_context == "slide"
    if rolling and model.config.pos_embedding != "rope":
        raise UserError("--past_context=slide needs a RoPE model (pos_embedding=rope): learned positions cannot roll")
    model.eval()
    model.check_input(prompt[:, -bs:])
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    chunk = min(chunk, 1 << (max_new_tokens - 1).bit_length())  # short requests compile short loops
    ctx = np.zeros((B, bs), np.int32)
    ctx[:, :min(P, bs)] = prompt[:, -bs:]
    # an overlong prompt is cropped; a rolling cache prefills its window as positions 0.. (only differences count)
    n = min(P, bs) if rolling else P
    carry = _start(graphdef, state, jnp.asarray(ctx), jnp.int32(n), prompt_bucket(n - 1, bs) if n <= bs else 0)
    callback = None
    if on_token is not None:
        def callback(tok: np.ndarray, j: np.ndarray) -> None:  # the last chunk's extra tokens are not emitted
            if int(j) < max_new_tokens:
                on_token(tok)
    for j0 in range(0, max_new_tokens, chunk):
        if uniforms is None:
            u = _draws(key, jnp.int32(j0), B, chunk)
        else:
            u = np.zeros((chunk, B), np.float32)
            part = np.asarray(uniforms, np.float32)[j0:j0 + chunk]
            u[:len(part)] = part
        keep = min(chunk, max_new_tokens - j0)
        carry, tokens, logits = chunk_program(graphdef, state, carry, jnp.asarray(u), jnp.int32(j0), jnp.int32(keep),
                                       temperature=float(temperature), top_k=top_k, top_p=float(top_p),
                                       on_token=callback, return_logits=return_logits,
                                       mode=chunk_mode(P + j0, chunk, bs, rolling))
        tokens = np.asarray(tokens)[:, :keep]
        yield (tokens, np.asarray(logits)[:keep]) if return_logits else tokens


def generate(model: GPT, prompt: np.ndarray | jax.Array, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, key: jax.Array | None = None,
             uniforms: np.ndarray | jax.Array | None = None, on_token: Callable[[np.ndarray], None] | None = None,
             return_logits: bool = False, past_context: str = "crop") -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """`prompt` (B, P) continued by max_new_tokens tokens -> (B, P + max_new_tokens), held in
    memory (use generate_chunks for unbounded lengths). Arguments as generate_chunks; with
    return_logits also returns the (max_new_tokens, B, V) logits each token was drawn from."""
    parts = list(generate_chunks(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                 key=key, uniforms=uniforms, on_token=on_token, return_logits=return_logits,
                                 past_context=past_context))
    tokens = np.concatenate([np.asarray(prompt, np.int64)] + [p[0] if return_logits else p for p in parts], axis=1)
    return (tokens, np.concatenate([p[1] for p in parts])) if return_logits else tokens
