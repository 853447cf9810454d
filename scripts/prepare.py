"""Prepare a dataset as token files: data/<name>/{train,val}.bin + meta.json. Byte-level (uint8)
by default; --tokenizer=PATH (a tokenizer.json or a model folder holding one) encodes with it
(uint16/uint32 ids, the tokenizer's identity in meta.json, a copy of tokenizer.json beside).

  python scripts/prepare.py shakespeare [--input PATH]      # no PATH: the copy bundled with jaxgpt
  python scripts/prepare.py shakespeare --download          # fetch it from its canonical address
  python scripts/prepare.py tinystories [--input FILES...]  # no FILES: Hugging Face `datasets`
  python scripts/prepare.py text --input FILE --name NAME    # any UTF-8 text file
  python scripts/prepare.py shakespeare --tokenizer=HF_DIR  # GPT-2 BPE ids, for fine-tuning an imported model
"""
import argparse
import tempfile
from pathlib import Path

from jaxgpt import cli, paths
from jaxgpt.config import CliParser
from jaxgpt.data import prepare_shakespeare, prepare_text, prepare_tinystories
from jaxgpt.errors import UserError
from jaxgpt.tokenizer import TOKENIZER_FILE, HFTokenizer


def main(argv: list[str]) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["shakespeare", "tinystories", "text"])
    parser.add_argument("--input", nargs="+", help="local source file(s)")
    parser.add_argument("--name", help="dataset name for `text` (the folder under --data_dir)")
    parser.add_argument("--data_dir", default="data", help="where datasets live (default: data)")
    parser.add_argument("--download", action="store_true", help="shakespeare: download instead of the bundled copy")
    parser.add_argument("--tokenizer", help="a tokenizer.json, or a folder holding one (default: bytes)")
    args = parser.parse_args(argv)
    tokenizer = None
    if args.tokenizer:
        path = Path(args.tokenizer)
        path = path / TOKENIZER_FILE if path.is_dir() else path
        if not path.is_file():
            raise UserError(f"--tokenizer {args.tokenizer}: no {TOKENIZER_FILE} there; pass the file or a model folder "
                            f"that holds one")
        tokenizer = HFTokenizer(path)
    target = args.data_dir
    if paths.is_remote(target):  # prepare locally, then upload the finished folder
        paths.check_gcs(target)
        staging = tempfile.TemporaryDirectory(prefix="jaxgpt-prepare-")
        args.data_dir = staging.name
    if args.dataset == "shakespeare":
        if args.input and len(args.input) > 1:
            raise UserError("shakespeare takes one --input file")
        meta = prepare_shakespeare(args.data_dir, args.input[0] if args.input else None, args.download, tokenizer)
        name = "shakespeare"
    elif args.dataset == "tinystories":
        meta, name = prepare_tinystories(args.data_dir, args.input, tokenizer), "tinystories"
    else:
        if not args.input or len(args.input) != 1 or not args.name:
            raise UserError("text needs exactly one --input FILE and a --name NAME")
        if "/" in args.name or args.name in (".", ".."):
            raise UserError(f"--name must be a plain folder name, got {args.name!r}")
        path = Path(args.input[0])
        if not path.is_file():
            raise UserError(f"input file {path} does not exist; pass an existing UTF-8 text file")
        meta, name = prepare_text(path.read_bytes(), Path(args.data_dir) / args.name, str(path), tokenizer=tokenizer), args.name
    state = "already prepared, unchanged" if meta.get("unchanged") else "written"
    if paths.is_remote(target):
        paths.publish(Path(args.data_dir) / name, paths.path(target) / name)
        staging.cleanup()
    print(f"{name}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"({meta['tokenizer']}, vocab {meta['vocab_size']}) -> {paths.path(target) / name} [{state}]")
    return 0


if __name__ == "__main__":
    cli.run(main)
