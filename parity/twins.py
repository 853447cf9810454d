"""The PyTorch twin of a jaxgpt model and back, through the one conversion table (formats/table.py).

This is parity's side of conversion: it needs torchref, which the product (formats/) never imports.
"""
from __future__ import annotations

from typing import Any

import torchref
from formats.table import from_torch_state_dict, to_torch_state_dict
from jaxgpt.model import GPT


def jax_to_torch_model(model: GPT) -> torchref.GPT:
    """A torchref.GPT (eval mode) holding the same weights as `model`, multiplying as it does."""
    tmodel = torchref.GPT(model.config, matmul=model.matmul)
    tmodel.load_state_dict(to_torch_state_dict(model))
    return tmodel.eval()


def torch_to_jax_model(tmodel: Any) -> GPT:
    """A jaxgpt GPT (eval mode) holding the weights of a torchref.GPT."""
    return from_torch_state_dict(tmodel.state_dict(), tmodel.config)
