"""Train a jaxgpt model. Every GPTConfig/TrainConfig field is a --flag (nanoGPT's --key=value form).

  python scripts/train.py --dataset=shakespeare --batch_size=64 --block_size=256 --n_embd=384 \\
      --n_head=6 --n_layer=6 --max_iters=5000          # the seed's GPU config (the defaults)
  python scripts/train.py --preset=cpu                  # nanoGPT's CPU config, minutes on 2 cores
  python scripts/train.py --preset=cpu --recipe=modern  # the modern recipe (RoPE, RMSNorm, Muon, ...) at that size
  python scripts/train.py --out_dir=out/x --resume      # continue a run where it stopped
  python scripts/train.py --preset=finetune --init_from=HF_DIR --data_dir=data_gpt2   # fine-tune (prepare.py --tokenizer)
  python scripts/train.py --target=v5e-8 --compile_only   # before renting: does the run fit a TPU v5e-8? (pip install -e ".[tpu]")
  python scripts/train.py --target=h100x8 --compile_only --batch_size=auto --json    # 8 H100s (pip install -e ".[gpu]")
"""
import json
from dataclasses import replace
from typing import Any

import jax
from flax import nnx

from jaxgpt import GPTConfig, TrainConfig, cli, paths
from jaxgpt.config import explicit_flags, make_parser
from jaxgpt.data import prepare_if_missing
from jaxgpt.loader import data_vocab
from jaxgpt.model import crop_block_size
from jaxgpt.plan.targets import compile_here
from jaxgpt.platform import gib
from jaxgpt.presets import base_values
from jaxgpt.rundir import resolve_configs
from jaxgpt.sharding import init_distributed
from jaxgpt.train import train


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    batch_auto = args.batch_size == "auto"  # the largest per-device batch that fits, accumulation filling the rest
    if batch_auto:
        args.batch_size = None
    cli.check_plan_flags(args)
    if args.target:  # compile for the target's chips from this host: JAX itself stays on the CPU
        compile_here(args.target)
    else:
        cli.tune_host_allocator()  # before JAX starts its threads (CPU hosts only)
    cli.apply_compile_cache(args.compile_cache)
    if args.distributed or args.coordinator_address:
        init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    model_flags, train_flags = explicit_flags(args, GPTConfig), explicit_flags(args, TrainConfig)
    preset = base_values(args.preset, train_flags.get("recipe", "nanogpt"))  # the size preset, then the recipe
    # a preset that gives tokens a step (--preset=gpt2) lets the compiler split them unless a batch flag is given
    batch_auto = batch_auto or (preset.get("batch_auto", False) and "batch_size" not in train_flags
                                and "gradient_accumulation_steps" not in train_flags)
    main_process = jax.process_index() == 0
    data_dir, dataset = train_flags.get("data_dir", "data"), train_flags.get("dataset", preset.get("dataset", "shakespeare"))
    if args.compile_only:
        return plan_only(args, model_flags, train_flags, preset, batch_auto)
    if (meta := prepare_if_missing(data_dir, dataset)) is not None and main_process:
        print(f"data: prepared {data_dir}/{dataset} from the Tiny Shakespeare bundled with jaxgpt "
              f"({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
    model, tokenizer, init_cfg = None, None, None
    if train_flags.get("init_from"):  # weights (and tokenizer) from any format the converter reads
        from formats.io import load_any, need_tokenizer
        model, info = load_any(train_flags["init_from"])
        init_cfg, tokenizer = model.config, need_tokenizer(model, info, train_flags["init_from"])
    vocab = data_vocab(data_dir, dataset)
    paths.check_gcs(train_flags.get("out_dir") or f"out/{dataset}")  # an unreachable bucket: one line, before anything
    model_cfg, tc = resolve_configs(model_flags, train_flags, preset, init_cfg, vocab)
    if batch_auto:  # chosen by compiling on this host's devices, then trained with
        tc = _auto_batch(model_cfg, tc, main_process)
    if train_flags.get("resume") == "auto" and main_process:
        print(f"resume=auto: {'continuing the run in' if tc.resume else 'no committed checkpoint: a new run in'} {tc.out_dir}")
    init = nnx.state(crop_block_size(model, model_cfg.block_size), nnx.Param) if model is not None else None
    if main_process:
        print(f"model: {json.dumps(model_cfg.to_dict())}")
        print(f"train: {json.dumps(tc.to_dict())}")
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} process(es)")
    summary = train(model_cfg, tc, on_start=_announce if main_process else None, init_params=init, tokenizer=tokenizer)
    if main_process:
        _report(summary, tc)
    return 0


