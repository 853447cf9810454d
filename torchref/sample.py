"""The PyTorch twin of jaxgpt/sample.py: the same filtering and inverse-CDF draw, a KV-cache
loop, and (use_cache=False) nanoGPT's loop that recomputes the cropped context every step.

`python -m torchref.sample CKPT.pt --num_samples=10 --max_new_tokens=500` samples the way
nanoGPT's sample.py does — one sample at a time, PyTorch eager, the cropped context recomputed
every step — the baseline scripts/generate.py is timed against as a whole process.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from torchref.model import GPT


def filter_probs(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """(B, V) logits -> (B, V) float32 probabilities after temperature, top-k and top-p."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_p, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        drop_sorted = (torch.cumsum(sorted_p, dim=-1) - sorted_p) >= top_p  # keep the first always
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    return probs


def pick(logits: torch.Tensor, u: torch.Tensor, temperature: float, top_k: int | None, top_p: float) -> torch.Tensor:
    """Next tokens (B,) from logits (B, V) and uniforms u (B,); temperature 0 = argmax."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    cdf = torch.cumsum(filter_probs(logits, temperature, top_k, top_p), dim=-1)
    token = (cdf <= (u * cdf[:, -1])[:, None]).sum(dim=-1)
    return token.clamp(max=logits.size(-1) - 1)


@torch.no_grad()
def generate(model: GPT, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float = 1.0, generator: torch.Generator | None = None,
             uniforms: torch.Tensor | None = None, use_cache: bool = True) -> torch.Tensor:
    """Continue prompt (B, P) long -> (B, P + max_new_tokens); see jaxgpt.sample.generate."""
    model.eval()
    bs = model.config.block_size
    B, P = prompt.shape
    if uniforms is None:
        uniforms = torch.rand((max_new_tokens, B), generator=generator)
    tokens = prompt.clone()
    cache = model.init_cache(B) if use_cache and P <= bs else None
    for j in range(max_new_tokens):
        L = P + j
        if cache is not None and L <= bs:
            fresh = tokens if j == 0 else tokens[:, -1:]  # prefill, then one token per step
            logits, cache = model.decode(fresh, cache, 0 if j == 0 else L - 1)
        else:  # nanoGPT: crop the context to the last block_size tokens and recompute it all
            logits = model(tokens[:, -bs:])
        tok = pick(logits[:, -1], uniforms[j], temperature, top_k, top_p)
        tokens = torch.cat([tokens, tok[:, None].to(tokens.dtype)], dim=1)
    return tokens


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a nanoGPT ckpt.pt (scripts/convert.py RUN ckpt.pt writes one)")
    p.add_argument("--prompt", default="\n")
    p.add_argument("--num_samples", type=int, default=10)
    p.add_argument("--max_new_tokens", type=int, default=500)
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top_k", type=int, default=200)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    from jaxgpt.config import GPTConfig

    ckpt = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
    model = GPT(GPTConfig.from_dict({"bias": True, "dropout": 0.0, **ckpt["model_args"]}))
    model.load_state_dict({k.removeprefix("_orig_mod."): v for k, v in ckpt["model"].items()})
    torch.manual_seed(args.seed)
    ids = torch.tensor([list(args.prompt.encode())])
    t = time.perf_counter()
    for _ in range(args.num_samples):  # one at a time, as nanoGPT's sample.py
        out = generate(model, ids, args.max_new_tokens, temperature=args.temperature,
                       top_k=min(args.top_k, model.config.vocab_size), use_cache=False)
        print(bytes(out[0].tolist()).decode("utf-8", errors="replace"))
        print("---------------")
    print(f"{args.num_samples * args.max_new_tokens / (time.perf_counter() - t):.0f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
