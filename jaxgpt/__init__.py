"""jaxgpt: a byte-level GPT in JAX + Flax NNX, proven against a PyTorch twin.

The names below load on first use, so `import jaxgpt.config` or `jaxgpt.data` (the PyTorch twin's
training loop uses them) does not import JAX.
"""
from typing import Any

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ByteTokenizer", "UserError"]
__version__ = "0.1.0"
_HOMES = {"GPT": "jaxgpt.model", "GPTConfig": "jaxgpt.config", "TrainConfig": "jaxgpt.config",
          "ByteTokenizer": "jaxgpt.tokenizer", "UserError": "jaxgpt.errors"}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'jaxgpt' has no attribute {name!r}")
