"""The benchmark harness behind scripts/bench.py: jaxgpt against torchref on the same machine,
same config, same weights and batch, as ratios from one run of the harness.

Each contender runs in its own fresh process (benchmarks/workers.py), the contenders in
alternation for several rounds, the starting one rotating; every figure is reported as min /
median / max over processes, and a ratio as the per-round ratios' min / median / max. Each
process also measures a numpy matmul probe before and after: a process whose probe falls below
SLOW_PROBE x the run's median ran in a slow moment of the machine and is flagged (and the
medians are shown without it as well), instead of being averaged in silently.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from jaxgpt.config import GPTConfig, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
SLOW_PROBE = 0.8


@dataclass
class Figure:
    section: str
    name: str
    value: float
    unit: str
    note: str = ""
    low: float | None = None  # min over processes (or rounds)
    high: float | None = None  # max


def machine() -> dict:
    """What a figure from this machine is a fact about."""
    info: dict = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(), "machine": platform.machine(),
                  "cores": os.cpu_count(), "usable_cores": len(os.sched_getaffinity(0))}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        info["cpu"] = re.search(r"model name\s*:\s*(.*)", cpuinfo).group(1).strip()
    except (OSError, AttributeError):
        info["cpu"] = platform.processor() or "unknown"
    caches = {}
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            level, kind = (index / "level").read_text().strip(), (index / "type").read_text().strip()
            caches[f"L{level}{'d' if kind == 'Data' else 'i' if kind == 'Instruction' else ''}"] = (index / "size").read_text().strip()
        except OSError:
            continue
    info["caches"] = caches
    from importlib.metadata import PackageNotFoundError, version
    for name in ("jax", "jaxlib", "flax", "torch"):
        try:
            info[name] = version(name)
        except PackageNotFoundError:
            pass
    return info


def worker(spec: dict, timeout: float = 3600) -> dict:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.workers", json.dumps(spec)], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark worker {spec['section']}/{spec['side']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(specs: dict[str, dict], processes: int, log=print) -> dict[str, list[dict]]:
    """Run every contender `processes` times in fresh processes: round r starts at contender r."""
    names = list(specs)
    runs: dict[str, list[dict]] = {n: [] for n in names}
    for r in range(processes):
        for name in names[r % len(names):] + names[:r % len(names)]:
            result = worker(specs[name])
            runs[name].append(result)
            log(f"  round {r + 1}/{processes} {name}: {result['median_s'] * 1e3:.1f} ms "
                f"(probe {result['probe_before']:.0f}/{result['probe_after']:.0f} GFLOP/s)")
    return runs


def slow_processes(runs: dict[str, list[dict]]) -> set[int]:
    """pids whose numpy probe (the lower of before/after) fell below SLOW_PROBE x the run's median."""
    probes = {r["pid"]: min(r["probe_before"], r["probe_after"]) for rs in runs.values() for r in rs}
    middle = statistics.median(probes.values())
    return {pid for pid, p in probes.items() if p < SLOW_PROBE * middle}


def spread(values: list[float]) -> tuple[float, float, float]:
    return min(values), statistics.median(values), max(values)


def figure(section: str, name: str, values: list[float], unit: str, note: str = "", scale: float = 1.0) -> Figure:
    lo, mid, hi = spread([v * scale for v in values])
    return Figure(section, name, mid, unit, note, lo, hi)


def compare(section: str, runs: dict[str, list[dict]], base: str, other: str, slow: set[int]) -> list[Figure]:
    """Per-round ratios base/other of the median step times, with and without slow processes."""
    pairs = list(zip(runs[base], runs[other], strict=True))
    out = [figure(section, f"{base} / {other} time", [a["median_s"] / b["median_s"] for a, b in pairs], "x",
                   f"{len(pairs)} rounds, per-round ratio")]
    clean = [(a, b) for a, b in pairs if a["pid"] not in slow and b["pid"] not in slow]
    if slow and clean:
        out.append(figure(section, f"{base} / {other} time, without slow processes",
                           [a["median_s"] / b["median_s"] for a, b in clean], "x", f"{len(clean)} rounds"))
    return out


