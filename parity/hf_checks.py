"""Parity against `transformers` itself — the reference nobody here wrote. Tiny random GPT-2s
are built with transformers in a temporary folder (gelu_new, biases, a BPE tokenizer.json
trained on a small corpus; and one with GPT-2 124M's vocabulary and positions but one thin
layer), imported through formats/hf.py and compared in float32 on CPU.
"""
from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from parity import tolerances as tol
from parity.rows import Result, jax_logits, logits_diff, max_diff, synthetic_corpus

GREEDY_TOKENS = 100


def missing() -> str | None:
    """Why the checks cannot run here (None when they can)."""
    for module in ("torch", "transformers", "tokenizers"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed (pip install 'jaxgpt[dev]')"
    return None


def _quiet_transformers() -> None:
    """No progress bars or load reports from transformers in the table's output."""
    from transformers.utils import logging
    logging.disable_progress_bar()
    logging.set_verbosity_error()


def corpus_text(n_bytes: int = 30_000, seed: int = 0) -> str:
    return synthetic_corpus(n_bytes, seed).astype(np.uint8).tobytes().decode()


def train_bpe(folder: Path, vocab_size: int = 400) -> None:
    """A byte-level BPE tokenizer.json trained on the synthetic corpus, as GPT-2's is built."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus_text()], trainer)
    tok.save(str(folder / "tokenizer.json"))


def make_hf_model(folder: Path, kind: str = "bpe") -> object:
    """A random GPT2LMHeadModel saved with save_pretrained (weights scaled up so logits are not
    all near zero); 'bpe': 2 layers, gelu_new, a trained BPE tokenizer; 'gpt2-vocab': GPT-2
    124M's vocabulary (50257) and positions (1024), one thin layer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    _quiet_transformers()
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        train_bpe(folder)
        from tokenizers import Tokenizer
        vocab = Tokenizer.from_file(str(folder / "tokenizer.json")).get_vocab_size()
        cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, n_positions=128, vocab_size=vocab)
    else:
        cfg = GPT2Config(n_layer=1, n_embd=64, n_head=2, n_positions=1024, vocab_size=50257)
    cfg.bos_token_id = cfg.eos_token_id = None
    torch.manual_seed(0)
    model = GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return model


def _hf_logits(model: object, idx: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def check_logits() -> list[Result]:
    from formats.io import load_any

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("bpe", "gpt2-vocab"):
            hf = make_hf_model(Path(tmp) / kind, kind)
            model, _ = load_any(Path(tmp) / kind)
            idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, min(model.config.block_size, 128)))
            out.append(Result("logits vs transformers", f"{kind} T={idx.shape[1]}",
                              logits_diff(jax_logits(model, idx), _hf_logits(hf, idx)), tol.LOGITS_TOL))
    return out


def check_greedy() -> list[Result]:
    """jaxgpt's greedy decoding (KV cache) vs transformers' generate(do_sample=False)."""
    import torch

    from formats.io import load_any
    from jaxgpt.sample import generate

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_hf_model(Path(tmp) / "bpe", "bpe")
        model, info = load_any(Path(tmp) / "bpe")
        prompt = info["tokenizer"].encode("the king and the queen")[None]
        ours = generate(model, prompt, GREEDY_TOKENS, temperature=0.0)
        with torch.no_grad():
            theirs = hf.generate(torch.from_numpy(prompt.astype(np.int64)), max_new_tokens=GREEDY_TOKENS, do_sample=False,
                                 eos_token_id=None, pad_token_id=0).numpy()
    return [Result(f"greedy {GREEDY_TOKENS} tokens vs transformers, mismatches", "bpe",
                   float((ours != theirs).sum()) if ours.shape == theirs.shape else np.inf, 0.0)]


def check_roundtrip() -> list[Result]:
    """HF folder -> jaxgpt run folder -> HF folder: every tensor bit-exact (lm_head is tied)."""
    from safetensors.numpy import load_file

    from formats.io import load_any, save_hf, save_jaxgpt

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_hf_model(tmp / "bpe", "bpe")
        model, info = load_any(tmp / "bpe")
        save_jaxgpt(model, tmp / "run", info)
        model, info = load_any(tmp / "run")
        save_hf(model, tmp / "back", info)
        a, b = load_file(str(tmp / "bpe" / "model.safetensors")), load_file(str(tmp / "back" / "model.safetensors"))
        worst = max(max_diff(a[k], b[k]) for k in a) if a.keys() == b.keys() else np.inf
        same_tokenizer = (tmp / "bpe" / "tokenizer.json").read_bytes() == (tmp / "back" / "tokenizer.json").read_bytes()
    return [Result("roundtrip HF -> jaxgpt -> HF, every tensor", f"{len(a)} tensors", worst, tol.ROUNDTRIP_ATOL),
            Result("roundtrip HF -> jaxgpt -> HF, tokenizer.json bytes differ", "bpe", float(not same_tokenizer), 0.0)]


