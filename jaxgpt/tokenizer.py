"""Byte-level tokenizer: a token is one UTF-8 byte, so the vocabulary is exactly 256.

No training, no merges, no unknown tokens: any text round-trips. The price is that a
character may span several tokens, so decoding must tolerate partial sequences — hence
`errors="replace"` for whole decodes and an incremental decoder for streaming.
"""
from __future__ import annotations

import codecs
from collections.abc import Iterable

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

    def flush(self) -> str:
        """End of stream: whatever is left (an incomplete character becomes U+FFFD)."""
        return self._dec.decode(b"", final=True)
