"""The PyTorch twin of jaxgpt/layers.py: attention, MLP, block and the recipe's switches —
`norm()`, `activation()`, `rope()` — with the same names in the same places.

One difference by design: the KV cache. jaxgpt's rotary models keep a rolling cache past
block_size; torchref's cache only ever holds positions < block_size (past it, torchref.sample
recomputes the cropped window like nanoGPT), so it stores keys already rotated at their positions.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.config import GPTConfig

LayerCache = tuple[torch.Tensor, torch.Tensor, int]  # (k, v, index of the layer being run)


class _BF16Matmul(torch.autograd.Function):
    """x @ w.T with x, w and, backward, the output gradient rounded to bfloat16 and the products
    summed in float32 (jaxgpt.layers.bf16_matmul): a product of two bfloat16 values is exact in
    float32, so float32 matmuls of the rounded values compute it, up to the order of the sums."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xb, wb = x.bfloat16(), w.bfloat16()
        ctx.save_for_backward(xb, wb)
        return xb.float() @ wb.float().T

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xb, wb = ctx.saved_tensors
        gb = g.bfloat16().float()
        return gb @ wb.float(), gb.reshape(-1, gb.shape[-1]).T @ xb.float().reshape(-1, xb.shape[-1])


def bf16_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ w (out, in).T in bfloat16 products with float32 sums (the twin of jaxgpt's)."""
    return _BF16Matmul.apply(x, w)


class Linear(nn.Linear):
    """nn.Linear (nanoGPT's names: weight, bias) whose float32 products are bf16_matmul's with
    matmul='bfloat16' (--matmul_precision); under autocast, or with 'float32', nn.Linear's own."""

    def __init__(self, d_in: int, d_out: int, bias: bool, matmul: str = "float32"):
        super().__init__(d_in, d_out, bias=bias)
        self.matmul = matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.matmul != "bfloat16" or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
            return super().forward(x)
        y = bf16_matmul(x, self.weight)
        return y + self.bias if self.bias is not None else y


def norm(cfg: GPTConfig, dim: int) -> nn.Module:
    """nanoGPT's LayerNorm (bias as cfg.bias) or RMSNorm (weight only); the epsilon is explicit."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.layer_norm_epsilon)
    return nn.LayerNorm(dim, eps=cfg.layer_norm_epsilon, bias=cfg.bias)


def activation(h: torch.Tensor, name: str) -> torch.Tensor:
    if name == "relu2":
        return torch.square(F.relu(h))
    return F.gelu(h, approximate="tanh" if name == "gelu_tanh" else "none")  # tanh = GPT-2's gelu_new


def rope_table(n: int, D: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (n, D/2) of positions 0..n-1, in float64 rounded to float32 (jaxgpt.layers.rope_table)."""
    inv_freq = 1.0 / base ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None, :]
    return torch.cos(angles).float(), torch.sin(angles).float()


def rope(x: torch.Tensor, positions: torch.Tensor, base: float, dim: int) -> torch.Tensor:
    """Half-split rotary embedding of x (..., D) at `positions` (N,) along `dim`, in float32 (jaxgpt.layers.rope)."""
    cos, sin = (t[positions] for t in rope_table(int(positions.max()) + 1, x.shape[-1], base))
    shape = [1] * x.dim()
    shape[dim], shape[-1] = cos.shape
    cos, sin = cos.reshape(shape), sin.reshape(shape)
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, matmul: str = "float32"):
        super().__init__()
        self.c_attn = Linear(cfg.n_embd, 3 * cfg.n_embd, cfg.bias, matmul)  # q, k, v in one matmul
        self.q_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(cfg.head_dim, eps=cfg.layer_norm_epsilon) if cfg.qk_norm else None
        self.ve_lambda = nn.Parameter(torch.full((2,), 0.5)) if cfg.value_embeds else None
        self.c_proj = Linear(cfg.n_embd, cfg.n_embd, cfg.bias, matmul)
        self.attn_dropout = cfg.dropout  # applied inside scaled_dot_product_attention
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head
        self.rope_base = cfg.rope_base if cfg.pos_embedding == "rope" else 0.0

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, pos: int = 0,
                window: int | None = None, ve: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerCache | None]:
        """x (B, T, C) -> (y (B, T, C), cache); with a cache (the stacked k, v and this layer's
        index) the T new tokens sit at absolute positions pos..pos+T-1 (written in place).
        window: each position attends to the last `window` positions only (sliding-window attention:
        what jaxgpt's rolling RoPE cache computes past block_size)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))  # (B, T, H, D), as in jaxgpt
        if self.ve_lambda is not None:  # value embeddings: a layer without a table only scales v
            v = self.ve_lambda[0] * v + (self.ve_lambda[1] * ve.view(B, T, H, D) if ve is not None else 0.0)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base:
            positions = torch.arange(pos, pos + T)
            q, k = rope(q, positions, self.rope_base, 1), rope(k, positions, self.rope_base, 1)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) for SDPA and the cache
        if cache is not None:
            k_all, v_all, layer = cache
            k_all[layer, :, :, pos:pos + T] = k
            v_all[layer, :, :, pos:pos + T] = v
            k, v = k_all[layer, :, :, :pos + T], v_all[layer, :, :, :pos + T]
            visible = torch.arange(pos + T)[None, :] <= (pos + torch.arange(T))[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif window is not None:
            i = torch.arange(T)
            band = (i[None, :] <= i[:, None]) & (i[:, None] - i[None, :] < window)  # (T, T)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=band)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
                                               is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), cache


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, matmul: str = "float32"):
        super().__init__()
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, cfg.bias, matmul)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, cfg.bias, matmul)
        self.dropout = nn.Dropout(cfg.dropout)
        self.activation = cfg.activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(activation(self.c_fc(x), self.activation)))


class ValueEmbeds(nn.Module):
    """value_embeds (vocab, C) tables as one (value_embeds, vocab, C) weight, N(0, 1) (jaxgpt.layers.ValueEmbeds)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cfg.value_embeds, cfg.vocab_size, cfg.n_embd))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, matmul: str = "float32"):
        super().__init__()
        self.ln_1 = norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg, matmul)
        self.ln_2 = norm(cfg, cfg.n_embd)
        self.mlp = MLP(cfg, matmul)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, pos: int = 0,
                window: int | None = None, ve: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerCache | None]:
        a, cache = self.attn(self.ln_1(x), cache=cache, pos=pos, window=window, ve=ve)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cache
