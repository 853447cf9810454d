"""Shared fixtures: tiny configs so compile time stays small on a 2-core CPU."""
from __future__ import annotations

import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig

TINY = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


@pytest.fixture(scope="session")
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture()
def tiny_model() -> GPT:
    model = GPT(TINY, rngs=nnx.Rngs(0))
    model.eval()
    return model
