"""Time to a target loss, as whole processes: `scripts/bench.py --time_to_loss=LOSS` (jaxgpt's recipes
against nanoGPT's CPU recipe in plain PyTorch eager) and `--ablation` (each switch of the modern
recipe on its own, over seeds), `--leave_one_out` (the recipe as shipped less one part) and `--recipes`
(each recipe exactly as a user runs it).

Every contender evaluates the *whole* val split (deterministic windows, jaxgpt.data.eval_windows,
the same on both sides) every `eval_interval` steps and stops at the first evaluation at or below
LOSS. Time to loss = wall clock from launching the process until that evaluation, minus the time
spent in evaluations (each side measures its own and both exclude it): start-up, compilation and
training count, evaluation does not. jaxgpt's compilation cache is warmed by one untimed run.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.harness import ROOT, Figure, figure

# contender -> command-line flags on top of the preset ("pytorch" runs torchref.train)
CONTENDERS: dict[str, list[str]] = {
    "pytorch nanogpt": [],
    "jaxgpt nanogpt": [],
    "jaxgpt modern": ["--recipe=modern"],
}
# the ablation: nanoGPT's CPU recipe with one switch (or Muon) at a time, then the full recipe
ABLATION: dict[str, list[str]] = {
    "nanogpt": [],
    "rope": ["--pos_embedding=rope"],
    "rmsnorm": ["--norm=rmsnorm"],
    "qk_norm": ["--qk_norm=true"],
    "relu2": ["--activation=relu2"],
    "untied head": ["--tie_embeddings=false"],
    "zero-init projections": ["--zero_init_proj=true"],
    "softcap 15": ["--logit_softcap=15"],
    "value embeddings 2": ["--value_embeds=2"],
    "muon": ["--optimizer=muon"],
    "modern (full recipe)": ["--recipe=modern"],
}
# the leave-one-out ablation: the modern recipe as shipped with one part set back to nanoGPT's
LEAVE_ONE_OUT: dict[str, list[str]] = {
    "modern (full recipe)": [],
    "- 2 layers (the preset's 4)": ["--n_layer=4"],  # the CPU preset's depth, at the recipe's batch and steps
    "- rope (learned positions)": ["--pos_embedding=learned"],
    "- rmsnorm (layernorm)": ["--norm=layernorm"],
    "- qk_norm": ["--qk_norm=false"],
    "- relu2 (gelu)": ["--activation=gelu"],
    "- untied head (tied)": ["--tie_embeddings=true"],
    "- zero-init projections": ["--zero_init_proj=false"],
    "- softcap": ["--logit_softcap=0"],
    "- value embeddings": ["--value_embeds=0"],
    "- normuon (plain Muon)": ["--muon_beta2=0"],
    "- bf16 matmuls (float32)": ["--matmul_precision=float32"],  # the same as the recipe where auto is float32
    "- explicit attention (auto)": ["--attention=auto"],  # the same as the recipe off CPU, where fast is auto
    "- the batch in parts (whole)": ["--batch_split=1"],  # the same as the recipe off CPU, where 0 is 1
    "- muon (adamw for all at the recipe's lr)": ["--optimizer=adamw"],
    "- muon (adamw for all at nanoGPT's lr)": ["--optimizer=adamw", "--learning_rate=1e-3", "--min_lr=1e-4"],
}


# the ablation evaluates only once the mean of the last 20 train losses is within this of the target: the
# val loss is above the train loss here, so the skipped evaluations could not have stopped the run (each
# run checks this: its first evaluation must be above the target)
EVAL_GATE_MARGIN = 0.25


def _command(name: str, flags: list[str], out_dir: Path) -> list[str]:
    if name.startswith("pytorch"):
        return [sys.executable, "-m", "torchref.train", *flags, f"--out_dir={out_dir}"]
    return [sys.executable, str(ROOT / "scripts" / "train.py"), "--progress=false", "--plot=false", *flags,
            f"--out_dir={out_dir}"]


def _evaluations(name: str, out_dir: Path, stdout: str) -> list[dict[str, Any]]:
    """The evaluation records (step, val_loss, time, eval_s) a run left: jaxgpt's metrics.jsonl,
    torchref.train's JSON lines."""
    if name.startswith("pytorch"):
        lines = [line for line in stdout.splitlines() if line.startswith('{"step"')]
    else:
        path = out_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
    return [r for r in map(json.loads, lines) if "val_loss" in r and "eval_s" in r]