def check_export() -> list[Result]:
    """A byte-level jaxgpt model exported to an HF folder: transformers' logits and tokenizer."""
    from flax import nnx
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from formats.io import save_hf
    from jaxgpt import GPT, ByteTokenizer, GPTConfig

    cfg = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
    model = GPT(cfg, rngs=nnx.Rngs(7))
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, Path(tmp) / "out", {"tokenizer": ByteTokenizer()})
        hf = GPT2LMHeadModel.from_pretrained(Path(tmp) / "out").eval()
        tok = AutoTokenizer.from_pretrained(Path(tmp) / "out")
        idx = np.random.default_rng(1).integers(0, 256, (2, 64))
        ids_ok = tok.encode("KING") == [75, 73, 78, 71] and tok.decode(list(range(65, 70))) == "ABCDE"
    return [Result("byte-level export: transformers logits", "2 layers, no bias",
                   logits_diff(jax_logits(model, idx), _hf_logits(hf, idx)), tol.LOGITS_TOL),
            Result("byte-level export: tokenizer ids != bytes", "KING, ABCDE", float(not ids_ok), 0.0)]


def check_finetune(steps: int = 30) -> list[Result]:
    """Fine-tuning an imported folder on new text lowers its held-out loss (relative drop)."""
    from flax import nnx

    from formats.io import load_any
    from jaxgpt.config import TrainConfig
    from jaxgpt.data import prepare_text
    from jaxgpt.train import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_hf_model(tmp / "bpe", "bpe")
        model, info = load_any(tmp / "bpe")
        new_text = synthetic_corpus(40_000, seed=3).astype(np.uint8).tobytes()
        prepare_text(new_text, tmp / "data" / "new", "synthetic", tokenizer=info["tokenizer"])
        tc = TrainConfig(dataset="new", data_dir=str(tmp / "data"), out_dir=str(tmp / "ft"), batch_size=8, max_iters=steps,
                         eval_interval=steps, eval_iters=4, warmup_iters=0, learning_rate=1e-3, min_lr=1e-3,
                         progress=False, plot=False)
        cfg = model.config
        params = nnx.state(model, nnx.Param)
        before = train(cfg, TrainConfig(**{**tc.to_dict(), "out_dir": str(tmp / "zero"), "max_iters": 1,
                                           "learning_rate": 0.0, "min_lr": 0.0, "eval_interval": 1}),
                       init_params=params, tokenizer=info["tokenizer"])["val_loss"]
        after = train(cfg, tc, init_params=params, tokenizer=info["tokenizer"])["val_loss"]
    return [Result(f"fine-tune {steps} steps: val loss after / before", f"{before:.3f} -> {after:.3f}",
                   after / before, tol.FINETUNE_LOSS_RATIO)]


def hellaswag_examples(tokenizer: object, n: int = 24, seed: int = 0) -> list:
    """HellaSwag-shaped examples (a context, 4 endings, a label) from the synthetic corpus's words, tokenized."""
    from jaxgpt.hellaswag import encode

    words = corpus_text(4000, seed).split()
    rng = np.random.default_rng(seed)
    def phrase(k: int) -> str:
        start = int(rng.integers(0, len(words) - k))
        return " ".join(words[start:start + k])
    raw = [{"ctx": phrase(int(rng.integers(3, 12))), "endings": [phrase(int(rng.integers(1, 8))) for _ in range(4)],
            "label": int(rng.integers(0, 4))} for _ in range(n)]
    return encode(raw, tokenizer)


def torch_hellaswag(logits_of: Callable, examples: list) -> list[tuple[int, int]]:
    """The PyTorch twin of jaxgpt.hellaswag.score, build-nanogpt's way: one example at a time, its 4 rows padded
    to the longest, losses of the ending tokens -> (acc's pick, acc_norm's pick) per example."""
    import torch
    import torch.nn.functional as F

    picks = []
    for ex in examples:
        rows = [ex.context + e for e in ex.endings]
        width = max(len(r) for r in rows)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, :len(r)] = torch.tensor(r)
            mask[i, len(ex.context):len(r)] = 1
        with torch.no_grad():
            logits = logits_of(tokens)
        losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten(), reduction="none").view(4, -1)
        shifted = mask[:, 1:]
        total = (losses * shifted).sum(dim=1)
        picks.append((int(total.argmin()), int((total / shifted.sum(dim=1)).argmin())))
    return picks


def check_hellaswag() -> list[Result]:
    """HellaSwag's per-example choices (acc and acc_norm): jaxgpt (batched, bucketed, jitted) vs the PyTorch
    twin and vs transformers, on the same weights."""
    import torch

    from formats.io import load_any
    from jaxgpt import hellaswag
    from parity.twins import jax_to_torch_model

    with tempfile.TemporaryDirectory() as tmp:
        hf = make_hf_model(Path(tmp) / "bpe", "bpe")
        model, info = load_any(Path(tmp) / "bpe")
    examples = hellaswag_examples(info["tokenizer"])
    ours = hellaswag.score(model, examples, batch_size=5)
    twin = jax_to_torch_model(model)
    out = []
    for name, logits_of in (("torchref", twin), ("transformers", lambda t: hf(t).logits)):
        with torch.no_grad():
            picks = torch_hellaswag(logits_of, examples)
        out.append(Result(f"HellaSwag choices vs {name}, mismatches (acc, acc_norm)", f"{len(examples)} examples",
                          float(sum(a != b for pa, pb in zip(ours.choices, picks, strict=True) for a, b in zip(pa, pb, strict=True))),
                          0.0))
    return out


def hf_checks() -> Iterator[Callable[[], list[Result]]]:
    yield check_logits
    yield check_greedy
    yield check_roundtrip
    yield check_export
    yield check_finetune
    yield check_hellaswag
