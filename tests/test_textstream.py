"""The text pipeline between the engine and a client (jaxgpt/serve/textstream.py): whole UTF-8 characters,
stop strings cut where generation would stop however the text arrives, nothing sent and then retracted,
and per-character work bounded by the limits (a worst-case stop request timed against a plain one)."""
from __future__ import annotations

import asyncio
import time

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from jaxgpt import ByteTokenizer
from jaxgpt.serve.api import MAX_STOP_CHARS, MAX_STOPS
from jaxgpt.serve.textstream import Choice, Params, StopFilter


def test_stop_filter_holds_back_a_possible_stop_prefix_and_cuts_at_the_stop():
    f = StopFilter(["\n\n", "END"])
    assert f.push("Hello\n") == "Hello" and f.push("World") == "\nWorld"
    assert f.push(" E") == " " and f.push("N") == "" and f.push("Dgame") == "" and f.stopped
    g = StopFilter(["abc"])
    assert g.push("xxab") == "xx" and g.push("d") == "abd" and not g.stopped and g.flush() == ""


def _reference(text: str, stops: list[str]) -> str:
    """Where generation stops: at the first position that ends a stop string (the longest, if several)."""
    for end in range(1, len(text) + 1):
        done = [len(s) for s in stops if text[:end].endswith(s)]
        if done:
            return text[:end - max(done)]
    return text


@given(text=st.text("abc\n", max_size=40), stops=st.lists(st.text("abc\n", min_size=1, max_size=6), min_size=1,
                                                          max_size=MAX_STOPS), cuts=st.lists(st.integers(0, 40)))
@example(text="xab", stops=["b", "ab"], cuts=[]).via("two stops completed by the same character: the longer wins")
@example(text="aaab", stops=["aab"], cuts=[1, 2, 3]).via("a partial match that restarts inside itself")
def test_the_text_sent_is_the_text_up_to_the_first_stop_however_it_is_split(text, stops, cuts):
    f, sent = StopFilter(stops), []
    bounds = sorted({0, len(text), *[min(c, len(text)) for c in cuts]})
    for a, b in zip(bounds, bounds[1:], strict=False):
        sent.append(f.push(text[a:b]))
        assert len(f.pending) < max(map(len, stops)), "more held back than a stop string's prefix"
    out = "".join(sent) + ("" if f.stopped else f.flush())
    assert out == _reference(text, stops)


def _per_char_s(stops: list[str], text: str, piece: int = 8) -> float:
    best = float("inf")
    for _ in range(3):
        f = StopFilter(stops)
        start = time.perf_counter()
        for i in range(0, len(text), piece):
            f.push(text[i:i + piece])
        best = min(best, time.perf_counter() - start)
        assert not f.stopped
    return best / len(text)


def test_the_worst_allowed_stop_strings_cost_a_bounded_factor_of_a_plain_request_per_character():
    """Four stop strings of the longest allowed length that keep almost matching ('aaa...ab' against a
    text of 'a's) against one short stop string: the filter's work per character differs by a small
    factor (before the matcher, it searched the held-back text again at every piece: 26x here, 2.7x after)."""
    text = "a" * 20_000
    worst = _per_char_s(["a" * (MAX_STOP_CHARS - 1) + c for c in "bcde"[:MAX_STOPS]], text)
    plain = _per_char_s(["\n"], text)
    assert worst < 8 * plain, f"{worst * 1e6:.2f} us per character against {plain * 1e6:.2f} us"


def test_utf8_characters_and_stop_strings_are_never_sent_broken_or_retracted():
    """Byte by byte through a choice's pipeline: every delta is whole characters, the text stops right
    before the stop string even when it arrives split over chunks, and usage counts what was returned."""
    async def run() -> tuple[list[str], Choice]:
        loop = asyncio.get_running_loop()
        params = Params(max_tokens=100, temperature=0.0, top_k=None, top_p=1.0, n=1, seed=0, stream=False,
                        stops=["世界!"], include_usage=False)
        choice = Choice(0, np.zeros(1, np.int32), params, ByteTokenizer(), loop)
        for byte in "héllo 世界? 世界! tail".encode():
            choice.queue.put_nowait(([byte], None))
        choice.queue.put_nowait(([], "length"))
        out = [d async for d in choice.deltas()]
        assert choice.finish == "stop" and choice.job.cancelled
        return out, choice
    deltas, choice = asyncio.run(run())
    assert "".join(deltas) == "héllo 世界? "
    assert all("\ufffd" not in d for d in deltas), deltas
    assert choice.tokens > choice.returned_tokens()
    assert choice.returned_tokens() == len("héllo 世界? ".encode()), "usage must count the returned text's tokens"


def test_the_stop_filters_work_per_character_is_bounded_whatever_the_stops():
    """Four 64-character stop strings that keep almost matching the text (the worst the limits allow): the
    matcher reads a bounded number of stop characters per character of text and stop string (amortised
    Knuth-Morris-Pratt), counted, not timed."""
    reads = [0]

    class Counted(str):
        def __getitem__(self, key):
            reads[0] += 1
            return str.__getitem__(self, key)
    text = ("abaabaaabaaaab" * 60)[:800]
    stops = [Counted((text * 2)[i:i + 63] + "\x00") for i in (0, 7, 19, 33)]
    f = StopFilter(stops)
    out = "".join(f.push(text[i:i + 3]) for i in range(0, len(text), 3)) + f.flush()
    assert out == text and not f.stopped
    assert reads[0] <= 4 * len(text) * len(stops), f"{reads[0]} reads for {len(text)} characters x {len(stops)} stops"
