"""Benchmark jaxgpt against torchref on this machine: train step (time, tokens/s, MFU, compile
time, page faults), memory and time per remat policy, generation speed, whole processes. Each
contender runs in fresh processes, alternating; figures are min / median / max over them.

  python scripts/bench.py --preset=cpu                            # train step, memory, generation
  python scripts/bench.py --preset=cpu --sections=train --remat=none --processes=7
  python scripts/bench.py --preset=cpu --whole_process --max_iters=600 --sections=train     # train.py vs PyTorch eager
  python scripts/bench.py --preset=cpu --whole_process --sections=generate   # generate.py vs nanoGPT-style sampling
  python scripts/bench.py --preset=cpu --time_to_loss=1.8857 --processes=3   # seconds to a val loss: recipes vs PyTorch
  python scripts/bench.py --preset=cpu --time_to_loss=1.8857 --ablation --seeds=1337,1338,1339 --eval_every=50   # each switch alone
  python scripts/bench.py --preset=cpu --recipes --processes=3    # each recipe exactly as run: wall clock, val loss
  python scripts/bench.py --preset=cpu --recipes --seeds=1337,1338,1339   # the same, a round per seed
  python scripts/bench.py --preset=cpu --leave_one_out --seeds=1337,1338,1339   # the recipe less one part at a time
  python scripts/bench.py --preset=cpu --sections=serve --processes=3     # the server: 1 vs 16 clients, first token
  python scripts/bench.py --validate                              # on a GPU/TPU host: the checklist
  python scripts/bench.py --plans                                 # compiled plans for v5e-8, v6e-8, h100x8 (.ci/aot's venvs)
  python scripts/bench.py --threads=4                             # both frameworks on 4 cores
  python scripts/bench.py --sections=data --data_mb=1000          # prepare.py (1, 2 workers) vs a plain process pool; the loader
"""
import argparse
import dataclasses
import json
import sys
from typing import Any

from jaxgpt import GPTConfig, TrainConfig, cli
from jaxgpt.config import build, explicit_flags, make_parser
from jaxgpt.errors import UserError
from jaxgpt.presets import base_values

SECTIONS = ("train", "memory", "generate", "serve", "data")


def generation_configs(cfg: GPTConfig, gen: dict) -> list[GPTConfig]:
    """Generation is timed twice: with a context that holds prompt and every new token (the KV
    cache all the way), and at the model's own block_size (past it, every step recomputes)."""
    fit = dataclasses.replace(cfg, block_size=max(cfg.block_size, gen["prompt_len"] + gen["new_tokens"]))
    return [fit, cfg] if fit != cfg else [cfg]


def _rows(text: str, known: dict) -> list[str] | None:
    """--rows as a list of names of `known` (None: all of them); an unknown name is one error line."""
    rows = [r.strip() for r in text.split(",") if r.strip()] or None
    if unknown := set(rows or []) - set(known):
        raise UserError(f"unknown --rows {sorted(unknown)}; choose from {list(known)}")
    return rows


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    if args.plans:
        from benchmarks.plans import ROWS, table
        rows = {k: v for k, v in ROWS.items() if not args.rows or any(r.strip() in k for r in args.rows.split(","))}
        print(table(args.tpu_python, args.gpu_python, tuple(t.strip() for t in args.targets.split(",")), rows, log=log))
        return 0
    sections = args.sections.split(",")
    if unknown := set(sections) - set(SECTIONS):
        raise UserError(f"unknown --sections {sorted(unknown)}; choose from {SECTIONS}")
    if args.processes < 1 or args.iters < 1 or args.warmup < 0:
        raise UserError("--processes and --iters must be >= 1 and --warmup >= 0")
    base = base_values(args.preset, args.recipe or "nanogpt")
    cfg = dataclasses.replace(build(GPTConfig, args, base), dropout=0.0)  # dropout off: the same math on both sides
    tc = build(TrainConfig, args, base)
    try:
        seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None
    except ValueError:
        raise UserError(f"--seeds must be comma-separated integers like 1337,1338, got {args.seeds!r}") from None

    from benchmarks import harness as bench  # heavy imports after argument checks
    info = bench.machine()
    if args.leave_one_out or args.recipes or args.time_to_loss is not None or args.ablation:
        figures = _time_to_quality(args, seeds, log)
    elif args.validate:
        from benchmarks.validate import validate
        figures = validate(build(GPTConfig, args, base), tc, args.validate_parity.split(","), log)
    elif args.whole_process:
        figures = _whole_processes(args, cfg, sections, log)
    else:
        figures = _sections(args, cfg, tc, sections, info, log)
    return _print(figures, info, cfg, tc, args)


