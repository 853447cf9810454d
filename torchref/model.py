"""The PyTorch twin of jaxgpt/model.py, class for class, with nanoGPT's state_dict names.

It exists to prove jaxgpt's numbers: parity/ converts weights between the two and checks
logits, tokens and training steps. Its parameter names are nanoGPT's exactly
(`transformer.h.0.attn.c_attn.weight`, ...), so a real nanoGPT `ckpt.pt` loads as is.
Unlike jaxgpt, the layers are a plain ModuleList (that is nanoGPT's layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from jaxgpt.config import GPTConfig

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_layer, B, n_head, block_size, head_dim)
LayerCache = tuple[torch.Tensor, torch.Tensor, int]  # (k, v, index of the layer being run)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.attn_dropout = cfg.dropout  # applied inside scaled_dot_product_attention
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.n_head = cfg.n_head

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, pos: int = 0) -> tuple[torch.Tensor, LayerCache | None]:
        """x (B, T, C) -> (y (B, T, C), cache); with a cache (the stacked k, v and this layer's
        index) the T new tokens sit at absolute positions pos..pos+T-1 (written in place)."""
        B, T, C = x.shape
        H, D = self.n_head, C // self.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, H, D) for t in (q, k, v))  # (B, T, H, D), as in jaxgpt
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D) for SDPA and the cache
        if cache is not None:
            k_all, v_all, layer = cache
            k_all[layer, :, :, pos:pos + T] = k
            v_all[layer, :, :, pos:pos + T] = v
            k, v = k_all[layer, :, :, :pos + T], v_all[layer, :, :, :pos + T]
            visible = torch.arange(pos + T)[None, :] <= (pos + torch.arange(T))[:, None]  # (T, S)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        else:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0,
                                               is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), cache


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.approximate = "tanh" if cfg.activation == "gelu_tanh" else "none"  # tanh = GPT-2's gelu_new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate)))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None, pos: int = 0) -> tuple[torch.Tensor, LayerCache | None]:
        a, cache = self.attn(self.ln_1(x), cache=cache, pos=pos)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cache


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon, bias=cfg.bias),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx long (B, T), T <= block_size -> logits (B, T, vocab_size)."""
        return self._forward(idx)[0]

    def decode(self, idx: torch.Tensor, cache: KVCache, pos: int) -> tuple[torch.Tensor, KVCache]:
        """Cached forward for generation (see jaxgpt.GPT.decode); updates `cache` in place."""
        return self._forward(idx, cache=cache, pos=pos)

    def _forward(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0) -> tuple[torch.Tensor, KVCache | None]:
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}")
        tr = self.transformer
        x = tr.drop(tr.wte(idx) + tr.wpe(torch.arange(pos, pos + T, device=idx.device)))  # (B, T, C)
        for i, block in enumerate(tr.h):
            x, _ = block(x, cache=None if cache is None else (*cache, i), pos=pos)
        return self.lm_head(tr.ln_f(x)), cache

    def init_cache(self, batch_size: int, dtype: torch.dtype = torch.float32) -> KVCache:
        cfg = self.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """As nanoGPT: tied weights counted once, position embeddings excluded by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding else n
