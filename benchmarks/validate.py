"""`python scripts/bench.py --validate`: the checklist for a new GPU or TPU host, in one command
that fits in 10 minutes on one accelerator, printed as a markdown table for BENCHMARKS.md.

1. the parity rows, computed on the device (float32 rows at 'highest' matmul precision, so
   TF32 does not blur them; bf16 rows as they run in training);
2. the seed config's train step in bf16 — as configured (attention dropout spells attention
   out) and without dropout with each attention kernel (XLA, cuDNN on GPU) — with MFU against
   the device's datasheet peak and its memory;
3. 200 training steps on Tiny Shakespeare whose val loss must fall below 60 % of log(vocab);
4. generation tokens/s.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from collections.abc import Callable
from pathlib import Path

import jax

from benchmarks.harness import Figure, alternate, train_specs
from benchmarks.workers import generation
from jaxgpt import platform
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.plan.perf import device_peak_flops

VALIDATE_STEPS = 200
LOSS_FRACTION = 0.6  # val loss after VALIDATE_STEPS must be below this fraction of log(vocab_size)


def parity_rows(groups: list[str], log: Callable[[str], None]) -> list[Figure]:
    from parity.__main__ import GROUPS

    out = []
    with jax.default_matmul_precision("highest"):
        for group in groups:
            log(f"parity: {group}")
            for check in GROUPS[group]():
                for r in check():
                    out.append(Figure("parity", f"{r.check} [{r.case}]", r.value, "",
                                      f"tolerance {r.tolerance:g}: {'pass' if r.passed else 'FAIL'}"))
    return out


def step_rows(cfg: GPTConfig, tc: TrainConfig, log: Callable[[str], None]) -> list[Figure]:
    bf16 = dataclasses.replace(tc, dtype="bfloat16")
    here = platform.backend()
    kernels = ["xla"] + (["cudnn"] if platform.resolve_attention(cfg, "bfloat16", here) == "cudnn" else [])
    specs = {f"dropout {cfg.dropout} (attention spelled out)" if cfg.dropout else "as configured":
             {**train_specs(cfg, bf16, 3, 20, None, False)["jax"]}}
    for kernel in kernels:
        specs[f"dropout 0, {kernel} attention"] = {**train_specs(dataclasses.replace(cfg, dropout=0.0), bf16, 3, 20, None,
                                                                 False)["jax"], "attention": kernel}
    peak, how = device_peak_flops()
    out = []
    for name, runs in alternate(specs, 1, log).items():
        r = runs[0]
        mfu = r["flops_per_step"] / r["median_s"] / peak * 100 if peak else float("nan")
        memory = r["peak_bytes"] or r["temp_bytes"]
        out += [Figure("bf16 train step", name, r["median_s"] * 1e3, "ms", f"remat={r['remat']}"),
                Figure("bf16 train step", f"{name}: MFU", mfu, "%", how),
                Figure("bf16 train step", f"{name}: memory", memory / 2**30, "GiB",
                       "peak in use" if r["peak_bytes"] else "XLA temporaries")]
    # beside the measured step: the planner's roofline bound for the same step on this device
    # (what `train.py --target=... --compile_only` promised before the chip was rented)
    from jaxgpt.plan.aot import plan_training
    from jaxgpt.plan.targets import chip_for_kind

    if chip_for_kind(jax.devices()[0].device_kind) is None:  # a CPU, or a chip the table does not know: no peak
        return out
    bound = plan_training(cfg, bf16)["programs"]["train_step"].get("step_time_lower_bound_s")
    if bound:
        measured = out[0].value / 1e3
        out.insert(1, Figure("bf16 train step", "as configured: roofline lower bound (jaxgpt.plan.aot)", bound * 1e3, "ms",
                             f"an estimate at the datasheet peak; measured is {measured / bound:.1f}x it"))
    return out


def training_rows(cfg: GPTConfig, tc: TrainConfig, log: Callable[[str], None]) -> list[Figure]:
    from jaxgpt.data import prepare_shakespeare
    from jaxgpt.train import train

    with tempfile.TemporaryDirectory() as work:
        prepare_shakespeare(Path(work) / "data")
        run = dataclasses.replace(tc, dataset="shakespeare", data_dir=str(Path(work) / "data"), out_dir=str(Path(work) / "run"),
                                  max_iters=VALIDATE_STEPS, lr_decay_iters=VALIDATE_STEPS, eval_interval=VALIDATE_STEPS,
                                  eval_iters=20, progress=False, plot=False, resume=False)
        log(f"training {VALIDATE_STEPS} steps")
        summary = train(cfg, run)
    bound = LOSS_FRACTION * math.log(cfg.vocab_size)
    return [Figure("training", f"val loss after {VALIDATE_STEPS} steps", summary["val_loss"], "",
                   f"must be < {bound:.3f}: {'pass' if summary['val_loss'] < bound else 'FAIL'}"),
            Figure("training", f"{VALIDATE_STEPS} steps wall time incl. compile", summary["wall_s"] + summary["compile_s"], "s",
                   f"dtype={summary['platform']['dtype']}, remat={summary['platform']['remat']}")]


def validate(cfg: GPTConfig, tc: TrainConfig, parity_groups: list[str], log: Callable[[str], None]) -> list[Figure]:
    figures = parity_rows([g for g in parity_groups if g], log)
    figures += step_rows(cfg, tc, log)
    figures += training_rows(cfg, tc, log)
    gen = {"num_samples": 10, "new_tokens": 500, "prompt_len": 12}
    r = generation({"side": "jax", "model": dataclasses.asdict(cfg), "train": {}, "generate": gen})
    figures.append(Figure("generate", "tokens/s (10 x 500, KV cache)", r["tokens"] / min(r["times"]), "tok/s"))
    return figures
