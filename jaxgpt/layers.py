"""The GPT's layers — attention, MLP, block — and the recipe's switches, each in one place.

`norm()` picks the normalisation, `activation()` the MLP's nonlinearity, `rope()` rotates q and k;
each is chosen once from GPTConfig when a module is built, so the forward pass reads the same for
nanoGPT's model and the modern recipe. jaxgpt/model.py assembles these into the GPT;
torchref/layers.py mirrors this file class for class and switch for switch.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import MATMUL_CHOICES, GPTConfig

# GELU written with erf like torch: jax.nn.gelu(approximate=False) goes through erfc, whose
# XLA:CPU expansion made the train step 4% slower; the two agree to float32 rounding.
_SQRT_HALF = 1 / math.sqrt(2)

LayerCache = tuple[jax.Array, jax.Array, jax.Array]  # (k, v, index of the layer being run)


MATMULS = tuple(m for m in MATMUL_CHOICES if m != "auto")  # what GPT takes; jaxgpt.platform resolves auto


def row_major(a: jax.Array) -> jax.Array:
    """The 2-D array `a` (typically a transpose) materialised in row-major order. XLA keeps a transpose
    as a layout where it can, and XLA:CPU's bfloat16 matmul (YNNPACK) takes row-major operands only:
    handed a transposed one, the compiler multiplies in float32 instead (1536 x 512 x 128: 3.4x slower
    on an AMX Xeon). A reshape through another rank behind an optimization barrier is a copy XLA
    cannot fold back into a layout."""
    split = (a.shape[0], -1, 2) if a.shape[-1] % 2 == 0 else (-1,)
    return jax.lax.optimization_barrier(a.reshape(split)).reshape(a.shape)


def _bf16_dot(x: jax.Array, w: jax.Array) -> jax.Array:
    """bf16 (N, K) @ (K, M) summed in float32. XLA:CPU runs it in YNNPACK for row-major operands with
    N, M > 1 and some side >= 8; any other bf16 x bf16 -> f32 dot reaches a kernel that aborts
    ("Unsupported element type for DotThunk"), so those multiply the rounded values in float32: the
    same products, exact in float32."""
    if min(x.shape[0], w.shape[1]) == 1 or max(*x.shape, w.shape[1]) < 8:
        return jnp.dot(x.astype(jnp.float32), w.astype(jnp.float32))
    return jax.lax.dot(x, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def bf16_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x (N, K) @ w (K, M) for float32 x and w, each rounded to bfloat16 and the products summed in
    float32 (float32 out): a TPU's default for float32 matmuls, and 3-4x XLA:CPU's float32 matmul on a
    CPU with AMX. The backward pass multiplies the same way: the output gradient rounded to bfloat16,
    times the rounded operands. torchref.layers.bf16_matmul is the twin."""
    return _bf16_matmul_fwd(x, w)[0]


def _bf16_matmul_fwd(x: jax.Array, w: jax.Array) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    xb, wb = x.astype(jnp.bfloat16), w.astype(jnp.bfloat16)
    return _bf16_dot(xb, wb), (xb, wb)  # the rounded operands are the residuals: half float32's memory


def _bf16_matmul_bwd(res: tuple[jax.Array, jax.Array], g: jax.Array) -> tuple[jax.Array, jax.Array]:
    xb, wb = res
    gb = g.astype(jnp.bfloat16)
    return _bf16_dot(gb, row_major(wb.T)), _bf16_dot(row_major(xb.T), gb)


bf16_matmul.defvjp(_bf16_matmul_fwd, _bf16_matmul_bwd)


def _bf16_dot_general(lhs: jax.Array, rhs: jax.Array, dimension_numbers: Any, precision: Any = None,
                      **kwargs: Any) -> jax.Array:
    """nnx.Linear's dot_general for --matmul_precision=bfloat16: bf16_matmul for the float32 (tokens, C)
    @ (C, out) products of flat_matmul; anything else (bfloat16 compute, other shapes) as lax.dot_general."""
    if lhs.ndim == 2 and lhs.dtype == rhs.dtype == jnp.float32 and dimension_numbers == (((1,), (0,)), ((), ())):
        return bf16_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision, **kwargs)


