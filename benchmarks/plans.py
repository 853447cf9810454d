"""`python scripts/bench.py --plans`: README's "Before you rent a chip" table, every cell one
`scripts/train.py ... --target=T --compile_only --json` run by the virtualenv that holds T's
compiler (.ci/aot builds .venv-tpu and .venv-gpu), so each figure is the real compiler's.
"""
from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# rows: the seed config as users run it, the modern recipe at that size, and GPT-2's four shapes
# (vocabulary 50304, context 1024, GPT-2's batch of 512 sequences split by --batch_size=auto) with
# weights and optimizer state sharded over every chip of the machine (--mesh_fsdp = its devices)
GPT2 = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280), "1.5B": (48, 25, 1600)}
ROWS: dict[str, list[str]] = {"seed config (6 x 384, block 256, batch 64)": [],
                              "modern recipe (seed size)": ["--recipe=modern"]}
ROWS.update({f"GPT-2 {name} (FSDP, batch 512 x 1024)": [f"--n_layer={L}", f"--n_head={H}", f"--n_embd={C}",
                                                        "--block_size=1024", "--vocab_size=50304", "--dropout=0",
                                                        "--mesh_fsdp={devices}", "--batch_size=auto",
                                                        "--gradient_accumulation_steps=8"]  # 64 x 8 sequences
             for name, (L, H, C) in GPT2.items()})
# --preset=gpt2 as a user runs it (jaxgpt.presets.PRESETS): 524,288 tokens a step split by the compiler,
# FSDP over every chip of the machine; `--rows=preset` with the GPUs people own as --targets
ROWS["GPT-2 124M, --preset=gpt2"] = ["--preset=gpt2", "--mesh_fsdp={devices}"]
TARGETS = ("v5e-8", "v6e-8", "h100x8")
TOKENS = 10e9  # the last column: the preset's 10 B tokens at the roofline bound


def python_for(target: str, tpu_python: str, gpu_python: str) -> str:
    from jaxgpt.plan.targets import parse

    return tpu_python if parse(target).platform == "tpu" else gpu_python


def cell(flags: list[str], target: str, python: str) -> dict:
    from jaxgpt.plan.targets import parse

    flags = [f.format(devices=parse(target).devices) for f in flags]
    proc = subprocess.run([python, str(ROOT / "scripts" / "train.py"), *flags, f"--target={target}", "--compile_only",
                           "--json"], capture_output=True, text=True, timeout=3600)
    if proc.returncode not in (0, 1):
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    report = json.loads(proc.stdout)
    if proc.returncode == 1:
        report["error"] = proc.stderr.strip().splitlines()[-1]
    return report


def row_text(name: str, target: str, r: dict) -> str:
    from jaxgpt.platform import gib

    if "programs" not in r:
        return f"| {name} | {target} | error | {r['error']} | | | | | |"
    t = r["programs"]["train_step"]
    if not r["fits"]:
        return f"| {name} | {target} | **no** | {r['error'].removeprefix('error: ')} | | | | | |"
    bound = t.get("step_time_lower_bound_s")
    return (f"| {name} | {target} | yes | {gib(t['per_device_bytes']['total'])} of {gib(r['device_memory_bytes'])} | "
            f"remat={t['remat']}, {t['per_device_batch']}/chip x {t['gradient_accumulation_steps']} | "
            f"{r['compile_s']:.0f} s | {t['flops_per_step'] / 1e12:.2f} ({t['flops_source'].split(' ')[0]}) | "
            + (f"{_ms(bound)}, {t['tokens_per_s_upper_bound'] / 1e6:.3g} M tok/s | "
               f"{TOKENS / t['tokens_per_s_upper_bound'] / 3600:.3g} h |" if bound else "| |"))


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.0f} ms" if ms >= 100 else f"{ms:.3g} ms"


def table(tpu_python: str, gpu_python: str, targets: tuple[str, ...] = TARGETS,
          rows: dict[str, list[str]] | None = None, log: Callable[[str], None] = print) -> str:
    lines = ["| model | target | fits | memory per chip (train step) | remat, batch chosen | compile (chosen programs) | TFLOP per step | "
             "roofline bound (estimate) | 10 B tokens at the bound |", "|---|---|---|---|---|---|---|---|---|"]
    for name, flags in (rows or ROWS).items():
        for target in targets:
            log(f"plan: {name} on {target}")
            lines.append(row_text(name, target, cell(flags, target, python_for(target, tpu_python, gpu_python))))
            log(lines[-1])
    return "\n".join(lines)

