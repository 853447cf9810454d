"""Benchmark jaxgpt against torchref on this machine: train step, tokens/s, MFU, compile time,
memory per remat policy, generation speed. Prints a markdown table and one JSON line per figure.

  python scripts/bench.py --preset=cpu                       # nanoGPT's CPU config
  python scripts/bench.py --sections=memory --preset=gpu     # remat memory at block 256, batch 64
"""
import argparse
import dataclasses
import datetime
import json
import platform

import jax

from jaxgpt import GPTConfig, TrainConfig, cli
from jaxgpt.config import PRESETS, build, make_parser
from jaxgpt.errors import UserError

SECTIONS = ("train", "memory", "generate")


def main(argv: list[str]) -> int:
    p = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    p.add_argument("--sections", default="train,memory,generate", help="comma-separated subset of " + ",".join(SECTIONS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--torch_compile", action="store_true", help="also time torchref under torch.compile")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--new_tokens", type=int, default=500)
    p.add_argument("--prompt_len", type=int, default=12)
    p.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="time nanoGPT's recomputing loop too (slow)")
    args = p.parse_args(argv)
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        raise UserError(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")
    base = PRESETS[args.preset]
    cfg = dataclasses.replace(build(GPTConfig, args, base), dropout=0.0)  # dropout off: same math in both
    tc = build(TrainConfig, args, base)

    from parity import bench  # heavy imports after argument checks
    figures = []
    if "train" in sections:
        figures += bench.train_figures(cfg, tc, args.warmup, args.iters, args.torch_compile)
    if "memory" in sections:
        figures += bench.memory_figures(cfg, tc, max(1, args.warmup // 2), max(2, args.iters // 3))
    if "generate" in sections:
        fit = dataclasses.replace(cfg, block_size=max(cfg.block_size, args.prompt_len + args.new_tokens))
        for gen_cfg in ([fit, cfg] if fit != cfg else [cfg]):
            figures += bench.generation_figures(gen_cfg, args.num_samples, args.new_tokens, args.prompt_len,
                                                args.recompute)
    device = jax.devices()[0]
    context = {"device": f"{device.platform}:{device.device_kind}", "host": platform.processor() or platform.machine(),
               "date": datetime.date.today().isoformat(), "model": cfg.to_dict(),
               "batch_size": tc.batch_size, "accum": tc.gradient_accumulation_steps, "dtype": tc.dtype,
               "remat": tc.remat, "jax": jax.__version__}
    print(f"config: {json.dumps(context)}\n")
    print(bench.markdown(figures))
    print()
    for f in figures:
        print(json.dumps({**dataclasses.asdict(f), **context}))
    return 0


if __name__ == "__main__":
    cli.run(main)