def _parser() -> argparse.ArgumentParser:
    p = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    b = p.add_argument_group("benchmark")
    b.add_argument("--sections", default="train,memory,generate", help="comma-separated subset of " + ",".join(SECTIONS) +
                   " (serve: scripts/serve.py under 1 and 16 streaming clients, benchmarks/serve.py)")
    b.add_argument("--processes", type=int, default=5, help="fresh processes per contender (default: %(default)s)")
    b.add_argument("--warmup", type=int, default=3)
    b.add_argument("--iters", type=int, default=20, help="timed steps per process (default: %(default)s)")
    b.add_argument("--threads", type=int, help="pin both frameworks to this many cores (default: all)")
    b.add_argument("--torch_compile", action="store_true", help="also time torchref under torch.compile")
    b.add_argument("--num_samples", type=int, default=10)
    b.add_argument("--new_tokens", type=int, default=500)
    b.add_argument("--prompt_len", type=int, default=12)
    b.add_argument("--recompute", action=argparse.BooleanOptionalAction, default=True,
                   help="time nanoGPT's recomputing sampler too (slow)")
    b.add_argument("--whole_process", action="store_true",
                   help="whole processes instead: scripts/train.py against the same training in PyTorch eager "
                        "(section train), scripts/generate.py against nanoGPT-style sampling (section generate)")
    b.add_argument("--time_to_loss", type=float, metavar="LOSS",
                   help="whole processes until the first whole-val-split evaluation <= LOSS: jaxgpt's nanogpt and modern "
                        "recipes against nanoGPT's in PyTorch eager (benchmarks/time_to_loss.py)")
    b.add_argument("--ablation", action="store_true", help="with --time_to_loss: each switch of the modern recipe alone")
    b.add_argument("--recipes", action="store_true",
                   help="train.py --recipe=nanogpt and =modern against nanoGPT's recipe in PyTorch, each run exactly as "
                        "a user runs it: whole-process wall clock and final val loss")
    b.add_argument("--leave_one_out", action="store_true",
                   help="the modern recipe as run with one part at a time set back to nanoGPT's, over --seeds")
    b.add_argument("--seeds", default="", help="comma-separated seeds: --ablation and --leave_one_out (default 1337), "
                                              "--time_to_loss and --recipes (a round per seed instead of --processes)")
    b.add_argument("--rows", default="", help="--ablation / --leave_one_out: comma-separated rows of benchmarks."
                                              "time_to_loss.ABLATION / LEAVE_ONE_OUT (default: all); --plans: rows "
                                              "whose name contains one of these")
    b.add_argument("--eval_every", type=int, default=50, help="--time_to_loss: steps between evaluations (default: %(default)s)")
    b.add_argument("--data_mb", type=float, default=1000, help="--sections=data: the corpus's size in MB (default: %(default)s)")
    b.add_argument("--data_shard_tokens", type=int, default=20_000_000,
                   help="--sections=data: tokens in each of the loader's 4 shards (default: %(default)s)")
    b.add_argument("--data_workers", default="1,2", help="--sections=data: worker counts to time (default: %(default)s)")
    b.add_argument("--data_txt_mb", type=float, default=300, help="--sections=data: one .txt of this many MB, for memory "
                                                                 "(0: skip; default: %(default)s)")
    b.add_argument("--validate", action="store_true", help="the accelerator checklist (see benchmarks/validate.py)")
    b.add_argument("--validate_parity", default="model,generation,training,bf16",
                   help="--validate: parity groups to run on the device")
    b.add_argument("--plans", action="store_true",
                   help="README's 'Before you rent a chip' table: train.py --target=T --compile_only for the seed config, "
                        "the modern recipe and GPT-2's four shapes (benchmarks/plans.py), each by its compiler's virtualenv")
    b.add_argument("--targets", default="v5e-8,v6e-8,h100x8", help="--plans: comma-separated targets (default: %(default)s)")
    b.add_argument("--tpu_python", default=".venv-tpu/bin/python", help="--plans: a python with jaxgpt[tpu] (.ci/aot builds it)")
    b.add_argument("--gpu_python", default=".venv-gpu/bin/python", help="--plans: a python with jaxgpt[gpu]")
    return p


