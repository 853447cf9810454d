"""The benchmark harness behind scripts/bench.py: jaxgpt and torchref side by side, same
weights, same batch, same machine, reported as ratios in one run.

Timings are medians after warm-up (and, for jax, after compilation, which is timed apart).
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from flax import nnx

import torchref
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.model import GPT
from jaxgpt.perf import device_peak_flops, flops_per_token
from jaxgpt.sample import generate
from jaxgpt.train import init_state, lr_schedule, make_optimizer, make_train_step
from parity.convert import to_torch_state_dict
from torchref.sample import generate as torch_generate
from torchref.train import make_optimizer as torch_optimizer, train_step as torch_train_step


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""


def _median_time(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _batch(cfg: GPTConfig, tc: TrainConfig, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    shape = (tc.gradient_accumulation_steps, tc.batch_size, cfg.block_size + 1)
    win = np.random.default_rng(seed).integers(0, cfg.vocab_size, shape).astype(np.int32)
    return win[..., :-1], win[..., 1:]


def jax_train(cfg: GPTConfig, tc: TrainConfig) -> tuple[Callable[[], None], dict]:
    """A zero-argument jaxgpt train step (compiled ahead), with compile time and XLA's memory analysis."""
    graphdef, _, state = init_state(cfg, tc)
    x, y = _batch(cfg, tc)
    step_fn = make_train_step(graphdef, make_optimizer(tc), tc)
    t = time.perf_counter()
    compiled = step_fn.lower(state, x, y, 0).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    box = [state]

    def one() -> None:
        box[0], metrics = compiled(box[0], x, y, 0)
        metrics["loss"].block_until_ready()

    return one, {"compile_s": compile_s, "temp_bytes": getattr(mem, "temp_size_in_bytes", float("nan"))}


def torch_train(cfg: GPTConfig, tc: TrainConfig, compile_model: bool = False) -> Callable[[], None]:
    """A zero-argument torchref train step from the same initial weights and batch."""
    graphdef, _, state = init_state(cfg, tc)
    model = torchref.GPT(cfg)
    model.load_state_dict(to_torch_state_dict(nnx.merge(graphdef, state.params)))
    opt = torch_optimizer(model, tc)
    run_model = torch.compile(model) if compile_model else model
    x, y = (torch.from_numpy(a.astype(np.int64)) for a in _batch(cfg, tc))
    lr = float(lr_schedule(tc)(10))
    return lambda: torch_train_step(run_model, opt, x, y, lr, tc.grad_clip)


def interleaved(fns: dict[str, Callable[[], None]], warmup: int, iters: int, rounds: int = 3) -> dict[str, float]:
    """Median seconds per call of each fn, timed in alternating rounds so that drift in a
    shared machine's speed hits every contender alike."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(_median_time(fn, 0, max(1, iters // rounds)))
    return {k: statistics.median(v) for k, v in times.items()}


def train_figures(cfg: GPTConfig, tc: TrainConfig, warmup: int, iters: int, torch_compile: bool) -> list[Figure]:
    tokens = tc.batch_size * tc.gradient_accumulation_steps * cfg.block_size
    jax_fn, j = jax_train(cfg, tc)
    fns = {"jax": jax_fn, "torch": torch_train(cfg, tc)}
    if torch_compile:
        fns["compiled"] = torch_train(cfg, tc, compile_model=True)
    med = interleaved(fns, warmup, iters)
    j["step_s"], t = med["jax"], {"step_s": med["torch"]}
    peak, how = device_peak_flops()
    mfu = flops_per_token(cfg) * tokens / j["step_s"] / peak if peak else float("nan")
    out = [Figure("train", "jaxgpt step", j["step_s"] * 1e3, "ms"),
           Figure("train", "torchref eager step", t["step_s"] * 1e3, "ms"),
           Figure("train", "jaxgpt / torchref eager time", j["step_s"] / t["step_s"], "x", "headline: < 1 is faster"),
           Figure("train", "jaxgpt tokens/s", tokens / j["step_s"], "tok/s"),
           Figure("train", "torchref eager tokens/s", tokens / t["step_s"], "tok/s"),
           Figure("train", "jaxgpt MFU", 100 * mfu, "%", f"peak {peak / 1e12:.2f} TFLOP/s ({how})" if peak else how),
           Figure("train", "jaxgpt compile", j["compile_s"], "s")]
    if torch_compile:
        out += [Figure("train", "torchref torch.compile step", med["compiled"] * 1e3, "ms"),
                Figure("train", "jaxgpt / torch.compile time", j["step_s"] / med["compiled"], "x")]
    return out


def memory_figures(cfg: GPTConfig, tc: TrainConfig, warmup: int, iters: int) -> list[Figure]:
    """XLA's temp (activation + workspace) bytes and step time per remat policy."""
    built = {r: jax_train(cfg, dataclasses.replace(tc, remat=r)) for r in ("none", "dots", "full")}
    med = interleaved({r: fn for r, (fn, _) in built.items()}, warmup, iters)
    res = {r: {**info, "step_s": med[r]} for r, (_, info) in built.items()}
    out = []
    for r, v in res.items():
        out += [Figure("memory", f"remat={r} temp memory", v["temp_bytes"] / 2**20, "MiB"),
                Figure("memory", f"remat={r} step", v["step_s"] * 1e3, "ms")]
    out += [Figure("memory", "none/full temp memory", res["none"]["temp_bytes"] / res["full"]["temp_bytes"], "x",
                   "target >= 3"),
            Figure("memory", "full/none step time", res["full"]["step_s"] / res["none"]["step_s"], "x", "target <= 1.3")]
    return out


