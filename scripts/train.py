"""Train a jaxgpt model. Every GPTConfig/TrainConfig field is a --flag (nanoGPT's --key=value form).

  python scripts/train.py --dataset=shakespeare --batch_size=64 --block_size=256 --n_embd=384 \\
      --n_head=6 --n_layer=6 --max_iters=5000          # the seed's GPU config (the defaults)
  python scripts/train.py --preset=cpu                  # nanoGPT's CPU config, minutes on 2 cores
  python scripts/train.py --out_dir=out/x --resume      # continue a run where it stopped
"""
import json

from jaxgpt import GPTConfig, TrainConfig, cli
from jaxgpt.config import PRESETS, explicit_flags, make_parser
from jaxgpt.train import resolve_configs, train


def main(argv: list[str]) -> int:
    parser = make_parser(__doc__, GPTConfig, TrainConfig, presets=True)
    args = parser.parse_args(argv)
    model_cfg, tc = resolve_configs(explicit_flags(args, GPTConfig), explicit_flags(args, TrainConfig),
                                    PRESETS[args.preset])
    print(f"model: {json.dumps(model_cfg.to_dict())}")
    print(f"train: {json.dumps(tc.to_dict())}")
    summary = train(model_cfg, tc)
    print(f"done: {summary['final_step']} steps in {summary['wall_s']:.1f} s "
          f"({summary['wall_s'] / max(summary['steps'], 1) * 1000:.1f} ms/step incl. eval), "
          f"val loss {summary.get('val_loss', float('nan')):.4f}, best {summary.get('best_val_loss', float('nan')):.4f}; "
          f"checkpoints in {tc.out_dir}/checkpoints")
    return 0


if __name__ == "__main__":
    cli.run(main)
