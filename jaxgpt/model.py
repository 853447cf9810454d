"""The GPT model in Flax NNX — the whole model, top to bottom.

It mirrors torchref/model.py class for class and attribute for attribute (nanoGPT's names),
so formats/table.py is a short table. One deliberate difference: the n_layer Blocks are
created *stacked* (every parameter gets a leading layer axis) and run with `lax.scan`,
which compiles one block body instead of n_layer copies — faster compiles everywhere and
a faster step on CPU — and lets `jax.checkpoint` wrap that body with a named policy.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError

# What the backward pass may keep from the forward pass of each block.
REMAT_POLICIES = {
    "none": None,  # no jax.checkpoint at all: keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_saveable,  # keep matmul outputs, recompute the rest
}

# GELU written with erf like torch: jax.nn.gelu(approximate=False) goes through erfc, whose
# XLA:CPU expansion made the train step 4% slower; the two agree to float32 rounding.
_SQRT_HALF = 1 / math.sqrt(2)

ATTENTION_KERNELS = ("xla", "cudnn")  # for dropout-free attention; jaxgpt.platform picks one per backend

KVCache = tuple[jax.Array, jax.Array]  # (k, v), each (n_layer, B, n_head, block_size, head_dim)
LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # (k, v, index of the layer being run)


def _linear(d_in: int, d_out: int, std: float, cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias, kernel_init=nnx.initializers.normal(std),
                      bias_init=nnx.initializers.zeros, rngs=rngs)


def _flat(f, x: jax.Array) -> jax.Array:
    """Apply a matmul to (..., C) as a 2-D (tokens, C) matmul. Measured on XLA:CPU: the
    backward of a 3-D dot contracts over two axes (B, T) and ran the step ~1.35x slower."""
    return f(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


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


def attention_path(dropout_active: bool, kernel: str) -> str:
    """How a training or inference forward computes attention: 'explicit' (softmax written out)
    when attention dropout is active, since jax.nn.dot_product_attention has no dropout and the
    seed config drops attention weights like nanoGPT; otherwise the fused op with `kernel`
    ('xla', or 'cudnn' = cuDNN flash attention on GPU). tests/test_export.py asserts which path
    each config takes in the programs exported for cuda."""
    return "explicit" if dropout_active else kernel


def _layernorm(cfg: GPTConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # two-pass variance like torch, so fp32 logits match torchref to ~1e-6
    return nnx.LayerNorm(cfg.n_embd, epsilon=cfg.layer_norm_epsilon, use_bias=cfg.bias, use_fast_variance=False,
                         rngs=rngs)


def gelu(h: jax.Array, activation: str) -> jax.Array:
    if activation == "gelu_tanh":  # GPT-2's gelu_new: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
        return jax.nn.gelu(h, approximate=True)
    return 0.5 * h * (1.0 + jax.lax.erf(h * _SQRT_HALF))  # exact GELU, as torch's nn.GELU(); see _SQRT_HALF


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, attention: str = "xla"):
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: scale the residual projections
        self.c_attn = _linear(cfg.n_embd, 3 * cfg.n_embd, 0.02, cfg, rngs)  # q, k, v in one matmul
        self.c_proj = _linear(cfg.n_embd, cfg.n_embd, resid_std, cfg, rngs)
        self.attn_dropout = nnx.Dropout(cfg.dropout)
        self.resid_dropout = nnx.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.attention = attention  # static: the fused kernel, see attention_path

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, cache: LayerCache | None = None,
                 pos: jax.Array | int = 0) -> tuple[jax.Array, LayerCache | None]:
        """x (B, T, C) -> (y (B, T, C), cache). With a cache (the stacked k, v of all layers
        and this layer's index) the T new tokens sit at absolute positions pos..pos+T-1."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = jnp.split(_flat(self.c_attn, x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, D) for t in (q, k, v))  # (B, T, H, D), dot_product_attention's layout
        key_attn, key_resid = jax.random.split(key) if key is not None else (None, None)
        if cache is not None:
            # The cache is head-major (B, H, S, D), the layout of the attention matmuls, and is
            # written in place in the stacked array: a (B, S, H, D) cache cost a transpose of
            # every layer's k/v per token, 70% of decode time on CPU.
            k_all, v_all, layer = cache
            kh, vh = (t.transpose(0, 2, 1, 3).astype(k_all.dtype)[None] for t in (k, v))  # (1, B, H, T, D)
            k_all = jax.lax.dynamic_update_slice(k_all, kh, (layer, 0, 0, pos, 0))
            v_all = jax.lax.dynamic_update_slice(v_all, vh, (layer, 0, 0, pos, 0))
            cache = (k_all, v_all, layer)
            visible = jnp.arange(k_all.shape[3])[None, :] <= (pos + jnp.arange(T))[:, None]  # (T, S)
            att = jnp.einsum("bthd,bhsd->bhts", q, k_all[layer]) / math.sqrt(D)
            att = jax.nn.softmax(jnp.where(visible, att, -jnp.inf), axis=-1)
            y = jnp.einsum("bhts,bhsd->bthd", att.astype(q.dtype), v_all[layer])
        elif (path := attention_path(not self.attn_dropout.deterministic and self.attn_dropout.rate > 0,
                                     self.attention)) != "explicit":
            y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=path)
        else:
            att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
            att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -jnp.inf)
            att = self.attn_dropout(jax.nn.softmax(att, axis=-1), rngs=key_attn)
            y = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        return self.resid_dropout(_flat(self.c_proj, y.reshape(B, T, C)), rngs=key_resid), cache

    def last(self, x: jax.Array) -> jax.Array:
        """Attention output (B, 1, C) of the last position only; every position's keys and
        values still enter (inference, no dropout)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = jnp.split(_flat(self.c_attn, x), 3, axis=-1)
        q, k, v = q[:, -1:].reshape(B, 1, H, D), k.reshape(B, T, H, D), v.reshape(B, T, H, D)
        y = jax.nn.dot_product_attention(q, k, v)  # the last query sees every key: no mask
        return _flat(self.c_proj, y.reshape(B, 1, C))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = _linear(cfg.n_embd, 4 * cfg.n_embd, 0.02, cfg, rngs)
        self.c_proj = _linear(4 * cfg.n_embd, cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), cfg, rngs)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h = gelu(_flat(self.c_fc, x), self.activation)
        return self.dropout(_flat(self.c_proj, h), rngs=key)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, attention: str = "xla"):
        self.ln_1 = _layernorm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs, attention=attention)
        self.ln_2 = _layernorm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, cache: LayerCache | None = None,
                 pos: jax.Array | int = 0) -> tuple[jax.Array, LayerCache | None]:
        key_attn, key_mlp = jax.random.split(key) if key is not None else (None, None)
        a, cache = self.attn(self.ln_1(x), key=key_attn, cache=cache, pos=pos)
        x = x + a
        x = x + self.mlp(self.ln_2(x), key=key_mlp)
        return x, cache

    def last(self, x: jax.Array) -> jax.Array:
        """The block's output (B, 1, C) at the last position of x (B, T, C) only."""
        h = x[:, -1:] + self.attn.last(self.ln_1(x))
        return h + self.mlp(self.ln_2(h))


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, remat: str = "none", attention: str = "xla"):
        if remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
        if attention not in ATTENTION_KERNELS:
            raise UserError(f"attention must be one of {ATTENTION_KERNELS}, got {attention!r}")
        self.config = cfg
        self.remat = remat  # static: changing it changes the compiled program, not the math
        init = nnx.initializers.normal(0.02)
        self.wte = nnx.Embed(cfg.vocab_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        self.wpe = nnx.Embed(cfg.block_size, cfg.n_embd, embedding_init=init, rngs=rngs)
        self.drop = nnx.Dropout(cfg.dropout)

        @nnx.split_rngs(splits=cfg.n_layer)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rngs=rngs, attention=attention)

        self.h = make_blocks(rngs)  # one Block whose parameters have a leading n_layer axis
        self.ln_f = _layernorm(cfg, rngs)
        # lm_head is tied to wte: logits = x @ wte.T (see the end of _forward), as in nanoGPT

    def __call__(self, idx: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        """idx int (B, T), T <= block_size -> logits float (B, T, vocab_size).
        `key` feeds dropout and is required in train mode when dropout > 0."""
        return self._forward(idx, key=key)[0]

    def decode(self, idx: jax.Array, cache: KVCache, pos: jax.Array | int) -> tuple[jax.Array, KVCache]:
        """Cached forward for generation: the T tokens of idx are written into `cache` (from
        init_cache) at positions pos..pos+T-1 and attend to everything before them. One call
        with the prompt is the prefill; then one call per new token. pos + T <= block_size."""
        return self._forward(idx, cache=cache, pos=pos)

    def last_logits(self, idx: jax.Array) -> jax.Array:
        """Logits (B, vocab_size) of the last position of idx (B, T) — what sampling past
        block_size needs. Layers 0..L-2 run over every position (their outputs are the last
        layer's keys and values); the last layer's MLP, ln_f and the head run for one position."""
        self.check_input(idx)
        T = idx.shape[1]
        dtype = self.wte.embedding.dtype
        x = (self.wte(idx) + self.wpe(jnp.arange(T))).astype(dtype)
        graphdef, stacked = nnx.split(self.h)
        below, top = jax.tree.map(lambda a: a[:-1], stacked), jax.tree.map(lambda a: a[-1], stacked)

        def block(x: jax.Array, state: nnx.State) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, state)(x)[0], None

        x, _ = jax.lax.scan(block, x, below)
        x = self.ln_f(nnx.merge(graphdef, top).last(x))[:, 0]
        return x @ self.wte.embedding[...].T

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
        # The compute dtype is the weights' (train.loss_fn casts float32 master weights to bf16).
        # nnx.Embed returns its construction dtype (float32) whatever it holds, so cast back.
        dtype = self.wte.embedding.dtype
        x = _add_positions(self.wte(idx), self.wpe(pos + jnp.arange(T))).astype(dtype)  # (B, T, C)
        x = self.drop(x, rngs=key_drop)
        graphdef, stacked = nnx.split(self.h)

        def block(carry: tuple, layer: tuple) -> tuple[tuple, None]:
            x, cache = carry
            state, layer_key, i = layer
            layer_cache = None if cache is None else (*cache, i)
            x, layer_cache = nnx.merge(graphdef, state)(x, key=layer_key, cache=layer_cache, pos=pos)
            return (x, None if layer_cache is None else layer_cache[:2]), None

        # Without remat the layer loop is unrolled (straight-line code: 1.2x faster step on XLA:CPU
        # than a loop that stacks every layer's residuals); with remat it stays a loop, since an
        # unrolled body lets XLA hoist the recomputation and save no memory.
        unroll = self.remat == "none"
        if not unroll:
            block = jax.checkpoint(block, policy=REMAT_POLICIES[self.remat], prevent_cse=False)  # safe in a scan
        (x, cache), _ = jax.lax.scan(block, (x, cache), (stacked, layer_keys, jnp.arange(cfg.n_layer)), unroll=unroll)
        x = self.ln_f(x)
        head = self.wte.embedding[...]  # (vocab_size, C); Embed.attend would promote to float32 too
        return _flat(lambda h: h @ head.T, x), cache  # (B, T, vocab_size)

    def init_cache(self, batch_size: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
        """Zeroed k/v cache for `batch_size` sequences of up to block_size tokens."""
        cfg = self.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.head_dim)
        return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)

    def check_input(self, idx: jax.Array) -> None:
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
        """Parameter count as nanoGPT reports it: tied lm_head counted once, and by default
        without the position embeddings."""
        n = sum(p.size for p in jax.tree.leaves(nnx.state(self, nnx.Param)))
        return n - self.config.block_size * self.config.n_embd if non_embedding else n


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
