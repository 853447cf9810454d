"""One benchmark contender, measured inside a fresh process: `python -m benchmarks.workers JSON`
prints one JSON line. benchmarks/harness.py starts these processes in alternation, so that no two
contenders share a process (XLA's and torch's thread pools would compete for the cores) and a
machine whose speed drifts hits every contender alike.

Every worker measures a framework-neutral probe (a numpy matmul) before and after its timing:
the orchestrator uses it to tell a slow machine moment from a slow contender.
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from typing import Any


def probe_gflops(n: int = 512, reps: int = 10) -> float:
    """Best-of fp32 matmul GFLOP/s through numpy: a yardstick independent of jax and torch."""
    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    a @ a
    best = min(_timed(lambda: a @ a) for _ in range(reps))
    return 2 * n ** 3 / best / 1e9


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _times(fn: Any, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    return [_timed(fn) for _ in range(iters)]


def _steps(fn: Any, warmup: int, iters: int) -> tuple[list[float], float]:
    """(per-call seconds, minor page faults per call) after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = [_timed(fn) for _ in range(iters)]
    return times, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / iters


def _configs(spec: dict) -> tuple[Any, Any]:
    from jaxgpt.config import GPTConfig, TrainConfig

    return GPTConfig(**spec["model"]), TrainConfig(**spec["train"])


def _batch(cfg: Any, tc: Any) -> tuple[Any, Any]:
    import numpy as np

    shape = (tc.gradient_accumulation_steps, tc.batch_size, cfg.block_size + 1)
    win = np.random.default_rng(0).integers(0, cfg.vocab_size, shape).astype(np.int32)
    return win[..., :-1], win[..., 1:]


def jax_train(spec: dict) -> dict:
    """The jitted train step as scripts/train.py compiles it (platform choices, remat by memory)."""
    import jax

    from jaxgpt.plan.perf import flops_per_token
    from jaxgpt.step import compile_train_step, init_state

    cfg, tc = _configs(spec)
    _, _, state = init_state(cfg, tc)
    x, y = _batch(cfg, tc)
    step, _, plat, memory = compile_train_step(cfg, tc, state, x, y, 0, attention=spec.get("attention"))
    box = [state]

    def one() -> None:
        box[0], metrics = step(box[0], x, y, 0)
        jax.block_until_ready(metrics["loss"])

    times, faults = _steps(one, spec["warmup"], spec["iters"])
    mem = step.memory_analysis()
    stats = jax.devices()[0].memory_stats() or {}  # accelerators: the allocator's high-water mark
    tokens = tc.batch_size * tc.gradient_accumulation_steps * cfg.block_size
    return {"times": times, "compile_s": memory["compile_s"], "remat": plat.remat, "dtype": plat.dtype,
            "temp_bytes": getattr(mem, "temp_size_in_bytes", None), "flops_per_step": flops_per_token(cfg) * tokens,
            "page_faults_per_step": faults, "platform": plat.to_dict(),
            "peak_bytes": stats.get("peak_bytes_in_use"),
            "device_kind": jax.devices()[0].device_kind}


def torch_train(spec: dict) -> dict:
    """torchref's eager (or torch.compile'd) train step from the same initial weights and batch."""
    import torch
    from flax import nnx

    import torchref
    from formats.table import to_torch_state_dict
    from jaxgpt.optim import lr_schedule
    from jaxgpt.step import init_state
    from torchref.train import make_optimizer, train_step

    cfg, tc = _configs(spec)
    graphdef, _, state = init_state(cfg, tc)
    model = torchref.GPT(cfg)
    model.load_state_dict(to_torch_state_dict(nnx.merge(graphdef, state.params)))
    opt = make_optimizer(model, tc)
    run = torch.compile(model) if spec["side"] == "torch.compile" else model
    x, y = (torch.from_numpy(a.astype("int64")) for a in _batch(cfg, tc))
    lr = float(lr_schedule(tc)(10))
    t = time.perf_counter()
    train_step(run, opt, x, y, lr, tc)  # torch.compile compiles here
    first = time.perf_counter() - t
    times, faults = _steps(lambda: train_step(run, opt, x, y, lr, tc), spec["warmup"], spec["iters"])
    return {"times": times, "compile_s": first, "threads": torch.get_num_threads(), "page_faults_per_step": faults}


def generation(spec: dict) -> dict:
    """tokens/s of one decoder: jaxgpt (KV cache, batched, jitted, chunked), torchref with a KV
    cache, or nanoGPT's loop that recomputes the cropped context every step."""
    import numpy as np

    cfg, _ = _configs(spec)
    g = spec["generate"]
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size, (g["num_samples"], g["prompt_len"]))
    u = np.random.default_rng(1).random((g["new_tokens"], g["num_samples"])).astype(np.float32)
    kw = dict(temperature=1.0, top_k=40)
    if spec["side"] == "jax":
        from flax import nnx

        from jaxgpt.model import GPT
        from jaxgpt.sample import generate

        model = GPT(cfg, rngs=nnx.Rngs(0))
        model.eval()
        first = _timed(lambda: generate(model, prompt, g["new_tokens"], uniforms=u, **kw))
        times = _times(lambda: generate(model, prompt, g["new_tokens"], uniforms=u, **kw), 0, 3)
        return {"times": times, "compile_s": first - min(times), "tokens": int(u.size)}
    import torch

    import torchref
    from torchref.sample import generate as torch_generate

    torch.manual_seed(0)
    model = torchref.GPT(cfg).eval()
    tp, tu = torch.from_numpy(prompt), torch.from_numpy(u)
    times = _times(lambda: torch_generate(model, tp, g["new_tokens"], uniforms=tu, use_cache=spec["side"] == "torch",
                                          **kw), 0, 1)
    return {"times": times, "tokens": int(u.size)}


SECTIONS = {"train": {"jax": jax_train, "torch": torch_train, "torch.compile": torch_train},
            "generate": {"jax": generation, "torch": generation, "recompute": generation}}


def run(spec: dict) -> dict:
    threads = spec.get("threads")
    if threads:  # both frameworks size their pools from the affinity mask
        os.sched_setaffinity(0, range(threads))
    if spec["side"] == "jax" and spec["section"] == "train":
        from jaxgpt.cli import tune_host_allocator
        spec["host_allocator"] = tune_host_allocator()  # as scripts/train.py does, before JAX starts
    if spec["side"].startswith("torch") and threads:
        import torch
        torch.set_num_threads(threads)
    before = probe_gflops()
    t = time.perf_counter()
    result = SECTIONS[spec["section"]][spec["side"]](spec)
    result.update(probe_before=before, probe_after=probe_gflops(), wall_s=time.perf_counter() - t,
                  median_s=statistics.median(result["times"]), pid=os.getpid(),
                  max_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  host_allocator=spec.get("host_allocator", ""))
    return result


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