def _parser() -> Any:
    parser = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    dist = parser.add_argument_group("multi-process (run the same command on every host)")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize(); auto-detects Cloud TPU and SLURM clusters")
    dist.add_argument("--coordinator_address", help="host:port of process 0 (implies --distributed)")
    dist.add_argument("--num_processes", type=int, help="total processes (with --coordinator_address)")
    dist.add_argument("--process_id", type=int, help="this process's index (with --coordinator_address)")
    plan = parser.add_argument_group("ahead-of-time plan: the run's programs compiled by the target's own compiler")
    cli.add_plan_flags(plan, "compile the train step, eval step and generation chunk, print memory per device, FLOPs "
                             "and a roofline bound, and exit (0: fits, 1: does not); reads no data, writes nothing")
    cli.add_compile_cache_flag(parser)
    return parser


def _auto_batch(model_cfg: GPTConfig, tc: TrainConfig, main_process: bool) -> TrainConfig:
    """--batch_size=auto: the very program the plan compiled on this host's devices."""
    from jaxgpt.plan.aot import plan_training
    step = plan_training(model_cfg, tc, batch_auto=True)["programs"]["train_step"]
    tc = replace(tc, batch_size=step["batch_size"], gradient_accumulation_steps=step["gradient_accumulation_steps"],
                 remat=step["remat"])
    if main_process:
        print(f"batch_size=auto: {tc.batch_size} x {tc.gradient_accumulation_steps} micro-steps (remat={step['remat']})")
    return tc


def _announce(plat: Any, memory: dict) -> None:
    """The run's platform line, once the step is compiled."""
    need, limit = memory["step_bytes_per_device"], memory["limit_bytes_per_device"]
    fits = f", step needs {gib(need)} of {gib(limit)} ({memory['limit_source']})" if need and limit else ""
    matmul = " (bfloat16 matmuls)" if plat.matmul == "bfloat16" else ""
    split = f", batch in {plat.batch_split} parts side by side" if plat.batch_split > 1 else ""
    print(f"platform: {plat.site.backend} ({plat.site.device_kind}), dtype={plat.dtype}{matmul}, remat={plat.remat}, "
          f"attention={plat.attention}{split}, "
          f"host allocator {plat.host_allocator or 'untouched'}{fits}, compiled in {memory['compile_s']:.1f} s",
          flush=True)


def _report(summary: dict, tc: TrainConfig) -> None:
    nan = float("nan")
    print(f"done: {summary['final_step']} steps in {summary['wall_s']:.1f} s "
          f"({summary['wall_s'] / max(summary['steps'], 1) * 1000:.1f} ms/step incl. eval), "
          f"val loss {summary.get('val_loss', nan):.4f}, best {summary.get('best_val_loss', nan):.4f}, "
          f"whole val split {summary.get('val_loss_full', nan):.4f} ({summary.get('val_bpb') or nan:.4f} bits/byte); "
          f"checkpoints in {tc.out_dir}/checkpoints")


def plan_only(args, model_flags: dict, train_flags: dict, preset: dict, batch_auto: bool) -> int:
    """--compile_only: the run's programs compiled for --target (or this host), reported; nothing read
    but the prepared data's meta.json (its vocabulary) when present, nothing written."""
    from jaxgpt.plan.aot import plan_training

    data_dir, dataset = train_flags.get("data_dir", "data"), train_flags.get("dataset", preset.get("dataset", "shakespeare"))
    init_cfg = None
    if train_flags.get("init_from"):  # the architecture of the checkpoint a fine-tune starts from
        from formats.io import load_any
        init_cfg = load_any(train_flags["init_from"])[0].config
    vocab = data_vocab(data_dir, dataset)
    model_cfg, tc = resolve_configs(model_flags, {**train_flags, "resume": False}, preset, init_cfg, vocab)
    report = plan_training(model_cfg, tc, args.target, batch_auto=batch_auto, log=cli.progress_lines(args.json))
    return cli.print_plan(report, args.json)


if __name__ == "__main__":
    cli.run(main)