def _time_to_quality(args: argparse.Namespace, seeds: list[int] | None, log: Any) -> list:
    """--leave_one_out, --recipes, --time_to_loss (with --ablation): whole training runs to a loss."""
    from benchmarks import time_to_loss as ttl
    if args.leave_one_out:
        figures, records = ttl.leave_one_out([f"--preset={args.preset}"], seeds or [1337], log,
                                             only=_rows(args.rows, ttl.LEAVE_ONE_OUT))
    elif args.recipes:
        return ttl.recipes_as_run([f"--preset={args.preset}"], args.processes, log, seeds)
    elif args.time_to_loss is None:
        raise UserError("--ablation needs --time_to_loss=LOSS (the loss each run must reach)")
    elif args.ablation:
        preset_flags = [f"--preset={args.preset}"] + [f"--{k}={v}" for k, v in explicit_flags(args, GPTConfig).items()]
        figures, records = ttl.ablation(preset_flags, args.time_to_loss, seeds or [1337], args.eval_every, args.max_iters,
                                        log, only=_rows(args.rows, ttl.ABLATION))
    else:
        preset_flags = [f"--preset={args.preset}"] + [f"--{k}={v}" for k, v in explicit_flags(args, GPTConfig).items()]
        return ttl.time_to_loss(preset_flags, args.time_to_loss, args.processes, args.eval_every, log, seeds)
    for record in records:
        print(json.dumps({"run": record}))
    return figures


def _whole_processes(args: argparse.Namespace, cfg: GPTConfig, sections: list[str], log: Any) -> list:
    """--whole_process: train.py against PyTorch eager, generate.py against nanoGPT-style sampling."""
    from benchmarks import harness as bench
    figures = []
    if "train" in sections:
        flags = [f"--preset={args.preset}"] + [f"--{k}={v}" for k, v in {**explicit_flags(args, GPTConfig),
                                                                           **explicit_flags(args, TrainConfig)}.items()]
        figures += bench.whole_process(flags, args.processes, log)
    if "generate" in sections:
        for gen_cfg in generation_configs(cfg, _gen(args)):
            log(f"whole-process generation, block {gen_cfg.block_size}:")
            figures += bench.whole_process_generation(gen_cfg, _gen(args), args.processes, log)
    return figures


def _gen(args: argparse.Namespace) -> dict:
    return dict(num_samples=args.num_samples, new_tokens=args.new_tokens, prompt_len=args.prompt_len)


def _sections(args: argparse.Namespace, cfg: GPTConfig, tc: TrainConfig, sections: list[str], info: dict, log: Any) -> list:
    """The in-process sections: train step, memory per remat policy, generation, data, serving."""
    from benchmarks import harness as bench
    from jaxgpt.plan.perf import device_peak_flops
    peak, how = device_peak_flops()
    info["peak"] = f"{peak / 1e12:.3g} TFLOP/s ({how})" if peak else how
    figures = []
    if "train" in sections:
        log("train step:")
        runs = bench.alternate(bench.train_specs(cfg, tc, args.warmup, args.iters, args.threads, args.torch_compile),
                               args.processes, log)
        slow = bench.slow_processes(runs)
        figures += bench.train_figures(runs, slow, peak)
        info["slow_processes"] = f"{len(slow)} of {sum(len(v) for v in runs.values())} (probe < {bench.SLOW_PROBE} x median)"
    if "memory" in sections:
        log("memory per remat policy:")
        figures += bench.memory_figures(cfg, tc, max(1, args.warmup // 2), max(3, args.iters // 2),
                                        args.processes, args.threads, log)
    if "generate" in sections:
        for gen_cfg in generation_configs(cfg, _gen(args)):
            log(f"generation, block {gen_cfg.block_size}:")
            figures += bench.generation_figures(gen_cfg, _gen(args), args.processes, args.recompute, args.threads, log)
    if "data" in sections:
        from benchmarks.data import loader_figures, prepare_figures
        log("data:")
        figures += loader_figures(log, shard_tokens=args.data_shard_tokens)
        if args.data_mb:
            figures += prepare_figures(args.data_mb, [int(w) for w in args.data_workers.split(",")], args.data_txt_mb, log)
    if "serve" in sections:
        from benchmarks.serve import decode_widths, serve_figures
        log("serving:")
        figures += decode_widths(cfg, log=log)
        figures += serve_figures(cfg, rounds=args.processes, log=log)
    return figures


def _print(figures: list, info: dict, cfg: GPTConfig, tc: TrainConfig, args: argparse.Namespace) -> int:
    """The machine and config, the markdown table, then one JSON line per figure; 1 when a check failed."""
    from benchmarks import harness as bench
    context = {**info, "model": cfg.to_dict(), "batch_size": tc.batch_size, "accum": tc.gradient_accumulation_steps,
               "dtype": tc.dtype, "remat": tc.remat, "threads": args.threads or "all"}
    print(f"machine and config: {json.dumps(context)}\n")
    print(bench.markdown(figures))
    print()
    print(json.dumps({"context": context}))
    for f in figures:
        print(json.dumps(dataclasses.asdict(f)))
    failed = [f.name for f in figures if "FAIL" in f.note]
    if failed:
        print(f"error: {len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    cli.run(main)
