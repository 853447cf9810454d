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


@torch.no_grad()
def full_split_loss(model: GPT, tokens: np.ndarray, block_size: int, batch_size: int = 128) -> float:
    """Mean loss over every token of a split (jaxgpt.data.eval_windows: the same windows as jaxgpt)."""
    from jaxgpt.loader import eval_batches

    model.eval()
    total, count = 0.0, 0
    for x, y, mask in eval_batches(tokens, block_size, batch_size):
        losses = F.cross_entropy(model(torch.from_numpy(x).long()).flatten(0, 1), torch.from_numpy(y).long().flatten(),
                                 reduction="none")
        total += float(losses[torch.from_numpy(mask).flatten()].double().sum())
        count += int(mask.sum())
    return total / count


def main(argv: list[str]) -> int:
    import json

    from jaxgpt.config import GPTConfig, explicit_flags, make_parser
    from jaxgpt.loader import BatchSampler, dataset_dir
    from jaxgpt.presets import base_values

    p = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    args = p.parse_args(argv)
    train_flags = explicit_flags(args, TrainConfig)
    preset = base_values(args.preset, train_flags.get("recipe", "nanogpt"))
    pick = lambda cls: {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}  # noqa: E731
    cfg = GPTConfig(**{**pick(GPTConfig), **explicit_flags(args, GPTConfig)})
    tc = TrainConfig(**{**pick(TrainConfig), **train_flags})
    torch.manual_seed(tc.seed)
    data = dataset_dir(tc.data_dir, tc.dataset)
    samplers = {s: BatchSampler(data / f"{s}.bin", cfg.block_size, tc.batch_size, seed=tc.seed,
                                accum=tc.gradient_accumulation_steps) for s in ("train", "val")}
    val_tokens = np.fromfile(data / "val.bin", dtype=np.uint8) if tc.eval_full else None
    # auto is float32 here: this twin's bfloat16 products are float32 matmuls of rounded values, never faster
    model = GPT(cfg, matmul="bfloat16" if tc.matmul_precision == "bfloat16" else "float32")
    opt = make_optimizer(model, tc)
    as_torch = lambda a: torch.from_numpy(a.astype(np.int64))  # noqa: E731
    out = Path(tc.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    best, t0, eval_s = math.inf, time.perf_counter(), 0.0
    for step in range(tc.max_iters):
        x, y = samplers["train"].get(step)
        loss = train_step(model, opt, as_torch(x), as_torch(y), lr_at(step, tc), tc)  # .item(): a sync
        done = step + 1
        if done % tc.log_interval == 0:
            print(f"step {done}: loss {loss:.4f}")
        if done % tc.eval_interval == 0 or done == tc.max_iters:
            t_eval = time.perf_counter()
            model.eval()
            with torch.no_grad():
                losses = {s: float(np.mean([F.cross_entropy(model(as_torch(xv[0])).flatten(0, 1), as_torch(yv[0]).flatten())
                                            for xv, yv in (sampler.get(i, stream=1) for i in range(tc.eval_iters))]))
                          for s, sampler in samplers.items()}
            if val_tokens is not None:  # the whole val split, as jaxgpt's --eval_full
                losses["val"] = full_split_loss(model, val_tokens, cfg.block_size)
            eval_s += time.perf_counter() - t_eval
            print(f"step {done}: train {losses['train']:.4f}, val {losses['val']:.4f}")
            if tc.eval_full:  # for the time-to-loss benchmark (benchmarks/harness.py)
                print(json.dumps({"step": done, "val_loss": losses["val"], "time": time.time(), "eval_s": eval_s}), flush=True)
            if losses["val"] < best:
                best = losses["val"]
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "iter_num": done,
                            "best_val_loss": best, "model_args": cfg.to_dict()}, out / "ckpt.pt")
            if 0 < tc.stop_loss and losses["val"] <= tc.stop_loss:
                break
    print(f"done: {done} steps in {time.perf_counter() - t0:.1f} s, best val {best:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