def run_to_loss(name: str, flags: list[str], loss: float, work: Path, env: dict[str, str], tag: str,
                eval_below: float | None = None) -> dict[str, Any]:
    """One whole process until its first evaluation <= loss (or its last step). `eval_below` (jaxgpt's
    --eval_below) skips the evaluations while the train loss is above it; the run then fails loudly if its
    first evaluation is already <= loss, since the step that first reached it was never evaluated."""
    out_dir = work / f"out-{tag}"
    gate = [] if eval_below is None else [f"--eval_below={eval_below}"]
    launch = time.time()
    proc = subprocess.run(_command(name, [*flags, *gate, f"--stop_loss={loss}"], out_dir), capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=7200)
    wall = time.time() - launch
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
    evals = _evaluations(name, out_dir, proc.stdout)
    shutil.rmtree(out_dir, ignore_errors=True)
    hit = next((r for r in evals if r["val_loss"] <= loss), None)
    if eval_below is not None and evals and evals[0]["val_loss"] <= loss:
        raise RuntimeError(f"{name}: its first evaluation (step {evals[0]['step']}) is already <= {loss}: the "
                           f"evaluation gate opened too late to find the first step; raise EVAL_GATE_MARGIN")
    last = evals[-1] if evals else {"step": 0, "val_loss": float("nan")}
    return {"name": name, "reached": hit is not None, "steps": hit["step"] if hit else None,
            "seconds": hit["time"] - hit["eval_s"] - launch if hit else None, "final_val_loss": last["val_loss"],
            "final_step": last["step"], "wall_s": wall, "eval_s": last.get("eval_s", 0.0)}


def _work() -> tuple[Path, dict[str, str], list[str]]:
    from jaxgpt.data import prepare_shakespeare

    work = Path(tempfile.mkdtemp(prefix="jaxgpt-ttl-"))
    prepare_shakespeare(work / "data")
    return work, {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}, [f"--data_dir={work / 'data'}"]


def _rounds(processes: int, seeds: list[int] | None) -> list[list[str]]:
    """The extra flags of each round: one round per seed (--seed=S), or `processes` rounds of the preset's seed."""
    return [[f"--seed={s}"] for s in seeds] if seeds else [[] for _ in range(processes)]


def _warm(command: list[str], work: Path, env: dict[str, str]) -> None:
    """Run `command` for two steps, untimed, so its programs are in the compilation cache: a returning user's state."""
    subprocess.run([*command, f"--out_dir={work / 'warm'}", "--max_iters=2"], capture_output=True, cwd=ROOT, env=env,
                   timeout=3600, check=True)
    shutil.rmtree(work / "warm", ignore_errors=True)


def _whole_split(stdout: str) -> float:
    """The whole val split's loss train.py prints on its last line."""
    return float(re.findall(r"whole val split ([0-9.]+)", stdout.strip().splitlines()[-1])[0])


def _figures(section: str, runs: dict[str, list[dict[str, Any]]], loss: float, base: str | None) -> list[Figure]:
    out = []
    for name, rs in runs.items():
        hit = [r for r in rs if r["reached"]]
        note = f"{len(hit)}/{len(rs)} runs reached {loss}" + (
            "" if len(hit) == len(rs) else f"; final val {statistics.median(r['final_val_loss'] for r in rs):.4f}")
        if hit:
            out.append(figure(section, f"{name}: seconds to val {loss}", ([r["seconds"] for r in hit]), "s", note))
            out.append(figure(section, f"{name}: steps to val {loss}", ([float(r["steps"]) for r in hit]), "steps",
                              note))
        else:
            out.append(figure(section, f"{name}: val loss at its last step", ([r["final_val_loss"] for r in rs]),
                              "nats", note))
    if base is not None and runs.get(base):
        for name, rs in runs.items():  # per round (seed), where both sides reached the loss
            pairs = [(a["seconds"], b["seconds"]) for a, b in zip(rs, runs[base], strict=True) if a["reached"] and b["reached"]]
            if name != base and pairs:
                left = "" if len(pairs) == len(rs) else f" (in the other {len(rs) - len(pairs)} a side never reached {loss})"
                out.append(figure(section, f"{name} / {base} seconds", ([a / b for a, b in pairs]), "x",
                                  f"{len(pairs)} of {len(rs)} rounds, per-round ratio{left}"))
    return out


