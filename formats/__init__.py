"""formats: jaxgpt models in and out of other frameworks' files — nanoGPT `ckpt.pt`, `.safetensors`,
Hugging Face GPT-2 folders — and jaxgpt run folders, all through one conversion table (table.py).

A user feature (scripts/convert.py, train.py --init_from, generate.py), not a proof: parity/ checks
it. torch is imported only where a format needs it (.pt/.bin), so everything else works without it.
"""
from formats.io import KINDS, kind_of, load_any, need_tokenizer, save_any

__all__ = ["KINDS", "kind_of", "load_any", "need_tokenizer", "save_any"]