def train_specs(cfg: GPTConfig, tc: TrainConfig, warmup: int, iters: int, threads: int | None,
                torch_compile: bool) -> dict[str, dict]:
    base = {"section": "train", "model": dataclasses.asdict(cfg), "train": dataclasses.asdict(tc), "warmup": warmup,
            "iters": iters, "threads": threads}
    sides = ["jax", "torch"] + (["torch.compile"] if torch_compile else [])
    return {side: {**base, "side": side} for side in sides}


def train_figures(runs: dict[str, list[dict]], slow: set[int], peak: float | None) -> list[Figure]:
    out = []
    for name, rs in runs.items():
        out.append(figure("train", f"{name} step", [r["median_s"] for r in rs], "ms", scale=1e3))
        out.append(figure("train", f"{name} compile / first step", [r["compile_s"] for r in rs], "s"))
        out.append(figure("train", f"{name} page faults per step", [r["page_faults_per_step"] for r in rs], ""))
    jax_runs = runs["jax"]
    if peak:
        out.append(figure("train", "jaxgpt MFU", [r["flops_per_step"] / r["median_s"] / peak for r in jax_runs], "%",
                           f"of {peak / 1e12:.3g} TFLOP/s", scale=100))
    out.append(Figure("train", "jaxgpt resolved remat / dtype", 0, "", f"{jax_runs[0]['remat']} / {jax_runs[0]['dtype']}"))
    for other in [n for n in runs if n != "jax"]:
        out += compare("train", runs, "jax", other, slow)
    return out


def memory_figures(cfg: GPTConfig, tc: TrainConfig, warmup: int, iters: int, processes: int, threads: int | None,
                   log=print) -> list[Figure]:
    """XLA's temporaries and the step time per remat policy, each policy in its own processes."""
    specs = {r: {**train_specs(cfg, dataclasses.replace(tc, remat=r), warmup, iters, threads, False)["jax"]}
             for r in ("none", "dots", "full")}
    runs = alternate(specs, processes, log)
    out = []
    for r, rs in runs.items():
        out.append(Figure("memory", f"remat={r} temp memory", rs[0]["temp_bytes"] / 2**20, "MiB"))
        out.append(figure("memory", f"remat={r} step", [x["median_s"] for x in rs], "ms", scale=1e3))
    out.append(Figure("memory", "none/full temp memory", runs["none"][0]["temp_bytes"] / runs["full"][0]["temp_bytes"], "x"))
    out += compare("memory", runs, "none", "full", slow_processes(runs))
    return out


def generation_figures(cfg: GPTConfig, gen: dict, processes: int, recompute: bool, threads: int | None,
                       log=print) -> list[Figure]:
    base = {"section": "generate", "model": dataclasses.asdict(cfg), "train": {}, "generate": gen, "threads": threads}
    sides = ["jax", "torch"] + (["recompute"] if recompute else [])
    runs = alternate({s: {**base, "side": s} for s in sides}, processes, log)
    where = (f"block {cfg.block_size}, {gen['num_samples']} x {gen['new_tokens']} tokens, prompt {gen['prompt_len']}"
             + (" (past block_size)" if gen["prompt_len"] + gen["new_tokens"] > cfg.block_size else ""))
    out = [figure("generate", f"{s} tokens/s", [r["tokens"] / r["median_s"] for r in rs], "tok/s", where)
           for s, rs in runs.items()]
    out.append(figure("generate", "jax first call (compile + run)", [r["compile_s"] for r in runs["jax"]], "s", where))
    for other in sides[1:]:
        out += [dataclasses.replace(f, name=f"{other} / jax time") for f in compare("generate", runs, other, "jax", set())]
    return out


def _time_commands(commands: dict[str, Callable[[int], list[str]]], processes: int, env: dict,
                   log: Callable[[str], None]) -> dict[str, list[float]]:
    """Wall time of each command (given the round number) in fresh processes, the contenders in
    alternation, the one going first rotating every round."""
    times: dict[str, list[float]] = {k: [] for k in commands}
    for r in range(processes):
        for name in list(commands)[r % 2:] + list(commands)[:r % 2]:
            t = time.perf_counter()
            proc = subprocess.run(commands[name](r), capture_output=True, text=True, cwd=ROOT, env=env, timeout=7200)
            times[name].append(time.perf_counter() - t)
            if proc.returncode != 0:
                raise RuntimeError(f"{name} run failed:\n{proc.stderr[-3000:]}")
            log(f"  round {r + 1}/{processes} {name}: {times[name][-1]:.1f} s")
    return times


