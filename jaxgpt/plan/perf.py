"""Performance accounting, defined once: the FLOP formula (peak FLOP/s: the chip table, jaxgpt.plan.targets).

FLOPs per token follow nanoGPT's estimate_mfu (PaLM appendix B): 6 N for the matmuls of
the forward and backward pass (N = GPTConfig.num_params(): non-embedding, the tied head included)
plus 12 L T C for attention scores and mixing (C = n_head * head_dim).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from jaxgpt.config import GPTConfig


def flops_per_token(cfg: GPTConfig) -> float:
    """Training FLOPs (forward + backward) per token at full context length."""
    return 6 * cfg.num_params() + 12 * cfg.n_layer * cfg.n_embd * cfg.block_size


def device_peak_flops(device: jax.Device | None = None, measure_cpu: bool = True) -> tuple[float | None, str]:
    """(peak FLOP/s, how it was obtained): the datasheet bf16 peak of a known accelerator (the one
    table, jaxgpt.plan.targets.CHIPS), or a measured CPU matmul peak."""
    from jaxgpt.plan.targets import chip_for_kind

    device = device or jax.devices()[0]
    chip = chip_for_kind(device.device_kind)
    if chip is not None:
        return chip.peak_flops, f"{chip.name} datasheet"
    if device.platform == "cpu" and measure_cpu:
        return measure_matmul_flops(), "measured fp32 matmul"
    return None, f"unknown device kind {device.device_kind!r}"


def measure_matmul_flops(n: int = 1024, reps: int = 10) -> float:
    """Best-of sustained FLOP/s of an n x n fp32 matmul on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best