def generation_figures(cfg: GPTConfig, num_samples: int, new_tokens: int, prompt_len: int,
                       recompute: bool) -> list[Figure]:
    """tokens/s of jaxgpt (KV cache, batched, jitted), torchref (KV cache) and nanoGPT's loop
    that recomputes the cropped context every step — same weights, same uniform draws."""
    model = GPT(cfg, rngs=nnx.Rngs(0))
    model.eval()
    tmodel = torchref.GPT(cfg)
    tmodel.load_state_dict(to_torch_state_dict(model))
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (num_samples, prompt_len))
    u = np.random.default_rng(1).random((new_tokens, num_samples)).astype(np.float32)
    kw = dict(temperature=1.0, top_k=40)
    n = num_samples * new_tokens
    t = time.perf_counter()
    generate(model, prompt, new_tokens, uniforms=u, **kw)
    first = time.perf_counter() - t
    jax_s = _median_time(lambda: generate(model, prompt, new_tokens, uniforms=u, **kw), 0, 3)
    tp, tu = torch.from_numpy(prompt), torch.from_numpy(u)
    torch_s = _median_time(lambda: torch_generate(tmodel, tp, new_tokens, uniforms=tu, **kw), 0, 1)
    where = (f"block {cfg.block_size}, {num_samples} x {new_tokens} tokens, prompt {prompt_len}"
             + (" (past block_size: exact crop, full forward per step)" if prompt_len + new_tokens > cfg.block_size else ""))
    out = [Figure("generate", "jaxgpt cached tokens/s", n / jax_s, "tok/s", where),
           Figure("generate", "jaxgpt first call (compile + run)", first, "s", where),
           Figure("generate", "torchref cached tokens/s", n / torch_s, "tok/s", where),
           Figure("generate", "jaxgpt / torchref cached speed", torch_s / jax_s, "x", where)]
    if recompute:
        rec_s = _median_time(lambda: torch_generate(tmodel, tp, new_tokens, uniforms=tu, use_cache=False, **kw), 0, 1)
        out += [Figure("generate", "nanoGPT-style recompute tokens/s", n / rec_s, "tok/s", where),
                Figure("generate", "jaxgpt / recompute speed", rec_s / jax_s, "x", where + "; target >= 20")]
    return out


def markdown(figures: list[Figure]) -> str:
    lines = ["| section | figure | value | unit | note |", "|---|---|---|---|---|"]
    lines += [f"| {f.section} | {f.name} | {f.value:.4g} | {f.unit} | {f.note} |" for f in figures]
    return "\n".join(lines)
