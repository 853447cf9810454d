"""The PyTorch twin of jaxgpt's train step: AdamW with the same decay rule, betas, eps,
clipping and (passed-in) learning rate, and gradient accumulation before clipping.

`python -m torchref.train --preset=cpu --max_iters=600` is also a plain PyTorch-eager training
script shaped like nanoGPT's train.py loop (same config flags, data files, batches, schedule,
evaluations and a checkpoint when val improves): the other side of `scripts/bench.py
--whole_process`, which times it against `scripts/train.py` as whole processes.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from jaxgpt.config import TrainConfig
from torchref.model import GPT
from torchref.optim import MuonAdamW, make_optimizer, set_lr


def train_step(model: GPT, opt: torch.optim.Optimizer | MuonAdamW, x: torch.Tensor, y: torch.Tensor, lr: float,
               tc: TrainConfig, autocast: bool = False) -> float:
    """One optimizer step over micro-batches x, y of shape (accum, B, T) at AdamW learning rate `lr`
    (Muon's from the same schedule); returns the mean loss.
    autocast: the forward under torch.autocast(bfloat16), fp32 weights and optimizer (mixed precision)."""
    model.train()
    opt.zero_grad(set_to_none=True)
    total = 0.0
    for xm, ym in zip(x, y, strict=True):
        with torch.autocast(xm.device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = model(xm)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), ym.reshape(-1)) / x.shape[0]
        loss.backward()
        total += loss.item()
    if tc.grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
    set_lr(opt, lr, tc)
    opt.step()
    return total


def lr_at(step: int, tc: TrainConfig) -> float:
    """nanoGPT's get_lr (linear warmup, cosine to min_lr), the same curve as jaxgpt.train.lr_schedule."""
    warmup = min(tc.warmup_iters, tc.decay_iters - 1)
    if step < warmup:
        return tc.learning_rate * step / warmup
    if step >= tc.decay_iters:
        return tc.min_lr
    ratio = (step - warmup) / (tc.decay_iters - warmup)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)


def main(argv: list[str]) -> int:
    from jaxgpt.config import PRESETS, GPTConfig, explicit_flags, make_parser
    from jaxgpt.data import BatchSampler, dataset_dir

    p = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    args = p.parse_args(argv)
    preset = PRESETS[args.preset]
    pick = lambda cls: {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}  # noqa: E731
    cfg = GPTConfig(**{**pick(GPTConfig), **explicit_flags(args, GPTConfig)})
    tc = TrainConfig(**{**pick(TrainConfig), **explicit_flags(args, TrainConfig)})
    torch.manual_seed(tc.seed)
    data = dataset_dir(tc.data_dir, tc.dataset)
    samplers = {s: BatchSampler(data / f"{s}.bin", cfg.block_size, tc.batch_size, seed=tc.seed,
                                accum=tc.gradient_accumulation_steps) for s in ("train", "val")}
    model = GPT(cfg)
    opt = make_optimizer(model, tc)
    as_torch = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best, t0 = math.inf, time.perf_counter()
    for step in range(tc.max_iters):
        x, y = samplers["train"].get(step)
        loss = train_step(model, opt, as_torch(x), as_torch(y), lr_at(step, tc), tc)  # .item(): a sync
        done = step + 1
        if done % tc.log_interval == 0:
            print(f"step {done}: loss {loss:.4f}")
        if done % tc.eval_interval == 0 or done == tc.max_iters:
            model.eval()
            with torch.no_grad():
                losses = {s: float(np.mean([F.cross_entropy(model(as_torch(xv[0])).flatten(0, 1), as_torch(yv[0]).flatten())
                                            for xv, yv in (sampler.get(i, stream=1) for i in range(tc.eval_iters))]))
                          for s, sampler in samplers.items()}
            print(f"step {done}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            if losses["val"] < best:
                best = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": done,
                            "best_val_loss": best, "model_args": cfg.to_dict()}, out / "ckpt.pt")
    print(f"done: {tc.max_iters} steps in {time.perf_counter() - t0:.1f} s, best val {best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
