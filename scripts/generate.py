"""Sample text from a trained model (jaxgpt run folder, nanoGPT ckpt.pt, .safetensors, or a
Hugging Face GPT-2 folder), with the tokenizer it carries (bytes by default).

  python scripts/generate.py --prompt="KING RICHARD III:" --temperature=0.9 --top_k=40 --max_new_tokens=500
  python scripts/generate.py --checkpoint=ckpt.pt --num_samples=10 --temperature=0
"""
import argparse
import shutil
import sys
import tempfile
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxgpt import cli
from jaxgpt.config import CliParser, parse_bool
from jaxgpt.errors import UserError
from jaxgpt.platform import backend, streams_by_callback
from jaxgpt.sample import check_sampling, generate_chunks

STREAM_CHUNK = 16  # tokens per compiled call when streaming on GPU/TPU (platform.streams_by_callback)

MAX_NEW_TOKENS = 2**31 - 1  # token indices are int32 on the device


def load(checkpoint: str, which: str, meta: str | None):
    """(model, tokenizer, info) from a jaxgpt run folder, nanoGPT .pt, .safetensors or a Hugging
    Face GPT-2 folder (formats.io; torch only for .pt)."""
    from formats.io import load_any, need_tokenizer
    model, info = load_any(checkpoint, meta, which)
    return model, need_tokenizer(model, info, checkpoint), info


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if not 1 <= args.max_new_tokens <= MAX_NEW_TOKENS:
        raise UserError(f"--max_new_tokens must be in [1, {MAX_NEW_TOKENS}], got {args.max_new_tokens}")
    cli.apply_compile_cache(args.compile_cache)
    prompt = args.prompt
    if args.prompt_file:
        prompt = cli.read_text_file(args.prompt_file, "--prompt_file")
    prompt = prompt or "\n"

    model, tok, info = load(args.checkpoint or args.out_dir, args.which, args.meta)
    top_k = args.top_k if args.top_k is not None else min(200, model.config.vocab_size)
    check_sampling(args.temperature, top_k, args.top_p, model.config.vocab_size, args.num_samples)  # before tiling
    ids = np.tile(tok.encode(prompt), (args.num_samples, 1))
    stream = args.num_samples == 1 if args.stream is None else args.stream
    if stream and args.num_samples > 1:
        raise UserError("--stream prints one sample as it is generated; use --num_samples=1 or --no-stream")
    print(f"# {args.checkpoint or args.out_dir} step {info.get('step')}, val loss {info.get('val_loss')}", file=sys.stderr)
    if len(ids[0]) > model.config.block_size:
        print(f"# prompt is {len(ids[0])} tokens; the model sees its last {model.config.block_size}", file=sys.stderr)
    sampling = dict(temperature=args.temperature, top_k=top_k, top_p=args.top_p, key=jax.random.key(args.seed),
                    past_context=args.past_context)
    if stream:
        print_streamed(model, tok, ids, prompt, args.max_new_tokens, sampling)
    else:
        print_samples(model, tok, ids, prompt, args.max_new_tokens, sampling, args.progress)
    return 0


def _parser() -> argparse.ArgumentParser:
    p = CliParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default="", help="start text; empty starts from a newline, like nanoGPT")
    p.add_argument("--prompt_file", help="read the prompt from this UTF-8 file instead")
    p.add_argument("--out_dir", default="out/shakespeare", help="training run to sample from (default: %(default)s)")
    p.add_argument("--checkpoint", help="a run folder, checkpoints/<step> folder, ckpt.pt, .safetensors or Hugging Face "
                                        "folder (overrides --out_dir)")
    p.add_argument("--which", choices=["best", "latest"], default="best", help="which checkpoint of a run folder")
    p.add_argument("--meta", help="nanoGPT meta.pkl for character-level checkpoints")
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: %(default)s)")
    p.add_argument("--top_k", type=int, default=None, help="keep the k most likely tokens (default: 200, capped at the vocabulary)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default: %(default)s)")
    p.add_argument("--num_samples", type=int, default=1, help="decoded together as one batch")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--past_context", choices=["crop", "slide"], default="crop",
                   help="past block_size: 'crop' = nanoGPT's exact last-block_size window (recomputed each token); "
                        "'slide' (RoPE models) = a rolling KV cache, sliding-window attention, no recomputation")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they come (default: on for a single sample)")
    p.add_argument("--progress", type=parse_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="progress bar on stderr for non-streamed output that takes more than 2 s (default: true)")
    cli.add_compile_cache_flag(p)
    return p


def print_streamed(model: Any, tok: Any, ids: np.ndarray, prompt: str, max_new_tokens: int, sampling: dict) -> None:
    """One sample, token by token as the device produces them."""
    decoder = tok.stream_decoder()

    def print_token(t: np.ndarray) -> None:  # called from inside the jitted loop
        sys.stdout.write(decoder.push(int(t[0])))
        sys.stdout.flush()

    sys.stdout.write(prompt)
    if streams_by_callback(backend()):
        for _ in generate_chunks(model, ids, max_new_tokens, on_token=print_token, **sampling):
            pass
    else:  # GPU/TPU: a short chunk at a time, no host callback in the compiled loop
        for part in generate_chunks(model, ids, max_new_tokens, chunk=STREAM_CHUNK, **sampling):
            for t in part[0]:
                print_token(np.asarray([t]))
    sys.stdout.write(decoder.flush() + "\n")


def print_samples(model: Any, tok: Any, ids: np.ndarray, prompt: str, max_new_tokens: int, sampling: dict,
                  progress: bool) -> None:
    """Samples printed one after the other at the end; meanwhile each one's text is kept in a spooled file
    (memory up to 16 MiB, then disk), so memory stays flat for any --max_new_tokens."""
    decoders = [tok.stream_decoder() for _ in range(len(ids))]
    texts = [tempfile.SpooledTemporaryFile(max_size=1 << 24, mode="w+", encoding="utf-8") for _ in decoders]
    for text in texts:
        text.write(prompt)
    with tqdm(total=max_new_tokens, unit="tok", delay=2, file=sys.stderr, disable=not progress, dynamic_ncols=True) as bar:
        for chunk in generate_chunks(model, ids, max_new_tokens, **sampling):
            for text, decoder, row in zip(texts, decoders, chunk, strict=True):
                text.write(decoder.feed(row))
            bar.update(chunk.shape[1])
    for text, decoder in zip(texts, decoders, strict=True):
        text.write(decoder.flush())
        text.seek(0)
        shutil.copyfileobj(text, sys.stdout)
        print("\n---------------")


if __name__ == "__main__":
    cli.run(main)
