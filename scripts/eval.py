"""Evaluate a checkpoint on a whole split or text file: loss per token, perplexity and bits per byte.

  python scripts/eval.py out/shakespeare                                  # the run's val split
  python scripts/eval.py ckpt.pt --data_dir=data --dataset=shakespeare --split=train
  python scripts/eval.py HF_DIR --text=input.txt --json                   # any text, the model's own tokenizer
  python scripts/eval.py HF_DIR --hellaswag                               # HellaSwag (downloaded once), acc, acc_norm
  python scripts/eval.py out/gpt2 --hellaswag=hellaswag_val.jsonl --data_dir=data --dataset=fineweb   # both

The checkpoint may be a jaxgpt run folder, nanoGPT ckpt.pt, .safetensors, a Hugging Face GPT-2 folder,
local or gs://. Every token but the first is scored exactly once, in consecutive non-overlapping
windows of block_size (jaxgpt/evaluate.py); bits per byte = total nats / ln 2 / UTF-8 bytes scored,
comparable between a byte-level model and a BPE model. --hellaswag scores HellaSwag as build-nanogpt and
llm.c do (jaxgpt/hellaswag.py); with it, a split or text is scored only when --text, --data_dir or --dataset
names one.
"""
import argparse
import json
import sys
from typing import Any

import numpy as np
from tqdm import tqdm

from jaxgpt import cli
from jaxgpt.config import CliParser, parse_bool
from jaxgpt.errors import UserError


def main(argv: list[str]) -> int:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="run folder, ckpt.pt, .safetensors or Hugging Face folder (local or gs://)")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="which checkpoint of a run folder")
    p.add_argument("--meta", help="nanoGPT meta.pkl for character-level checkpoints")
    p.add_argument("--text", help="evaluate this UTF-8 text file (tokenized with the checkpoint's tokenizer)")
    p.add_argument("--data_dir", help="a prepared dataset's parent folder (default: the run's own, else data)")
    p.add_argument("--dataset", help="the dataset name (default: the run's own, else shakespeare)")
    p.add_argument("--split", choices=["val", "train"], default="val")
    p.add_argument("--max_tokens", type=int, default=0, help="score only the split's first this many tokens (0: all)")
    p.add_argument("--batch_size", type=int, default=0, help="windows per forward (default: chosen by memory); "
                   "with --hellaswag, examples per forward (default 8)")
    p.add_argument("--hellaswag", nargs="?", const="download", metavar="FILE",
                   help="score HellaSwag: its hellaswag_val.jsonl (local, gs:// or a URL); no FILE: downloaded once "
                        "from its canonical address into the cache folder")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL")
    cli.add_compile_cache_flag(p)
    args = p.parse_args(argv)
    if args.text and (args.data_dir or args.dataset):
        raise UserError("--text evaluates a file; --data_dir/--dataset a prepared split: give one or the other")
    if args.max_tokens < 0:
        raise UserError(f"--max_tokens must be >= 0 (0 = the whole split), got {args.max_tokens}")
    if args.batch_size < 0:
        raise UserError(f"--batch_size must be >= 1 (or 0 = by memory), got {args.batch_size}")
    cli.apply_compile_cache(args.compile_cache)

    from formats.io import load_any, need_tokenizer

    model, info = load_any(args.checkpoint, args.meta, args.which)
    tok = need_tokenizer(model, info, args.checkpoint)
    out: dict[str, Any] = {"checkpoint": str(args.checkpoint), "step": info.get("step")}
    lines = []
    if not args.hellaswag or args.text or args.data_dir or args.dataset:
        split, line = score_split(args, model, info, tok)
        out.update(split)
        lines.append(line)
    if args.hellaswag:
        out["hellaswag"], line = score_hellaswag(args, model, tok)
        lines.append(line)
    print(json.dumps(out) if args.json else "\n".join(lines))
    return 0


