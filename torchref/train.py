"""The PyTorch twin of jaxgpt's train step: AdamW with the same decay rule, betas, eps,
clipping and (passed-in) learning rate, and gradient accumulation before clipping."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from jaxgpt.config import TrainConfig
from torchref.model import GPT


def make_optimizer(model: GPT, tc: TrainConfig) -> torch.optim.AdamW:
    """Decay matrices and embeddings (dim >= 2), not biases or LayerNorm weights — nanoGPT's rule."""
    params = [p for p in model.parameters() if p.requires_grad]  # the tied wte/lm_head appears once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), eps=1e-8)


def train_step(model: GPT, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor, lr: float,
               grad_clip: float) -> float:
    """One optimizer step over micro-batches x, y of shape (accum, B, T); returns the mean loss."""
    model.train()
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x, y):
        logits = model(xm)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), ym.reshape(-1)) / x.shape[0]
        loss.backward()
        total += loss.item()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    return total
