"""The GPT model in Flax NNX: embeddings, the stack of blocks, the head, and cached decoding.

The layers (attention, MLP, block, and each switch of the modern recipe) are in jaxgpt/layers.py.
Both files mirror torchref/ class for class and attribute for attribute (nanoGPT's names),
so formats/table.py is a short table. One deliberate difference: the n_layer Blocks are
created *stacked* (every parameter gets a leading layer axis) and run with `lax.scan`,
which compiles one block body instead of n_layer copies — faster compiles everywhere and
a faster step on CPU — and lets `jax.checkpoint` wrap that body with a named policy.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import ATTENTION_KERNELS, GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.layers import MATMULS, Block, ValueEmbeds, bf16_matmul, flat_matmul, linear, norm, row_major

# What the backward pass may keep from the forward pass of each block.
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint at all: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}

KVCache = tuple[jax.Array, jax.Array]  # (k, v), each (n_layer, B, n_head, block_size, head_dim)


@jax.custom_vjp
def _add_positions(tok: jax.Array, pos: jax.Array) -> jax.Array:
    """tok (B, T, C) + pos (T, C). Its backward sums the residual stream's gradient over the
    batch for wpe; left to itself, XLA:CPU fused every layer's residual-gradient additions into
    that reduction (one loop fusion, 8% of the CPU preset's step without remat): the barrier
    makes it a plain reduction of the finished gradient."""
    return tok + pos


def _add_positions_fwd(tok: jax.Array, pos: jax.Array) -> tuple[jax.Array, None]:
    return tok + pos, None


def _add_positions_bwd(_: None, g: jax.Array) -> tuple[jax.Array, jax.Array]:
    g = jax.lax.optimization_barrier(g)
    return g, g.sum(axis=0)


_add_positions.defvjp(_add_positions_fwd, _add_positions_bwd)


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, remat: str = "none", attention: str = "xla",
                 matmul: str = "float32"):
        if remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
        if attention not in ATTENTION_KERNELS:
            raise UserError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        if matmul not in MATMULS:
            raise UserError(f"matmul must be one of {MATMULS}, got {matmul!r}")
        self.config = cfg
        self.remat = remat  # static: changing it changes the compiled program, not the math
        self.matmul = matmul  # static: the linear layers' products in float32 compute (layers.bf16_matmul)
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        learned = cfg.pos_embedding == "learned"  # else RoPE inside attention (layers.rope)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=init, rngs=rngs) if learned else None
        self.ve = ValueEmbeds(cfg, rngs) if cfg.value_embeds else None
        self.drop = nnx.Dropout(cfg.dropout)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs, attention=attention, matmul=matmul)

        self.h = make_blocks(rngs)  # one Block whose parameters have a leading n_layer axis
        self.ln_f = norm(cfg, cfg.n_embd, rngs)
        # nanoGPT ties lm_head to wte (logits = x @ wte.T, see _head); untied it is its own matrix
        self.lm_head = None if cfg.tie_embeddings else \
            linear(cfg.n_embd, cfg.vocab_size, 0.02, cfg, rngs, zero=cfg.zero_init_proj, matmul=matmul, use_bias=False)

    def __call__(self, idx: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """idx int (B, T), T <= block_size -> logits float (B, T, vocab_size).
        `key` feeds dropout and is required in train mode when dropout > 0."""
        return self._forward(idx, key=key)[0]

    def decode(self, idx: jax.Array, cache: KVCache, pos: jax.Array | int) -> tuple[jax.Array, KVCache]:
        """Cached forward for generation: the T tokens of idx are written into `cache` (from
        init_cache) at positions pos..pos+T-1 and attend to everything before them. One call
        with the prompt is the prefill; then one call per new token. pos + T <= block_size.
        pos may also be (B,), one position per sequence, for one token each (learned positions).
        (RoPE: any pos; the cache rolls, see layers.CausalSelfAttention._cached)."""
        logits, cache_out = self._forward(idx, cache=cache, pos=pos)
        assert cache_out is not None
        return logits, cache_out

    def last_logits(self, idx: jax.Array) -> jax.Array:
        """Logits (B, vocab_size) of the last position of idx (B, T) — what sampling past
        block_size needs. Layers 0..L-2 run over every position (their outputs are the last
        layer's keys and values); the last layer's MLP, ln_f and the head run for one position."""
        self.check_input(idx)
        T = idx.shape[1]
        dtype = self.wte.embedding.dtype
        x = (self.wte(idx) + self.wpe(jnp.arange(T)) if self.wpe is not None else self.wte(idx)).astype(dtype)
        graphdef, stacked = nnx.split(self.h)
        below, top = jax.tree.map(lambda a: a[:-1], stacked), jax.tree.map(lambda a: a[-1], stacked)

        def block(x: jax.Array, layer: tuple) -> tuple[jax.Array, None]:
            state, i = layer
            return nnx.merge(graphdef, state)(x, ve=self._ve(idx, i))[0], None

        x, _ = jax.lax.scan(block, x, (below, jnp.arange(self.config.n_layer - 1)))
        return self._head(self.ln_f(nnx.merge(graphdef, top).last(x, self._ve(idx, self.config.n_layer - 1)))[:, 0])

    def _ve(self, idx: jax.Array, layer: jax.Array | int) -> jax.Array | None:
        """Layer `layer`'s value-embedding rows for idx, or None without value embeddings."""
        return None if self.ve is None else self.ve.rows(idx, layer)

    def _head(self, x: jax.Array) -> jax.Array:
        """(..., C) -> logits (..., vocab_size): the tied wte or lm_head, then the softcap if any."""
        if self.lm_head is None:
            head = self.wte.embedding[...]  # (vocab_size, C); Embed.attend would promote to float32 too
            bf16 = self.matmul == "bfloat16" and x.dtype == head.dtype == jnp.float32
            logits = flat_matmul(lambda h: bf16_matmul(h, row_major(head.T)) if bf16 else h @ head.T, x)
        else:
            logits = flat_matmul(self.lm_head, x)
        cap = self.config.logit_softcap
        return cap * jnp.tanh(logits / cap) if cap else logits

    def _forward(self, idx: jax.Array, *, key: jax.Array | None = None, cache: KVCache | None = None,
                 pos: jax.Array | int = 0) -> tuple[jax.Array, KVCache | None]:
        cfg = self.config
        self.check_input(idx)
        B, T = idx.shape
        layer_keys = key_drop = None
        if key is not None:
            key_drop, key_layers = jax.random.split(key)
            layer_keys = jax.random.split(key_layers, cfg.n_layer)
        elif not self.drop.deterministic and cfg.dropout > 0:
            raise UserError("GPT in train mode with dropout > 0 needs key=...; call model.eval() for inference")
        # The compute dtype is the weights' (step.loss_fn casts float32 master weights to bf16).
        # nnx.Embed returns its construction dtype (float32) whatever it holds, so cast back.
        dtype = self.wte.embedding.dtype
        tok = self.wte(idx)
        per_row = isinstance(pos, jax.Array) and pos.ndim == 1
        positions = (pos[:, None] if per_row else pos) + jnp.arange(T)  # type: ignore[index]  # (T,); (B, T) per row
        x = (_add_positions(tok, self.wpe(positions)) if self.wpe is not None else tok).astype(dtype)  # (B, T, C)
        x = self.drop(x, rngs=key_drop)
        graphdef, stacked = nnx.split(self.h)

        def block(carry: tuple, layer: tuple) -> tuple[tuple, None]:
            x, cache = carry
            state, layer_key, i = layer
            layer_cache = None if cache is None else (*cache, i)
            x, layer_cache = nnx.merge(graphdef, state)(x, key=layer_key, cache=layer_cache, pos=pos, ve=self._ve(idx, i))
            return (x, None if layer_cache is None else layer_cache[:2]), None

        # Without remat the layer loop is unrolled (straight-line code: 1.2x faster step on XLA:CPU
        # than a loop that stacks every layer's residuals); with remat it stays a loop, since an
        # unrolled body lets XLA hoist the recomputation and save no memory.
        unroll = self.remat == "none"
        if not unroll:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)  # safe in a scan
        (x, cache), _ = jax.lax.scan(block, (x, cache), (stacked, layer_keys, jnp.arange(cfg.n_layer)), unroll=unroll)
        return self._head(self.ln_f(x)), cache  # (B, T, vocab_size)

    def init_cache(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """Zeroed k/v cache for `batch_size` sequences of up to block_size tokens."""
        cfg = self.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def check_input(self, idx: jax.Array | np.ndarray) -> None:
        """UserError for a batch the model cannot take: wrong rank, longer than block_size, or
        (when the values are concrete, i.e. outside jit) ids outside the vocabulary."""
        cfg = self.config
        if idx.ndim != 2:
            raise UserError(f"idx must have shape (batch, time), got {idx.shape}")
        if idx.shape[1] > cfg.block_size:
            raise UserError(f"sequence of {idx.shape[1]} tokens exceeds block_size={cfg.block_size}; "
                            f"crop the context to its last {cfg.block_size} tokens")
        if not isinstance(idx, jax.core.Tracer) and idx.size:  # values are only known outside jit
            lo, hi = int(np.min(idx)), int(np.max(idx))
            if lo < 0 or hi >= cfg.vocab_size:
                raise UserError(f"token ids must be in [0, {cfg.vocab_size}), got range [{lo}, {hi}]")

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count as nanoGPT reports it: a tied lm_head counted once, and by default
        without the learned position embeddings."""
        n = sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        return n - self.wpe.embedding.size if non_embedding and self.wpe is not None else n


def crop_block_size(model: GPT, block_size: int) -> GPT:
    """`model` for a shorter context: the first block_size rows of wpe (nanoGPT's crop_block_size),
    e.g. to fine-tune a GPT-2 (1024 positions) at block 256."""
    if not 0 < block_size <= model.config.block_size:
        raise UserError(f"block_size must be in [1, {model.config.block_size}] for this model, got {block_size}")
    cfg = dataclasses.replace(model.config, block_size=block_size)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0), remat=model.remat)))
    old = dict(nnx.to_flat_state(nnx.state(model)))
    cropped = nnx.from_flat_state([(p, v.replace(old[p][...][:block_size] if p == ("wpe", "embedding") else old[p][...]))
                                   for p, v in nnx.to_flat_state(state)])
    return nnx.merge(graphdef, cropped)
