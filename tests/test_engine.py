"""The serving engine with plain function calls (no HTTP): a sequence that has left the queue but is still in
its prefill holds its slot, so submit() counts no room that is not there and close() gives it its last event."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from jaxgpt.serve import engine as eng


def test_a_sequence_in_its_prefill_holds_its_slot_for_submit_and_close(tiny_model, monkeypatch):
    inside, release = threading.Event(), threading.Event()
    engine = eng.Engine(tiny_model, slots=1, chunk=2, max_queue=1)
    prefill = engine.prefill

    def slow_prefill(*args, **kwargs):  # the engine's thread stops here, between the queue and the slot
        inside.set()
        release.wait(30)
        return prefill(*args, **kwargs)
    monkeypatch.setattr(engine, "prefill", slow_prefill)
    finished: dict[str, list] = {"a": [], "b": []}

    def job(name: str) -> eng.Job:
        return eng.Job(np.array([1, 2, 3]), max_tokens=50, emit=lambda tokens, end: end and finished[name].append(end))
    try:
        engine.submit([job("a")])
        assert inside.wait(60), "the engine never started the prefill"
        assert engine.stats()["slots_in_use"] == 1  # "a" is in its prefill: the one slot is taken
        engine.submit([job("b")])  # the queue of one holds "b"
        with pytest.raises(eng.QueueFull):
            engine.submit([job("c")])  # no room: one slot busy, one queued
        closing = threading.Thread(target=engine.close)
        closing.start()
        release.set()
        closing.join(60)
        assert not closing.is_alive()
    finally:
        release.set()
    assert finished == {"a": ["cancelled"], "b": ["cancelled"]}
