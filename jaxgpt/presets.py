"""Presets and recipes: the base values a run starts from before its explicit flags (scripts/train.py).

A size preset (--preset: nanoGPT's CPU and fine-tuning recipes, GPT-2 124M and 350M on FineWeb-edu 10B), then
a recipe on top of it (--recipe=modern), then that recipe's values for that preset; explicit flags win over all.
"""
from __future__ import annotations

from typing import Any

from jaxgpt.errors import UserError

# nanoGPT's CPU recipe from its README (train_shakespeare_char on a MacBook / CPU); dtype and
# remat stay `auto`, which jaxgpt.platform resolves for the backend the run lands on.
PRESETS: dict[str, dict[str, Any]] = {
    "gpu": {},  # the defaults above
    "cpu": dict(n_layer=4, n_head=4, n_embd=128, block_size=64, batch_size=12, max_iters=2000,
                lr_decay_iters=2000, dropout=0.0, eval_iters=20, log_interval=1),
    # nanoGPT's finetune_shakespeare recipe (constant lr 3e-5, 20 iterations of 32 x 1 sequences);
    # give the weights with --init_from
    "finetune": dict(eval_interval=5, eval_iters=40, batch_size=1, gradient_accumulation_steps=32, max_iters=20,
                     learning_rate=3e-5, min_lr=3e-5, warmup_iters=0, dropout=0.0),
    # GPT-2 124M on FineWeb-edu 10B, llm.c's and build-nanogpt's recipe (README "GPT-2 124M, the whole way" lists
    # each value's source): 512 x 1024 = 524,288 tokens a step, split by the compiler into micro-batches and
    # accumulation (batch_auto), 19,073 steps = 10 B tokens; val loss over the val split's first 20 x 0.5 M tokens
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, dropout=0.0, bias=True,
                 dataset="fineweb-edu-10B", batch_size=512, gradient_accumulation_steps=1, batch_auto=True,
                 max_iters=19073, learning_rate=6e-4, min_lr=6e-5, warmup_iters=715, beta1=0.9, beta2=0.95,
                 weight_decay=0.1, grad_clip=1.0, data_order="epoch", eval_interval=250, eval_full=True,
                 val_tokens=20 * 524288, log_interval=10),
}
# GPT-2 medium (350M): the same data, steps and schedule; GPT-3's learning rate for its 350M model (Brown et al.
# 2020, table 2.1), as llm.c's 350M run
PRESETS["gpt2-medium"] = {**PRESETS["gpt2"], "n_layer": 24, "n_head": 16, "n_embd": 1024, "learning_rate": 3e-4,
                          "min_lr": 3e-5}

# --recipe: how to train, on top of a size preset (--preset=cpu --recipe=modern). `nanogpt` changes nothing;
# `modern` is the speedrun's architecture and optimizer (KellerJordan/modded-nanogpt) at the learning
# rates and schedule measured best at the CPU preset's scale (BENCHMARKS.md, "Time to quality").
RECIPES: dict[str, dict[str, Any]] = {
    "nanogpt": {},
    "modern": dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
                   zero_init_proj=True, logit_softcap=15.0, value_embeds=2, optimizer="muon", muon_lr=0.03, muon_momentum=0.95,
                   muon_beta2=0.95, learning_rate=0.03, min_lr=0.003, beta1=0.8, beta2=0.95, weight_decay=0.0,
                   matmul_precision="auto", attention="fast", batch_split=0),
}
# what a recipe changes for one preset: its model depth, batch, iteration count and schedule, each measured at
# that preset's budget (BENCHMARKS.md: "thirteenth lap" for cpu, "The modern recipe for the seed config" for gpu,
# which is unmeasured at full size).
RECIPE_FOR_PRESET: dict[tuple[str, str], dict[str, Any]] = {
    ("modern", "cpu"): dict(n_layer=2, batch_size=32, max_iters=95, lr_decay_iters=95, warmup_iters=5,
                            muon_momentum=0.85, muon_lr=0.07, eval_iters=8),
    ("modern", "gpu"): dict(max_iters=2000, lr_decay_iters=2000, warmup_iters=200),
}


def base_values(preset: str = "gpu", recipe: str = "nanogpt") -> dict[str, Any]:
    """The values a run starts from before explicit flags: the size preset, then the recipe."""
    if preset not in PRESETS:
        raise UserError(f"--preset must be one of {sorted(PRESETS)}, got {preset!r}")
    if recipe not in RECIPES:
        raise UserError(f"--recipe must be one of {sorted(RECIPES)}, got {recipe!r}")
    extra = {"recipe": recipe} if recipe != "nanogpt" else {}
    return {**PRESETS[preset], **RECIPES[recipe], **RECIPE_FOR_PRESET.get((recipe, preset), {}), **extra}
