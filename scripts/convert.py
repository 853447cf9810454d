"""Convert a checkpoint between jaxgpt, nanoGPT, safetensors and Hugging Face GPT-2; the source
format follows the path, the destination's too unless --to names it:

  *.pt / *.pth / *.ckpt   nanoGPT ckpt.pt ({'model', 'model_args', 'iter_num', 'best_val_loss', 'config'})
  *.safetensors           nanoGPT parameter names, model_args in the header metadata
  a folder with config.json (model_type gpt2)   a Hugging Face GPT-2 folder (save_pretrained)
  any other folder        a jaxgpt run folder (out_dir with checkpoints/) or checkpoints/<step>

  python scripts/convert.py out/shakespeare ckpt.pt          # jaxgpt -> nanoGPT
  python scripts/convert.py ckpt.pt model.safetensors        # nanoGPT -> safetensors
  python scripts/convert.py HF_DIR out/imported              # Hugging Face GPT-2 -> a jaxgpt run folder
  python scripts/convert.py out/shakespeare hf_out --to=hf   # jaxgpt -> a Hugging Face folder

.pt/.bin files are read with torch.load(weights_only=True): pickled code is refused, never run;
no other format needs torch. An existing destination is never overwritten unless --force (a
folder never is); a failed conversion leaves nothing behind.
"""
import argparse
import sys
from pathlib import Path

from formats.io import KINDS, kind_of, load_any, save_any
from jaxgpt import cli, paths
from jaxgpt.config import CliParser
from jaxgpt.errors import UserError


def main(argv: list[str]) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--to", choices=KINDS, help="destination format (default: from the destination path)")
    p.add_argument("--meta", help="nanoGPT meta.pkl of a character-level source")
    p.add_argument("--force", action="store_true", help="overwrite an existing .pt/.safetensors destination")
    p.add_argument("--verify", action="store_true",
                   help="after writing, compare the destination's logits and greedy decoding with the source's; "
                        "on a mismatch remove the destination (only what this run wrote) and exit 1")
    args = p.parse_args(argv)
    src, dst = paths.path(args.src), paths.path(args.dst)
    paths.check_gcs(dst)
    kind = args.to or ("jaxgpt" if kind_of(dst) == "hf" else kind_of(dst))
    folder = kind in ("jaxgpt", "hf")
    if folder and dst.suffix.lower() in (".pt", ".pth", ".ckpt", ".bin", ".safetensors"):
        raise UserError(f"--to={kind} writes a folder, but {dst} looks like a file name; choose a folder name")
    if dst.exists() and (dst.is_dir() and any(dst.iterdir()) or not dst.is_dir() and (folder or not args.force)):
        raise UserError(f"{dst} already exists; choose a new destination" + ("" if folder else " or pass --force"))
    if str(dst) == str(src) or not paths.is_remote(dst) and Path(dst).resolve() == Path(src).resolve():
        raise UserError("source and destination are the same path")
    model, info = load_any(src, args.meta)
    info["source"] = str(src)
    existed = dst.exists()
    save_any(kind, model, dst, info)
    if args.verify:
        from parity.report import verify_conversion
        report = verify_conversion(src, dst)
        print(report.table())
        if not report.passed:
            if not existed:  # never remove what was there before (a --force overwrite stays)
                paths.remove(dst)
            print(f"error: {dst} does not reproduce {src} (see the table); "
                  f"{'removed it' if not existed else 'left the overwritten file in place'}", file=sys.stderr)
            return 1
    print(f"{src} ({kind_of(src)}) -> {dst} ({kind}): {model.num_params() / 1e6:.2f}M parameters, "
          f"step {info.get('step')}, tokenizer {getattr(info['tokenizer'], 'name', 'none')}, config {model.config.to_dict()}")
    return 0


if __name__ == "__main__":
    cli.run(main)
