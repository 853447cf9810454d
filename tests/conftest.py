"""Shared fixtures: tiny configs so compile time stays small on a 2-core CPU."""
from __future__ import annotations

import os
import tempfile

import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig

# The CLIs keep JAX's compilation cache under $XDG_CACHE_HOME; give the test session its own (the
# CLI subprocesses inherit it), so tests neither read nor fill the user's cache.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="jaxgpt-test-cache-")



def pytest_report_header() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    return "versions: " + ", ".join(f"{n} {v(n)}" for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                                                             "torch", "transformers", "tokenizers"))


TINY = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


@pytest.fixture(scope="session")
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture()
def tiny_model() -> GPT:
    model = GPT(TINY, rngs=nnx.Rngs(0))
    model.eval()
    return model