def time_to_loss(preset_flags: list[str], loss: float, processes: int, eval_interval: int,
                 log: Callable[[str], None] = print, seeds: list[int] | None = None) -> list[Figure]:
    """The CONTENDERS in alternation (the first rotating), `processes` rounds; with `seeds`, one round
    per seed, every contender run with --seed=S."""
    work, env, data = _work()
    flags = [*preset_flags, *data, "--eval_full=true", f"--eval_interval={eval_interval}"]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    try:
        for name, extra in CONTENDERS.items():  # warm jaxgpt's compilation cache (untimed): the user's steady state
            if not name.startswith("pytorch"):
                run_to_loss(name, [*flags, *extra], 100.0, work, env, "warm")
        rounds = _rounds(processes, seeds)
        for r, seed in enumerate(rounds):
            names = list(CONTENDERS)
            for name in names[r % len(names):] + names[:r % len(names)]:
                result = run_to_loss(name, [*flags, *CONTENDERS[name], *seed], loss, work, env, f"{r}")
                runs[name].append(result)
                log(f"  round {r + 1}/{len(rounds)} {name} {' '.join(seed)}: " + (f"{result['seconds']:.1f} s, {result['steps']} steps"
                    if result["reached"] else f"not reached, val {result['final_val_loss']:.4f}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _figures("time to loss", runs, loss, "pytorch nanogpt")


def ablation(preset_flags: list[str], loss: float, seeds: list[int], eval_interval: int, max_iters: int | None,
             log: Callable[[str], None] = print, only: list[str] | None = None) -> tuple[list[Figure], list[dict]]:
    """Each ABLATION row for every seed (jaxgpt only), up to max_iters steps (None: the preset's or the
    recipe's own); every run's record is returned too."""
    work, env, data = _work()
    rows = {k: v for k, v in ABLATION.items() if not only or k in only}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    records = []
    try:
        run_to_loss("jaxgpt", [*preset_flags, *data, "--eval_full=true", f"--eval_interval={eval_interval}",
                               "--max_iters=2"], 100.0, work, env, "warm")
        for seed in seeds:
            for name, extra in rows.items():
                iters = [f"--max_iters={max_iters}"] if max_iters else []
                flags = [*preset_flags, *data, "--eval_full=true", f"--eval_interval={eval_interval}", f"--seed={seed}",
                         *extra, *iters]
                result = {**run_to_loss(f"jaxgpt {name}", flags, loss, work, env, f"{seed}",
                                        eval_below=loss + EVAL_GATE_MARGIN), "seed": seed, "flags": " ".join(extra + iters)}
                runs[name].append(result)
                records.append(result)
                log(f"  seed {seed} {name}: " + (f"{result['seconds']:.1f} s, {result['steps']} steps" if result["reached"]
                                                  else f"not reached, val {result['final_val_loss']:.4f} at step "
                                                       f"{result['final_step']}"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return _figures("ablation", runs, loss, "nanogpt"), records


def leave_one_out(preset_flags: list[str], seeds: list[int], log: Callable[[str], None] = print,
                  only: list[str] | None = None) -> tuple[list[Figure], list[dict]]:
    """Each LEAVE_ONE_OUT row for every seed: `scripts/train.py --recipe=modern` with one part set back, run
    exactly as a user runs it (the recipe's own steps and its evaluations), one process each; its wall
    clock and the whole val split's loss it prints at the end."""
    work, env, data = _work()
    rows = {k: v for k, v in LEAVE_ONE_OUT.items() if not only or k in only}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in rows}
    base = [sys.executable, str(ROOT / "scripts" / "train.py"), "--progress=false", *preset_flags, "--recipe=modern", *data]
    try:
        for extra in rows.values():  # each row's programs compiled once
            _warm([*base, *extra], work, env)
        for seed in seeds:
            for name, extra in rows.items():
                launch = time.time()
                proc = subprocess.run([*base, *extra, f"--seed={seed}", f"--out_dir={work / 'out'}"], capture_output=True,
                                      text=True, cwd=ROOT, env=env, timeout=7200)
                wall = time.time() - launch
                shutil.rmtree(work / "out", ignore_errors=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                whole = _whole_split(proc.stdout)
                runs[name].append({"row": name, "flags": " ".join(extra), "seed": seed, "wall_s": wall, "val_loss_full": whole})
                log(f"  seed {seed} {name}: {wall:.1f} s, whole val split {whole:.4f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for name, rs in runs.items():
        out.append(figure("leave one out", f"{name}: whole-split val loss", [r["val_loss_full"] for r in rs], "nats",
                          "per seed " + ", ".join(f"{r['val_loss_full']:.4f}" for r in rs)))
        out.append(figure("leave one out", f"{name}: wall clock", [r["wall_s"] for r in rs], "s"))
    return out, [r for rs in runs.values() for r in rs]


def _pytorch_whole_split(out_dir: Path, stdout: str) -> float:
    """torchref.train's final model (its ckpt.pt, saved at the last evaluation when it improved) scored on
    the whole val split after its process has ended, so the timed command stays nanoGPT's own; nan when the
    last evaluation did not improve (the file holds an earlier step)."""
    import torch

    from jaxgpt.config import GPTConfig
    from jaxgpt.loader import dataset_dir
    from torchref.model import GPT
    from torchref.train import full_split_loss

    ckpt = torch.load(out_dir / "ckpt.pt", map_location="cpu", weights_only=True)
    if ckpt["iter_num"] != int(re.findall(r"done: (\d+) steps", stdout)[-1]):
        return float("nan")
    cfg = GPTConfig(**ckpt["model_args"])
    model = GPT(cfg)
    model.load_state_dict(ckpt["model"])
    model.eval()
    data = dataset_dir(str(out_dir.parent / "data"), "shakespeare")
    return full_split_loss(model, np.fromfile(data / "val.bin", dtype=np.uint8), cfg.block_size)


def recipes_as_run(preset_flags: list[str], processes: int, log: Callable[[str], None] = print,
                   seeds: list[int] | None = None) -> list[Figure]:
    """Each recipe run exactly as a user runs it — `scripts/train.py --preset=cpu [--recipe=modern]` and
    nanoGPT's CPU recipe in PyTorch eager (`python -m torchref.train --preset=cpu`) — as whole processes,
    alternating: wall clock, the final val loss each prints (its own eval_iters-batch estimate) and the
    whole val split's (jaxgpt prints it; PyTorch's final model is scored after its process, untimed).
    With `seeds`, one round per seed, every contender run with --seed=S."""
    work, env, data = _work()
    commands = {"pytorch nanogpt": [sys.executable, "-m", "torchref.train", *preset_flags, *data],
                "jaxgpt nanogpt": [sys.executable, str(ROOT / "scripts" / "train.py"), "--progress=false", *preset_flags, *data],
                "jaxgpt modern": [sys.executable, str(ROOT / "scripts" / "train.py"), "--progress=false", *preset_flags,
                                  "--recipe=modern", *data]}
    rounds = _rounds(processes, seeds)
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in commands}
    try:
        for name, cmd in commands.items():  # jaxgpt's compilation cache warmed
            if not name.startswith("pytorch"):
                _warm(cmd, work, env)
        for r, seed in enumerate(rounds):
            names = list(commands)
            for name in names[r % len(names):] + names[:r % len(names)]:
                launch = time.time()
                out_dir = work / f"out-{r}-{name.replace(' ', '-')}"
                proc = subprocess.run([*commands[name], *seed, f"--out_dir={out_dir}"], capture_output=True,
                                      text=True, cwd=ROOT, env=env, timeout=7200)
                wall = time.time() - launch
                if proc.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
                if name.startswith("jaxgpt"):
                    estimate = float(re.findall(r"val loss ([0-9.]+)", proc.stdout.strip().splitlines()[-1])[0])
                    whole = _whole_split(proc.stdout)
                else:
                    estimate = float(re.findall(r"val ([0-9.]+)", [ln for ln in proc.stdout.splitlines() if ", val " in ln][-1])[0])
                    whole = _pytorch_whole_split(out_dir, proc.stdout)
                runs[name].append((wall, estimate, whole))
                log(f"  round {r + 1}/{len(rounds)} {name} {' '.join(seed)}: {wall:.1f} s, final val loss {estimate:.4f} "
                    f"(whole split {whole:.4f})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = []
    for name, rs in runs.items():
        out.append(figure("recipes as run", f"{name}: wall clock", [w for w, _, _ in rs], "s"))
        out.append(figure("recipes as run", f"{name}: final val loss", [v for _, v, _ in rs], "nats", "its own estimate"))
        out.append(figure("recipes as run", f"{name}: final val loss, whole split", [v for _, _, v in rs], "nats",
                          "every seed: " + ", ".join(f"{v:.4f}" for _, _, v in rs)))
    base = runs["pytorch nanogpt"]
    for name in ("jaxgpt nanogpt", "jaxgpt modern"):
        out.append(figure("recipes as run", f"{name} / pytorch nanogpt wall clock",
                          [a[0] / b[0] for a, b in zip(runs[name], base, strict=True)], "x", "per round"))
    return out
