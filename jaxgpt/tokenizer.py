"""Tokenizers behind one interface: encode, decode, stream_decoder (push / feed / flush),
vocab_size and identity() — what data and runs record to tell tokenizers apart.

- ByteTokenizer, the default: a token is one UTF-8 byte, so the vocabulary is exactly 256. No
  training, no merges, no unknown tokens: any text round-trips. A character may span several
  tokens, so decoding tolerates partial sequences (`errors="replace"`, an incremental decoder).
- HFTokenizer: any `tokenizer.json` (Hugging Face `tokenizers`, e.g. GPT-2's BPE), for imported
  models and data prepared with --tokenizer; invalid UTF-8 decodes to U+FFFD as for bytes.
- CharTokenizer: nanoGPT's character-level meta.pkl, for its char-level checkpoints.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import pickle
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from jaxgpt.errors import UserError

VOCAB_SIZE = 256
TOKENIZER_FILE = "tokenizer.json"  # the file a run, a data folder or a Hugging Face folder carries
BYTES_IDENTITY = {"kind": "bytes", "vocab_size": VOCAB_SIZE}
EOT_TEXT = "<|endoftext|>"  # GPT-2-style tokenizers' end-of-text token
# byte-level data's end of a document: 0xFF never occurs in UTF-8 text, so it is an unambiguous one-token
# boundary the model can learn, and the vocabulary stays 256
EOT_BYTE = 0xFF


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

    def identity(self) -> dict[str, Any]:
        return dict(BYTES_IDENTITY)


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

    def identity(self) -> dict[str, Any]:
        return {"kind": "chars", "vocab_size": self.vocab_size}

    def encode(self, text: str) -> np.ndarray:
        unknown = sorted(set(text) - self.stoi.keys())
        if unknown:
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
    try:
        with open(path, "rb") as f:
            meta = _NoGlobals(f).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise UserError(f"cannot read {path} as a nanoGPT meta.pkl ({e})") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("stoi"), dict) and isinstance(meta.get("itos"), dict)):
        raise UserError(f"{path} is not a nanoGPT meta.pkl (expected a dict with 'stoi' and 'itos')")
    return CharTokenizer(meta["stoi"], meta["itos"])


class HFTokenizer:
    """A Hugging Face `tokenizer.json` through the `tokenizers` library (the `hf` extra)."""

    name = "tokenizer.json"

    def __init__(self, path: str | Path):
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise UserError(f"{path} needs the `tokenizers` package; pip install 'jaxgpt[hf]'") from None
        from jaxgpt import paths

        self.path = paths.path(path)
        try:
            self.raw = self.path.read_bytes()
            self.tok = Tokenizer.from_str(self.raw.decode("utf-8"))
        except (OSError, UnicodeDecodeError, Exception) as e:  # tokenizers raises its own Exception type
            raise UserError(f"cannot read {path} as a tokenizer.json ({str(e)[:160]})") from None
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def identity(self) -> dict[str, Any]:
        return {"kind": "tokenizer.json", "vocab_size": self.vocab_size, "sha256": hashlib.sha256(self.raw).hexdigest()}

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        return self.tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

    def stream_decoder(self) -> _HFStream:
        return _HFStream(self)


class _HFStream:
    """Incremental decoding for any tokenizer: decode the tokens since the last emitted boundary
    and emit the new text once it no longer ends in U+FFFD (an incomplete character). flush()
    emits what is left, replacement characters included (like the byte decoder)."""

    def __init__(self, tok: HFTokenizer):
        self.tok, self.prefix, self.read = tok, 0, 0
        self.ids: list[int] = []

    def push(self, token: int) -> str:
        return self.feed([token])

    def feed(self, tokens: Iterable[int] | np.ndarray) -> str:
        out = []
        for t in np.asarray(tokens).reshape(-1):
            self.ids.append(int(t))
            done = self.tok.decode(self.ids[self.prefix:self.read])
            text = self.tok.decode(self.ids[self.prefix:])
            if len(text) > len(done) and not text.endswith("\ufffd"):
                out.append(text[len(done):])
                self.prefix, self.read = self.read, len(self.ids)
        if self.prefix > 4096:  # keep the window short on endless streams
            del self.ids[:self.prefix]
            self.read -= self.prefix
            self.prefix = 0
        return "".join(out)

    def flush(self) -> str:
        done = self.tok.decode(self.ids[self.prefix:self.read])
        text = self.tok.decode(self.ids[self.prefix:])
        self.ids, self.prefix, self.read = [], 0, 0
        return text[len(done):]


Tokenizer = ByteTokenizer | HFTokenizer | CharTokenizer

# GPT-2's pre-tokenizer (tokenizers' ByteLevel with use_regex), as a tiktoken pattern
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte (tokenizers' ByteLevel), inverted."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


def tiktoken_twin(raw: bytes) -> Any | None:
    """A tiktoken Encoding with the ids of this tokenizer.json, or None where it cannot be one: a byte-level
    BPE with GPT-2's pre-tokenizer, no normalizer, special added tokens only, and merges whose results have
    increasing ids (tiktoken merges by rank = id; tokenizers by merge order). `prepare` also checks the twin
    against tokenizers on a probe and on the corpus before trusting it. ~6x tokenizers' speed on one core."""
    try:
        import tiktoken
        spec = json.loads(raw)
    except (ImportError, ValueError):
        return None
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Sequence" and len(pre.get("pretokenizers") or []) == 1:
        pre = pre["pretokenizers"][0]
    if (model.get("type") != "BPE" or model.get("dropout") or model.get("continuing_subword_prefix")
            or model.get("end_of_word_suffix") or model.get("byte_fallback") or spec.get("normalizer")
            or pre != {**pre, "type": "ByteLevel", "add_prefix_space": False, "use_regex": True}):
        return None
    added = spec.get("added_tokens") or []
    if not all(t.get("special") for t in added):
        return None
    special = {t["content"]: t["id"] for t in added}
    vocab, alphabet = model.get("vocab") or {}, _byte_alphabet()
    try:
        ranks = {bytes(alphabet[c] for c in tok): i for tok, i in vocab.items() if tok not in special}
        merged = [vocab["".join(m.split(" ", 1) if isinstance(m, str) else m)] for m in model.get("merges") or []]
    except KeyError:
        return None
    if len(ranks) != len(vocab) - len(special.keys() & vocab.keys()) or any(b >= a for a, b in zip(merged[1:], merged[:-1], strict=True)):
        return None
    try:
        return tiktoken.Encoding("tokenizer.json", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=special)
    except Exception:  # tiktoken refuses the table (e.g. ids it cannot place)
        return None


