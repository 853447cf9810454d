"""Train a jaxgpt model. Every GPTConfig/TrainConfig field is a --flag (nanoGPT's --key=value form).

  python scripts/train.py --dataset=shakespeare --batch_size=64 --block_size=256 --n_embd=384 \\
      --n_head=6 --n_layer=6 --max_iters=5000          # the seed's GPU config (the defaults)
  python scripts/train.py --preset=cpu                  # nanoGPT's CPU config, minutes on 2 cores
  python scripts/train.py --preset=cpu --recipe=modern  # the modern recipe (RoPE, RMSNorm, Muon, ...) at that size
  python scripts/train.py --out_dir=out/x --resume      # continue a run where it stopped
  python scripts/train.py --preset=finetune --init_from=HF_DIR --data_dir=data_gpt2   # fine-tune (prepare.py --tokenizer)
"""
import json
from pathlib import Path

import jax
from flax import nnx

from jaxgpt import GPTConfig, TrainConfig, cli, paths
from jaxgpt.config import base_values, explicit_flags, make_parser
from jaxgpt.data import prepare_if_missing, read_meta
from jaxgpt.model import crop_block_size
from jaxgpt.platform import tune_host_allocator
from jaxgpt.rundir import resolve_configs
from jaxgpt.sharding import init_distributed
from jaxgpt.train import train


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    dist = parser.add_argument_group("multi-process (run the same command on every host)")
    dist.add_argument("--distributed", action="store_true",
                      help="call jax.distributed.initialize(); auto-detects Cloud TPU and SLURM clusters")
    dist.add_argument("--coordinator_address", help="host:port of process 0 (implies --distributed)")
    dist.add_argument("--num_processes", type=int, help="total processes (with --coordinator_address)")
    dist.add_argument("--process_id", type=int, help="this process's index (with --coordinator_address)")
    cli.add_compile_cache_flag(parser)
    args = parser.parse_args(argv)
    tune_host_allocator()  # before JAX starts its threads (CPU hosts only)
    cli.apply_compile_cache(args.compile_cache)
    if args.distributed or args.coordinator_address:
        init_distributed(args.coordinator_address, args.num_processes, args.process_id)
    model_flags, train_flags = explicit_flags(args, GPTConfig), explicit_flags(args, TrainConfig)
    preset = base_values(args.preset, train_flags.get("recipe", "nanogpt"))  # the size preset, then the recipe
    main_process = jax.process_index() == 0
    data_dir, dataset = train_flags.get("data_dir", "data"), train_flags.get("dataset", preset.get("dataset", "shakespeare"))
    if (meta := prepare_if_missing(data_dir, dataset)) is not None and main_process:
        print(f"data: prepared {data_dir}/{dataset} from the Tiny Shakespeare bundled with jaxgpt "
              f"({meta['train_tokens']:,} train / {meta['val_tokens']:,} val tokens)")
    init, tokenizer, init_cfg = None, None, None
    if train_flags.get("init_from"):  # weights (and tokenizer) from any format the converter reads
        from formats.io import load_any, need_tokenizer
        model, info = load_any(train_flags["init_from"])
        init_cfg, tokenizer = model.config, need_tokenizer(model, info, train_flags["init_from"])
    data_vocab = read_meta(f"{data_dir}/{dataset}")["vocab_size"] if Path(data_dir, dataset, "meta.json").is_file() else None
    paths.check_gcs(train_flags.get("out_dir") or f"out/{dataset}")  # an unreachable bucket: one line, before anything
    model_cfg, tc = resolve_configs(model_flags, train_flags, preset, init_cfg, data_vocab)
    if train_flags.get("resume") == "auto" and main_process:
        print(f"resume=auto: {'continuing the run in' if tc.resume else 'no committed checkpoint: a new run in'} {tc.out_dir}")
    if init_cfg is not None:
        init = nnx.state(crop_block_size(model, model_cfg.block_size), nnx.Param)
    if main_process:
        print(f"model: {json.dumps(model_cfg.to_dict())}")
        print(f"train: {json.dumps(tc.to_dict())}")
        print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind} in {jax.process_count()} process(es)")

    def announce(plat, memory) -> None:
        if main_process:
            need, limit = memory["step_bytes_per_device"], memory["limit_bytes_per_device"]
            fits = f", step needs {need / 2**20:.0f} MiB of {limit / 2**20:.0f} MiB ({memory['limit_source']})" \
                if need and limit else ""
            print(f"platform: {plat.backend} ({plat.device_kind}), dtype={plat.dtype}, remat={plat.remat}, "
                  f"attention={plat.attention}, compiler options {plat.compiler_options or 'none'}, "
                  f"host allocator {plat.host_allocator or 'untouched'}{fits}, compiled in {memory['compile_s']:.1f} s",
                  flush=True)

    summary = train(model_cfg, tc, on_start=announce, init_params=init, tokenizer=tokenizer)
    if main_process:
        print(f"done: {summary['final_step']} steps in {summary['wall_s']:.1f} s "
              f"({summary['wall_s'] / max(summary['steps'], 1) * 1000:.1f} ms/step incl. eval), "
              f"val loss {summary.get('val_loss', float('nan')):.4f}, best {summary.get('best_val_loss', float('nan')):.4f}, "
              f"whole val split {summary.get('val_loss_full', float('nan')):.4f} ({summary.get('val_bpb') or float('nan'):.4f} "
              f"bits/byte); "
              f"checkpoints in {tc.out_dir}/checkpoints")
    return 0


if __name__ == "__main__":
    cli.run(main)