def linear(d_in: int, d_out: int, std: float, cfg: GPTConfig, rngs: nnx.Rngs, zero: bool = False,
            matmul: str = "float32", use_bias: bool | None = None) -> nnx.Linear:
    init = nnx.initializers.zeros if zero else nnx.initializers.normal(std)
    dot: dict[str, Any] = dict(dot_general=_bf16_dot_general) if matmul == "bfloat16" else {}  # else nnx.Linear's own
    return nnx.Linear(d_in, d_out, use_bias=cfg.bias if use_bias is None else use_bias, kernel_init=init,
                      bias_init=nnx.initializers.zeros, rngs=rngs, **dot)


def flat_matmul(f: Any, x: jax.Array) -> jax.Array:
    """Apply a matmul to (..., C) as a 2-D (tokens, C) matmul. Measured on XLA:CPU: the
    backward of a 3-D dot contracts over two axes (B, T) and ran the step ~1.35x slower."""
    return f(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], -1)


def norm(cfg: GPTConfig, dim: int, rngs: nnx.Rngs) -> nnx.LayerNorm | nnx.RMSNorm:
    """The one normalisation factory: nanoGPT's LayerNorm (bias as cfg.bias) or RMSNorm (scale only)."""
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(dim, epsilon=cfg.layer_norm_epsilon, rngs=rngs)
    # two-pass variance like torch, so fp32 logits match torchref to ~1e-6
    return nnx.LayerNorm(dim, epsilon=cfg.layer_norm_epsilon, use_bias=cfg.bias, use_fast_variance=False, rngs=rngs)


def activation(h: jax.Array, name: str) -> jax.Array:
    """The MLP's nonlinearity by name (GPTConfig.activation)."""
    if name == "relu2":  # ReLU squared (modded-nanogpt)
        return jnp.square(jax.nn.relu(h))
    if name == "gelu_tanh":  # GPT-2's gelu_new: 0.5 h (1 + tanh(sqrt(2/pi) (h + 0.044715 h^3)))
        return jax.nn.gelu(h, approximate=True)
    return 0.5 * h * (1.0 + jax.lax.erf(h * _SQRT_HALF))  # exact GELU, as torch's nn.GELU(); see _SQRT_HALF


@functools.lru_cache(maxsize=16)
def rope_table(n: int, D: int, base: float) -> tuple[np.ndarray, np.ndarray]:
    """cos and sin (n, D/2) of positions 0..n-1 at frequencies base^(-2i/D), computed in float64 on
    the host and rounded to float32 once. As constants of the program they are read, not computed:
    XLA fused the in-graph table into every rotation and took a sine and a cosine per element of q
    and k (~1 ms per rotation at the CPU preset; 11 % of an evaluation forward, BENCHMARKS.md)."""
    inv_freq = 1.0 / base ** (np.arange(0, D, 2, dtype=np.float64) / D)
    angles = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def rope(x: jax.Array, positions: np.ndarray | jax.Array, base: float, axis: int, size: int = 0) -> jax.Array:
    """Rotary position embedding, half-split layout (GPT-NeoX, Gemma): the pairs (x[i], x[i + D/2])
    are rotated by positions * base^(-2i/D). `positions` (N,) run along `axis` of x (..., D): a
    numpy array (rows of rope_table, constants) or a traced one with values below `size` (a gather
    from a table of `size` rows). The rotation is float32 whatever x's dtype, then cast back."""
    D = x.shape[-1]
    if isinstance(positions, np.ndarray):
        cos, sin = (t[positions] for t in rope_table(int(positions.max()) + 1, D, base))
    else:
        cos, sin = (jnp.asarray(t)[positions] for t in rope_table(size, D, base))
    shape = [1] * x.ndim
    shape[axis], shape[-1] = cos.shape
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _attend(q: jax.Array, keys: jax.Array, values: jax.Array, visible: jax.Array) -> jax.Array:
    """Cached attention: q (B, T, H, D) over keys and values (B, H, S, D), each query seeing the
    positions `visible` (broadcast to (B, H, T, S)) allows -> (B, T, H, D)."""
    att = jnp.einsum("bthd,bhsd->bhts", q, keys) / math.sqrt(q.shape[3])
    att = jax.nn.softmax(jnp.where(visible, att, -jnp.inf), axis=-1)
    return jnp.einsum("bhts,bhsd->bthd", att.astype(q.dtype), values)


