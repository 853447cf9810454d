"""From a sequence's tokens to the text a client receives: whole UTF-8 characters only, and nothing
that a stop string will take back.

A byte-level model's partial UTF-8 characters wait in the tokenizer's stream decoder; a possible
beginning of a stop string waits in StopFilter. Both hold at most a few characters, so a client
never receives broken or retracted text, and the work per character is bounded by the server's
limits (at most 4 stop strings of at most 64 characters), not by what a request asks for.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxgpt.serve.engine import Job


def _failure(s: str) -> list[int]:
    """Knuth-Morris-Pratt: for each prefix of s, the length of its longest proper suffix that is
    also a prefix of s."""
    fail, k = [0] * len(s), 0
    for i in range(1, len(s)):
        while k and s[i] != s[k]:
            k = fail[k - 1]
        if s[i] == s[k]:
            k += 1
        fail[i] = k
    return fail


class StopFilter:
    """Text in, text out: holds back the end of the text while it could still begin a stop string,
    and stops at the first stop string to be completed (the text before it is emitted, the rest
    dropped; of two completed by the same character, the longer) — where generation would stop,
    however the text was split into pieces.

    One Knuth-Morris-Pratt matcher state per stop string, advanced a character at a time: amortised O(1)
    per character and stop string."""

    def __init__(self, stops: list[str]):
        self.stops, self.fail = stops, [_failure(s) for s in stops]
        self.state = [0] * len(stops)
        self.pending, self.stopped = "", False

    def push(self, text: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return text
        held = len(self.pending)
        text = self.pending + text
        for i in range(held, len(text)):
            ch, done = text[i], 0
            for n, s in enumerate(self.stops):
                k = self.state[n]
                while k and s[k] != ch:
                    k = self.fail[n][k - 1]
                self.state[n] = k = k + 1 if s[k] == ch else 0
                if k == len(s):
                    done = max(done, k)  # of the stops completed here, the longest starts first
            if done:
                self.stopped, self.pending = True, ""
                return text[:i + 1 - done]
        keep = max(self.state, default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass(frozen=True)
class Params:
    """A request's sampling settings, checked against the server's limits."""

    max_tokens: int
    temperature: float
    top_k: int | None
    top_p: float
    n: int
    seed: int
    stream: bool
    stops: list[str]
    include_usage: bool


class Choice:
    """One sequence being generated: its job in the engine, and the text pipeline after it."""

    def __init__(self, index: int, prompt: np.ndarray, p: Params, tokenizer: Any, loop: asyncio.AbstractEventLoop):
        self.index = index
        self.queue: asyncio.Queue[tuple[list[int], str | None]] = asyncio.Queue()
        self.tokenizer, self.decoder, self.stop = tokenizer, tokenizer.stream_decoder(), StopFilter(p.stops)
        self.finish: str | None = None  # 'stop', 'length', or 'error' (the engine failed: no 200 is sent)
        self.tokens = 0  # produced by the engine
        self.text = ""  # returned to the client

        def emit(tokens: list[int], finish: str | None) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (tokens, finish))
        self.job = Job(prompt, p.max_tokens, emit, p.temperature, p.top_k, p.top_p, p.seed + index % p.n)

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it becomes final, then sets self.finish."""
        while self.finish is None:
            tokens, finish = await self.queue.get()
            self.tokens += len(tokens)
            text = self.stop.push(self.decoder.feed(tokens))
            if finish is not None and not self.stop.stopped:  # the last tokens: what the decoder and filter still hold
                text += self.stop.push(self.decoder.flush())
                text += "" if self.stop.stopped else self.stop.flush()
            if self.stop.stopped:
                self.job.cancel()
                self.finish = "stop"
            elif finish is not None:
                self.finish = "error" if finish == "error" else "length"
            if text:
                self.text += text
                yield text

    def returned_tokens(self) -> int:
        """The tokens behind the text the client got: all produced ones, unless a stop string cut the
        text (then the returned text, encoded again: exact for byte- and character-level tokenizers)."""
        if self.finish != "stop":
            return self.tokens
        return min(self.tokens, len(self.tokenizer.encode(self.text))) if self.text else 0