def load_tokenizer(folder: str | Path) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a run, data or model folder (local or gs://) carries: its tokenizer.json, else bytes."""
    from jaxgpt import paths

    path = paths.path(folder) / TOKENIZER_FILE
    return HFTokenizer(path) if path.exists() else ByteTokenizer()


def same_tokenizer(data_identity: dict, identity: dict) -> bool:
    """Whether data of `data_identity` is what a model of tokenizer `identity` reads; llm.c shards carry no
    tokenizer (kind 'unknown'): their vocabulary is the user's word."""
    return data_identity.get("kind") == "unknown" or data_identity == identity


def check_tokenizer(data_meta: dict, tokenizer: dict, what: str, dataset: str) -> None:
    """UserError when data was tokenized differently from what the model reads."""
    if not same_tokenizer(data_meta["tokenizer_identity"], tokenizer):
        have = data_meta["tokenizer_identity"]
        raise UserError(f"dataset {dataset} was prepared with a {have['kind']} tokenizer (vocab {have['vocab_size']}) but "
                        f"{what} uses a {tokenizer['kind']} tokenizer (vocab {tokenizer['vocab_size']}"
                        f"{', different file' if have['kind'] == tokenizer['kind'] else ''}); prepare the data with "
                        f"--tokenizer set to the model's tokenizer (or without it for bytes)")
