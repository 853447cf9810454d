"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary is exactly 256.

No training, no merges, no unknown tokens: any text round-trips. The price is that a
character may span several tokens, so decoding must tolerate partial sequences — hence
`errors="replace"` for whole decodes and an incremental decoder for streaming.
"""
from __future__ import annotations

import codecs
import pickle
from collections.abc import Iterable
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256


class ByteTokenizer:
    """UTF-8 bytes <-> token ids (uint8 values in int32 arrays)."""

    vocab_size = VOCAB_SIZE
    name = "bytes"

    def encode(self, text: str) -> np.ndarray:
        """str -> int32 array of byte values, shape (len(text.encode()),)."""
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """ids -> str; invalid or truncated UTF-8 becomes U+FFFD instead of raising."""
        return bytes(np.asarray(ids, dtype=np.int64).astype(np.uint8).tolist()).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder()


class StreamDecoder:
    """Decodes token by token; holds back bytes of a character that is not complete yet."""

    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Feed one token id; returns the text that became complete (often '')."""
        return self._dec.decode(bytes([int(token) & 0xFF]))

    def feed(self, tokens: Iterable[int] | np.ndarray) -> str:
        """Feed several token ids at once (same result as pushing them one by one)."""
        return self._dec.decode(np.asarray(tokens, np.int64).astype(np.uint8).tobytes())

    def flush(self) -> str:
        """End of stream: whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)


class CharTokenizer:
    """nanoGPT's character-level vocabulary (from its meta.pkl): one token per character."""

    name = "chars"

    def __init__(self, stoi: dict[str, int], itos: dict[int, str]):
        self.stoi, self.itos = stoi, itos
        self.vocab_size = len(itos)

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
            from jaxgpt.errors import UserError
            raise UserError(f"characters {unknown[:10]} are not in this model's vocabulary of {self.vocab_size}")
        return np.array([self.stoi[c] for c in text], dtype=np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return "".join(self.itos.get(int(i), "\ufffd") for i in np.asarray(ids).reshape(-1))

    def stream_decoder(self) -> _CharStream:
        return _CharStream(self)


class _CharStream:
    def __init__(self, tok: CharTokenizer):
        self.tok = tok

    def push(self, token: int) -> str:
        return self.tok.decode([token])

    def feed(self, tokens: Iterable[int] | np.ndarray) -> str:
        return self.tok.decode(tokens)

    def flush(self) -> str:
        return ""


class _NoGlobals(pickle.Unpickler):
    """Unpickles plain data only: any class or function reference (how pickle runs code) is refused."""

    def find_class(self, module: str, name: str):  # noqa: ANN201
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only plain data is allowed")


def load_meta_pkl(path: str | Path) -> CharTokenizer:
    """nanoGPT's meta.pkl ({'vocab_size', 'itos', 'stoi'}) read without executing pickle code."""
    from jaxgpt.errors import UserError
    try:
        with open(path, "rb") as f:
            meta = _NoGlobals(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} as a nanoGPT meta.pkl ({e})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("stoi"), dict) and isinstance(meta.get("itos"), dict)):
        raise UserError(f"{path} is not a nanoGPT meta.pkl (expected a dict with 'stoi' and 'itos')")
    return CharTokenizer(meta["stoi"], meta["itos"])
