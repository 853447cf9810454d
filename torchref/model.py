"""The PyTorch twin of jaxgpt/model.py, class for class, with nanoGPT's state_dict names
(its layers, and the recipe's switches, are torchref/layers.py, the twin of jaxgpt/layers.py).

It exists to prove jaxgpt's numbers: parity/ converts weights between the two and checks
logits, tokens and training steps. Its parameter names are nanoGPT's exactly
(`transformer.h.0.attn.c_attn.weight`, ...), so a real nanoGPT `ckpt.pt` loads as is.
Unlike jaxgpt, the layers are a plain ModuleList (that is nanoGPT's layout).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn

from jaxgpt.config import GPTConfig
from torchref.layers import Block, Linear, ValueEmbeds, norm

KVCache = tuple[torch.Tensor, torch.Tensor]  # (k, v), each (n_layer, B, n_head, block_size, head_dim)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig, matmul: str = "float32"):
        super().__init__()
        self.config = cfg  # matmul: the linear layers' float32 products (layers.Linear, --matmul_precision)
        layers = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.pos_embedding == "learned":  # else RoPE inside attention (layers.rope)
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        if cfg.value_embeds:
            layers["ve"] = ValueEmbeds(cfg)
        self.transformer = nn.ModuleDict(dict(
            **layers,
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, matmul) for _ in range(cfg.n_layer)]),
            ln_f=norm(cfg, cfg.n_embd),
        ))
        self.lm_head = Linear(cfg.n_embd, cfg.vocab_size, False, matmul)
        if cfg.tie_embeddings:
            self.transformer.wte.weight = self.lm_head.weight  # tied, as in nanoGPT
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale the residual projections
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))
            if cfg.zero_init_proj and (name.endswith("c_proj.weight") or (name == "lm_head.weight" and not cfg.tie_embeddings)):
                torch.nn.init.zeros_(p)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, window: int | None = None) -> torch.Tensor:
        """idx long (B, T), T <= block_size -> logits (B, T, vocab_size). window (RoPE models): any
        T, each position attending to the last `window` positions (sliding-window attention)."""
        return self._forward(idx, window=window)[0]

    def decode(self, idx: torch.Tensor, cache: KVCache, pos: int) -> tuple[torch.Tensor, KVCache]:
        """Cached forward for generation (see jaxgpt.GPT.decode); updates `cache` in place."""
        return self._forward(idx, cache=cache, pos=pos)

    def _forward(self, idx: torch.Tensor, cache: KVCache | None = None, pos: int = 0,
                 window: int | None = None) -> tuple[torch.Tensor, KVCache | None]:
        B, T = idx.shape
        if window is not None and self.config.pos_embedding != "rope":
            raise ValueError("a sliding window needs relative positions (pos_embedding='rope')")
        if pos + T > self.config.block_size and window is None:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size={self.config.block_size}")
        tr = self.transformer
        x = tr.wte(idx)
        if "wpe" in tr:
            x = x + tr.wpe(torch.arange(pos, pos + T, device=idx.device))
        x = tr.drop(x)  # (B, T, C)
        cfg = self.config
        for i, block in enumerate(tr.h):
            table = cfg.value_table(i)  # == value_embeds (none) for a layer without a table, and with none at all
            ve = tr.ve.weight[table][idx] if table < cfg.value_embeds else None
            x, _ = block(x, cache=None if cache is None else (*cache, i), pos=pos, window=window, ve=ve)
        logits = self.lm_head(tr.ln_f(x))
        cap = self.config.logit_softcap
        return (cap * torch.tanh(logits / cap) if cap else logits), cache

    def init_cache(self, batch_size: int, dtype: torch.dtype = torch.float32) -> KVCache:
        cfg = self.config
        shape = (cfg.n_layer, batch_size, cfg.n_head, cfg.block_size, cfg.n_embd // cfg.n_head)
        return torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)

    def num_params(self, non_embedding: bool = True) -> int:
        """As nanoGPT: tied weights counted once, learned position embeddings excluded by default."""
        n = sum(p.numel() for p in self.parameters())
        return n - self.transformer.wpe.weight.numel() if non_embedding and "wpe" in self.transformer else n