def attention_path(dropout_active: bool, kernel: str) -> str:
    """How a training or inference forward computes attention: 'explicit' (softmax written out)
    when attention dropout is active, since jax.nn.dot_product_attention has no dropout and the
    seed config drops attention weights like nanoGPT; otherwise the fused op with `kernel`
    ('xla', or 'cudnn' = cuDNN flash attention on GPU). tests/test_export.py asserts which path
    each config takes in the programs exported for cuda."""
    return "explicit" if dropout_active else kernel


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, attention: str = "xla", matmul: str = "float32"):
        resid_std = 0.02 / math.sqrt(2 * cfg.n_layer)  # GPT-2: scale the residual projections
        self.c_attn = linear(cfg.n_embd, 3 * cfg.n_embd, 0.02, cfg, rngs, matmul=matmul)  # q, k, v in one matmul
        self.q_norm = nnx.RMSNorm(cfg.head_dim, epsilon=cfg.layer_norm_epsilon, rngs=rngs) if cfg.qk_norm else None
        self.k_norm = nnx.RMSNorm(cfg.head_dim, epsilon=cfg.layer_norm_epsilon, rngs=rngs) if cfg.qk_norm else None
        # value embeddings: v = ve_lambda[0] * v + ve_lambda[1] * (this layer's table row, or zeros)
        # float32, not the weak type jnp.full(.., 0.5) gives: a step's output state is strongly typed, so a
        # weak leaf made a jitted train or eval step compile again on its second call (parity's twins, notebooks)
        self.ve_lambda = nnx.Param(jnp.full((2,), 0.5, jnp.float32)) if cfg.value_embeds else None
        self.c_proj = linear(cfg.n_embd, cfg.n_embd, resid_std, cfg, rngs, zero=cfg.zero_init_proj, matmul=matmul)
        self.attn_dropout = nnx.Dropout(cfg.dropout)
        self.resid_dropout = nnx.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.rope_base = cfg.rope_base if cfg.pos_embedding == "rope" else 0.0  # static; 0 = learned positions
        self.attention = attention  # static: the fused kernel, see attention_path

    def _qkv(self, x: jax.Array, ve: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """(B, T, C) -> q, k, v (B, T, H, D), q and k normalised when qk_norm is on (before RoPE), the
        value embedding rows ve (B, T, C) mixed into v when value_embeds is on."""
        B, T, C = x.shape
        q, k, v = jnp.split(flat_matmul(self.c_attn, x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, self.n_head, C // self.n_head) for t in (q, k, v))  # dot_product_attention's layout
        if self.ve_lambda is not None and ve is not None:
            lam = self.ve_lambda[...].astype(v.dtype)
            v = lam[0] * v + lam[1] * ve.astype(v.dtype).reshape(v.shape)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k, v

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, cache: LayerCache | None = None,
                 pos: jax.Array | int = 0, ve: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        """x (B, T, C) -> (y (B, T, C), cache). With a cache (the stacked k, v of all layers
        and this layer's index) the T new tokens sit at absolute positions pos..pos+T-1."""
        B, T, C = x.shape
        D = C // self.n_head
        q, k, v = self._qkv(x, ve)
        key_attn, key_resid = jax.random.split(key) if key is not None else (None, None)
        if cache is not None:
            y, cache = self._cached(q, k, v, cache, pos)
        else:
            if self.rope_base:
                q, k = (rope(t, np.arange(T), self.rope_base, axis=1) for t in (q, k))
            if (path := attention_path(not self.attn_dropout.deterministic and self.attn_dropout.rate > 0,
                                       self.attention)) != "explicit":
                y = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=path)  # type: ignore[call-overload]
            else:
                att = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(D)
                att = jnp.where(jnp.tril(jnp.ones((T, T), bool)), att, -jnp.inf)
                att = self.attn_dropout(jax.nn.softmax(att, axis=-1), rngs=key_attn)
                y = jnp.einsum("bhqk,bkhd->bqhd", att, v)
        return self.resid_dropout(flat_matmul(self.c_proj, y.reshape(B, T, C)), rngs=key_resid), cache

    def _cached(self, q: jax.Array, k: jax.Array, v: jax.Array, cache: LayerCache,
                pos: jax.Array | int) -> tuple[jax.Array, LayerCache]:
        """Attention of the new tokens over the cache. The cache is head-major (B, H, S, D), the
        layout of the attention matmuls, written in place in the stacked array: a (B, S, H, D)
        cache cost a transpose of every layer's k/v per token, 70% of decode time on CPU.

        Learned positions: slot s holds position s (pos + T <= block_size). RoPE: a rolling cache —
        slot s holds the newest position = s mod S, keys are stored unrotated and rotated at their
        place in the window of the last S positions on every read, so a step past block_size
        computes exactly nanoGPT's crop (attention depends only on relative positions) without
        recomputing the window, and no angle ever exceeds the context. T > 1 only from pos 0."""
        k_all, v_all, layer = cache
        T, S = q.shape[1], k_all.shape[3]
        kh, vh = (t.transpose(0, 2, 1, 3).astype(k_all.dtype)[None] for t in (k, v))  # (1, B, H, T, D)
        if isinstance(pos, jax.Array) and pos.ndim == 1:  # one position per sequence (the server's slots)
            return self._cached_rows(q, kh, vh, cache, pos)
        query = pos + jnp.arange(T)  # absolute positions of the new tokens
        if self.rope_base:
            last = pos + T - 1
            held = last - (last - jnp.arange(S)) % S  # the position each slot holds (< 0: not yet written)
            start = jnp.maximum(last - S + 1, 0)  # the window's first position
            slot = pos % S
            visible = (held[None, :] >= 0) & (held[None, :] <= query[:, None])  # (T, S)
        else:
            slot = pos
            visible = jnp.arange(S)[None, :] <= query[:, None]  # (T, S)
        k_all = jax.lax.dynamic_update_slice(k_all, kh, (layer, 0, 0, slot, 0))
        v_all = jax.lax.dynamic_update_slice(v_all, vh, (layer, 0, 0, slot, 0))
        keys = k_all[layer]
        if self.rope_base:
            keys = rope(keys, held - start, self.rope_base, axis=2, size=S)
            q = rope(q, query - start, self.rope_base, axis=1, size=S)
        return _attend(q, keys, v_all[layer], visible), (k_all, v_all, layer)

    def _cached_rows(self, q: jax.Array, kh: jax.Array, vh: jax.Array, cache: LayerCache,
                     pos: jax.Array) -> tuple[jax.Array, LayerCache]:
        """_cached for one new token per sequence at its own position pos (B,) (learned positions):
        each row's key and value are scattered into its slot, in place. vmapping the one-position
        form over the rows instead made XLA:CPU transpose the whole stacked cache twice per token."""
        k_all, v_all, layer = cache
        if self.rope_base or q.shape[1] != 1:
            raise ValueError("per-sequence positions take one token per sequence and learned positions")
        rows, S = jnp.arange(q.shape[0]), k_all.shape[3]
        k_all = k_all.at[layer, rows, :, pos, :].set(kh[0, :, :, 0])
        v_all = v_all.at[layer, rows, :, pos, :].set(vh[0, :, :, 0])
        visible = jnp.arange(S)[None, None, None, :] <= pos[:, None, None, None]  # (B, 1, 1, S)
        return _attend(q, k_all[layer], v_all[layer], visible), (k_all, v_all, layer)

    def last(self, x: jax.Array, ve: jax.Array | None = None) -> jax.Array:
        """Attention output (B, 1, C) of the last position only; every position's keys and
        values still enter (inference, no dropout)."""
        B, T, C = x.shape
        q, k, v = self._qkv(x, ve)
        q = q[:, -1:]
        if self.rope_base:
            q, k = rope(q, np.arange(T - 1, T), self.rope_base, axis=1), rope(k, np.arange(T), self.rope_base, axis=1)
        y = jax.nn.dot_product_attention(q, k, v)  # the last query sees every key: no mask
        return flat_matmul(self.c_proj, y.reshape(B, 1, C))


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, matmul: str = "float32"):
        self.c_fc = linear(cfg.n_embd, 4 * cfg.n_embd, 0.02, cfg, rngs, matmul=matmul)
        self.c_proj = linear(4 * cfg.n_embd, cfg.n_embd, 0.02 / math.sqrt(2 * cfg.n_layer), cfg, rngs,
                              zero=cfg.zero_init_proj, matmul=matmul)
        self.dropout = nnx.Dropout(cfg.dropout)
        self.activation = cfg.activation

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        h = activation(flat_matmul(self.c_fc, x), self.activation)
        return self.dropout(flat_matmul(self.c_proj, h), rngs=key)


class ValueEmbeds(nnx.Module):
    """modded-nanogpt's value embeddings: value_embeds extra (vocab, C) tables, N(0, 1) like its
    nn.Embedding; layer i's attention mixes in table cfg.value_table(i)'s rows for the input tokens.
    They give each layer's values a direct view of the token: with them the CPU preset's recipe
    reaches its loss in 130 steps instead of 150 (BENCHMARKS.md, "Time to quality, third lap")."""

    def __init__(self, cfg: GPTConfig, rngs: nnx.Rngs):
        self.embedding = nnx.Param(jax.random.normal(rngs.params(), (cfg.value_embeds, cfg.vocab_size, cfg.n_embd)))
        self.tables = tuple(cfg.value_table(i) for i in range(cfg.n_layer))  # static: a table per layer, or none

    def rows(self, idx: jax.Array, layer: jax.Array | int) -> jax.Array:
        """(B, T) tokens -> (B, T, C): layer `layer`'s table rows, zeros for a layer without a table
        (the zeros keep every layer of the scan the same program)."""
        k = self.embedding.shape[0]
        t = jnp.asarray(self.tables)[layer]
        return self.embedding[...][jnp.minimum(t, k - 1), idx] * (t < k).astype(self.embedding.dtype)


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs, attention: str = "xla", matmul: str = "float32"):
        self.ln_1 = norm(cfg, cfg.n_embd, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs, attention=attention, matmul=matmul)
        self.ln_2 = norm(cfg, cfg.n_embd, rngs)
        self.mlp = MLP(cfg, rngs=rngs, matmul=matmul)

    def __call__(self, x: jax.Array, *, key: jax.Array | None = None, cache: LayerCache | None = None,
                 pos: jax.Array | int = 0, ve: jax.Array | None = None) -> tuple[jax.Array, LayerCache | None]:
        key_attn, key_mlp = jax.random.split(key) if key is not None else (None, None)
        a, cache = self.attn(self.ln_1(x), key=key_attn, cache=cache, pos=pos, ve=ve)
        x = x + a
        x = x + self.mlp(self.ln_2(x), key=key_mlp)
        return x, cache

    def last(self, x: jax.Array, ve: jax.Array | None = None) -> jax.Array:
        """The block's output (B, 1, C) at the last position of x (B, T, C) only."""
        h = x[:, -1:] + self.attn.last(self.ln_1(x), ve)
        return h + self.mlp(self.ln_2(h))
