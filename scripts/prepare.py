"""Prepare a dataset as token files: data/<name>/{train,val}.bin + meta.json. Byte-level (uint8)
by default; --tokenizer=PATH (a tokenizer.json or a model folder holding one) encodes with it
(uint16/uint32 ids, the tokenizer's identity in meta.json, a copy of tokenizer.json beside).

  python scripts/prepare.py shakespeare [--input PATH]      # no PATH: the copy bundled with jaxgpt
  python scripts/prepare.py shakespeare --download          # fetch it from its canonical address
  python scripts/prepare.py tinystories [--input FILES...]  # no FILES: Hugging Face `datasets`
  python scripts/prepare.py text --input FILES/GLOBS --name NAME [--tokenizer=tokenizer.json]
      # a corpus of any size: .txt, .jsonl(.gz/.zst), .parquet, local or gs://, on every core, resumable,
      # as llm.c-format shards data/NAME/train_000000.bin ... val_000000.bin + meta.json (README, "Data at scale")
  python scripts/prepare.py shakespeare --tokenizer=HF_DIR  # GPT-2 BPE ids, for fine-tuning an imported model
"""
import argparse
import tempfile
from pathlib import Path

from jaxgpt import cli, paths
from jaxgpt.config import CliParser, parse_bool
from jaxgpt.data import prepare_shakespeare, prepare_tinystories
from jaxgpt.errors import UserError
from jaxgpt.prepare import DEFAULT_SHARD_TOKENS, CorpusJob, prepare_corpus
from jaxgpt.tokenizer import TOKENIZER_FILE, HFTokenizer


def main(argv: list[str]) -> int:
    parser = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=["shakespeare", "tinystories", "text"])
    parser.add_argument("--input", nargs="+", help="source files; for text also globs, gs:// and hf:// URLs (quote globs)")
    parser.add_argument("--name", help="dataset name for `text` (the folder under --data_dir)")
    parser.add_argument("--data_dir", default="data", help="where datasets live (default: data)")
    parser.add_argument("--download", action="store_true", help="shakespeare: download instead of the bundled copy")
    parser.add_argument("--tokenizer", help="a tokenizer.json, or a folder holding one (default: bytes)")
    text = parser.add_argument_group("text (a corpus as shards)")
    text.add_argument("--text_field", default="text", help="the text's field in .jsonl / column in .parquet (default: text)")
    text.add_argument("--workers", type=int, default=0, help="tokenizing processes (default 0: one per core)")
    text.add_argument("--shard_tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard (default: 100 M)")
    text.add_argument("--val_tokens", type=int, default=0,
                      help="the val split: the first whole documents up to this many tokens (default 0: a tenth of the "
                           "corpus estimated from its size, at most 10 M)")
    text.add_argument("--task", type=int, default=0, help="this task's index, with --tasks (an array job)")
    text.add_argument("--tasks", type=int, default=1, help="prepare the inputs as this many disjoint slices (default 1)")
    text.add_argument("--encoder", choices=["auto", "tokenizers", "tiktoken"], default="auto",
                      help="auto (default): tiktoken where it gives the tokenizer's ids (checked on every job), else tokenizers")
    text.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL")
    args = parser.parse_args(argv)
    if args.dataset == "text":
        return _text(args)
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
    state = "already prepared, unchanged" if meta.get("unchanged") else "written"
    if paths.is_remote(target):
        paths.publish(Path(args.data_dir) / name, paths.path(target) / name)
        staging.cleanup()
    print(f"{name}: train {meta['train_tokens']:,} tokens, val {meta['val_tokens']:,} tokens "
          f"({meta['tokenizer']}, vocab {meta['vocab_size']}) -> {paths.path(target) / name} [{state}]")
    return 0


def _text(args: argparse.Namespace) -> int:
    if not args.input or not args.name:
        raise UserError("text needs --input FILE [FILE ...] (files or globs) and a --name NAME")
    if "/" in args.name or args.name in (".", ".."):
        raise UserError(f"--name must be a plain folder name, got {args.name!r}")
    tokenizer = None
    if args.tokenizer:
        path = Path(args.tokenizer)
        tokenizer = str(path / TOKENIZER_FILE if path.is_dir() else path)
    if paths.is_remote(args.data_dir):
        paths.check_gcs(args.data_dir)
    out = str(paths.path(args.data_dir) / args.name)
    meta = prepare_corpus(CorpusJob(args.input, out, tokenizer, args.text_field, args.workers, args.shard_tokens,
                                    args.val_tokens, args.task, args.tasks, progress=args.progress,
                                    encoder=args.encoder))
    if "shards" not in meta:  # this task is done; others are not yet
        print(f"{args.name}: task {args.task} of {args.tasks} done ({len(meta['train'])} train shards); meta.json is "
              f"written by the task that finishes last")
        return 0
    state = "already prepared, unchanged" if meta.get("unchanged") else "written"
    print(f"{args.name}: train {meta['train_tokens']:,} tokens in {len(meta['shards']['train'])} shards, val "
          f"{meta['val_tokens']:,} tokens ({meta['tokenizer']}, vocab {meta['vocab_size']}) -> {out} [{state}]")
    return 0


if __name__ == "__main__":
    cli.run(main)