def score_split(args: argparse.Namespace, model: Any, info: dict, tok: Any) -> tuple[dict[str, Any], str]:
    """Loss, perplexity and bits per byte over --text or a prepared split: (JSON fields, the printed line)."""
    from flax import nnx

    from jaxgpt.evaluate import EvalResult, batch_size_for, make_nll, score, text_bytes
    from jaxgpt.loader import num_windows

    cfg = model.config
    tokens, source, n_bytes = what_to_score(args, info, tok, cfg.vocab_size)
    if len(tokens) < 2:
        raise UserError(f"{source} holds {len(tokens)} token(s); evaluation needs at least 2")
    if tokens.max() >= cfg.vocab_size:
        raise UserError(f"{source} holds token ids up to {tokens.max()}, beyond the model's vocabulary of {cfg.vocab_size}")
    windows = num_windows(len(tokens), cfg.block_size)
    batch = args.batch_size or batch_size_for(cfg, windows)
    graphdef, params = nnx.split(model)
    with tqdm(total=windows, unit="window", delay=2, file=sys.stderr, disable=not args.progress, dynamic_ncols=True) as bar:
        total, count = score(make_nll(graphdef), params, tokens, cfg.block_size, batch, progress=bar.update)
    result = EvalResult(total / count, count, n_bytes if n_bytes is not None else text_bytes(tokens, tok))
    line = (f"{source}: {count:,} tokens ({result.bytes:,} bytes) in {windows:,} windows of {cfg.block_size}\n"
            f"loss {result.loss:.4f} nats/token, perplexity {result.perplexity:.3f}, "
            f"{result.bits_per_byte:.4f} bits per byte")
    return {"source": source, **result.to_dict(), "block_size": cfg.block_size, "windows": windows,
            "batch_size": batch}, line


def score_hellaswag(args: argparse.Namespace, model: Any, tok: Any) -> tuple[dict[str, Any], str]:
    """HellaSwag's acc and acc_norm with the checkpoint's tokenizer: (JSON fields, the printed line)."""
    from jaxgpt import hellaswag

    source = str(hellaswag.fetch()) if args.hellaswag == "download" else args.hellaswag
    examples = hellaswag.encode(hellaswag.read(source), tok)
    with tqdm(total=len(examples), unit="example", delay=2, file=sys.stderr, disable=not args.progress,
              dynamic_ncols=True) as bar:
        r = hellaswag.score(model, examples, max(1, args.batch_size or 8), progress=bar.update)
    refused = f"; {r.refused:,} longer than block_size {model.config.block_size} refused" if r.refused else ""
    return r.to_dict(), f"HellaSwag ({source}): {r.examples:,} examples, acc {r.acc:.4f}, acc_norm {r.acc_norm:.4f}{refused}"


def what_to_score(args: argparse.Namespace, info: dict, tok: Any, vocab_size: int) -> tuple[np.ndarray, str, int | None]:
    """(tokens, where they come from, their text's UTF-8 bytes where prepare.py counted them): --text's file, or
    a prepared split (the run's own dataset by default), its first --max_tokens."""
    if args.text:
        return np.asarray(tok.encode(cli.read_text_file(args.text, "--text"))), args.text, None
    from jaxgpt.loader import open_dataset
    from jaxgpt.tokenizer import same_tokenizer

    run = info.get("train") or info.get("config") or {}
    data_dir, dataset = args.data_dir or run.get("data_dir", "data"), args.dataset or run.get("dataset", "shakespeare")
    ds = open_dataset(data_dir, dataset, vocab_size)
    if not same_tokenizer(ds.meta["tokenizer_identity"], tok.identity()):
        raise UserError(f"{ds.folder} was prepared with another tokenizer than the checkpoint's; evaluate with --text, "
                        f"or prepare the data with the model's tokenizer")
    stream = ds.stream(args.split)
    tokens = stream.head(args.max_tokens)
    whole = len(tokens) == stream.n_tokens  # the whole split: its bytes as prepare.py counted them, where it did
    return tokens, f"{ds.folder} ({args.split})", ds.split_bytes(args.split) if whole else None


if __name__ == "__main__":
    cli.run(main)
