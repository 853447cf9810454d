"""Convert a checkpoint between jaxgpt, nanoGPT and safetensors; formats follow the paths:

  *.pt / *.pth / *.ckpt   nanoGPT ckpt.pt ({'model', 'model_args', 'iter_num', 'best_val_loss', 'config'})
  *.safetensors           nanoGPT parameter names, model_args in the header metadata
  anything else           a jaxgpt run folder (out_dir with checkpoints/) or checkpoints/<step>

  python scripts/convert.py out/shakespeare ckpt.pt          # jaxgpt -> nanoGPT
  python scripts/convert.py ckpt.pt model.safetensors        # nanoGPT -> safetensors
  python scripts/convert.py model.safetensors out/imported   # -> a jaxgpt run folder (params only)

.pt files are read with torch.load(weights_only=True): pickled code is refused, never run.
An existing destination is never overwritten unless --force (a run folder never is).
"""
import argparse
from pathlib import Path

from jaxgpt import cli
from jaxgpt.config import CliParser
from jaxgpt.errors import UserError
from parity.formats import kind_of, load_any, save_jaxgpt, save_pt, save_safetensors


def main(argv: list[str]) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--force", action="store_true", help="overwrite an existing .pt/.safetensors destination")
    args = p.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    kind = kind_of(dst)
    if dst.exists() and (kind == "jaxgpt" and any(dst.iterdir()) or kind != "jaxgpt" and not args.force):
        raise UserError(f"{dst} already exists; choose a new destination" + ("" if kind == "jaxgpt" else " or pass --force"))
    if dst.resolve() == src.resolve():
        raise UserError("source and destination are the same path")
    model, info = load_any(src)
    info["source"] = str(src)
    {"pt": save_pt, "safetensors": save_safetensors, "jaxgpt": save_jaxgpt}[kind](model, dst, info)
    print(f"{src} ({kind_of(src)}) -> {dst} ({kind}): {model.num_params() / 1e6:.2f}M parameters, "
          f"step {info.get('step')}, config {model.config.to_dict()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