def _wall_figures(section: str, times: dict[str, list[float]], note: str) -> list[Figure]:
    (a, ta), (b, tb) = times.items()
    out = [figure(section, f"{k} wall time", v, "s", note) for k, v in times.items()]
    out.append(figure(section, f"{a} / {b} wall time", [x / y for x, y in zip(ta, tb, strict=True)], "x",
                       f"{len(ta)} rounds, per-round"))
    return out


def whole_process(train_args: list[str], processes: int, log: Callable[[str], None] = print) -> list[Figure]:
    """`scripts/train.py ARGS` against `python -m torchref.train ARGS` (plain PyTorch eager, the
    same training), as whole processes: wall time including start-up, compilation and evals.
    jaxgpt's compilation cache starts empty, so its first round compiles and later ones reuse.
    Without --data_dir in ARGS, Tiny Shakespeare is prepared in a temporary folder first."""
    from jaxgpt.data import prepare_shakespeare

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-bench-"))
    try:
        if not any(a.startswith("--data_dir=") for a in train_args):
            prepare_shakespeare(work / "data")
            train_args = [*train_args, f"--data_dir={work / 'data'}"]
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        jax_cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--progress=false", "--plot=false", *train_args]
        torch_cmd = [sys.executable, "-m", "torchref.train", *train_args]
        times = _time_commands({"jaxgpt": lambda r: [*jax_cmd, f"--out_dir={work / f'out-jaxgpt-{r}'}"],
                                "pytorch": lambda r: [*torch_cmd, f"--out_dir={work / f'out-pytorch-{r}'}"]},
                               processes, env, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _wall_figures("whole process", times, "scripts/train.py " + " ".join(train_args))


def whole_process_generation(cfg: GPTConfig, gen: dict, processes: int,
                             log: Callable[[str], None] = print) -> list[Figure]:
    """`scripts/generate.py` (its compilation cache warmed by one untimed run) against
    nanoGPT-style sampling (`python -m torchref.sample`: PyTorch eager, one sample at a time, the
    cropped context recomputed every token) as whole processes, on the same random-init ckpt.pt."""
    from flax import nnx

    from formats.io import save_pt
    from jaxgpt.model import GPT

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-bench-"))
    try:
        ckpt = work / "ckpt.pt"
        save_pt(GPT(cfg, rngs=nnx.Rngs(0)), ckpt, {})
        env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
        sampling = [f"--num_samples={gen['num_samples']}", f"--max_new_tokens={gen['new_tokens']}",
                    "--prompt=" + ("KING RICHARD III:" * 8)[:gen["prompt_len"]]]
        jax_cmd = [sys.executable, str(ROOT / "scripts" / "generate.py"), f"--checkpoint={ckpt}", *sampling,
                   "--no-stream", "--progress=false"]
        subprocess.run(jax_cmd, capture_output=True, cwd=ROOT, env=env, timeout=3600, check=True)  # warm the cache
        times = _time_commands({"jaxgpt": lambda r: jax_cmd,
                                "pytorch": lambda r: [sys.executable, "-m", "torchref.sample", str(ckpt), *sampling]},
                               processes, env, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    note = f"block {cfg.block_size}, {gen['num_samples']} x {gen['new_tokens']} new tokens, warm cache"
    return _wall_figures(f"whole-process generation, block {cfg.block_size}", times, note)


def markdown(figures: list[Figure]) -> str:
    lines = ["| section | figure | median | min | max | unit | note |", "|---|---|---|---|---|---|---|"]
    fmt = lambda v: "" if v is None else f"{v:.4g}"  # noqa: E731
    lines += [f"| {f.section} | {f.name} | {fmt(f.value) if f.unit or f.value else ''} | {fmt(f.low)} | {fmt(f.high)} | "
              f"{f.unit} | {f.note} |" for f in figures]
    return "\n".join(lines)
