"""THE conversion table between jaxgpt parameters and nanoGPT/torchref state_dict names.

Used in both directions, so a name can only be wrong in one place. Three facts cover it:
- Linear kernels are stored (in, out) in Flax and (out, in) in torch: transpose.
- jaxgpt stacks the n_layer blocks (leading layer axis); torch numbers them h.0, h.1, ...
- lm_head.weight is tied to transformer.wte.weight in both models.
"""
from __future__ import annotations

import re
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torchref
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT

# (jaxgpt path, torch name, transpose?) — torch names below are prefixed with "transformer."
TOP_TABLE = [
    ("wte.embedding", "wte.weight", False),
    ("wpe.embedding", "wpe.weight", False),
    ("ln_f.scale", "ln_f.weight", False),
    ("ln_f.bias", "ln_f.bias", False),
]
# per block: jaxgpt's h.<path>[i] <-> torch's transformer.h.<i>.<name>
LAYER_TABLE = [
    ("ln_1.scale", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.c_attn.kernel", "attn.c_attn.weight", True),
    ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.c_proj.kernel", "attn.c_proj.weight", True),
    ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.scale", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.c_fc.kernel", "mlp.c_fc.weight", True),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.kernel", "mlp.c_proj.weight", True),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]
TIED_HEAD = "lm_head.weight"  # == transformer.wte.weight
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key
# nanoGPT without flash attention registers its causal mask as a buffer named attn.bias
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


def _entries(cfg: GPTConfig) -> list[tuple[str, int | None, str, bool]]:
    """Every parameter as (jax path, layer index or None, torch name, transpose?)."""
    keep = (lambda name: cfg.bias or not name.endswith(".bias"))
    out = [(jp, None, "transformer." + tn, t) for jp, tn, t in TOP_TABLE if keep(tn)]
    for i in range(cfg.n_layer):
        out += [("h." + jp, i, f"transformer.h.{i}.{tn}", t) for jp, tn, t in LAYER_TABLE if keep(tn)]
    return out


def flat_params(model: GPT) -> dict[str, np.ndarray]:
    """jaxgpt parameters as {"h.attn.c_attn.kernel": array, ...} (layer params keep their stacked axis)."""
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def model_args_from_config(cfg: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> nanoGPT's `model_args` dict (the field names are the same by design)."""
    return cfg.to_dict()


def config_from_model_args(model_args: dict[str, Any]) -> GPTConfig:
    """nanoGPT's `model_args` -> GPTConfig; names the keys that are missing."""
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in model_args]
    if missing:
        raise UserError(f"model_args lacks {missing}; is this a nanoGPT checkpoint?")
    return GPTConfig.from_dict({"bias": True, "dropout": 0.0, **model_args})


def to_torch_state_dict(model: GPT) -> dict[str, torch.Tensor]:
    """jaxgpt model -> nanoGPT-named state_dict of CPU torch tensors (lm_head shares wte)."""
    flat = flat_params(model)
    sd: dict[str, torch.Tensor] = {}
    for jax_path, layer, name, transpose in _entries(model.config):
        value = flat[jax_path] if layer is None else flat[jax_path][layer]
        sd[name] = torch.tensor(np.ascontiguousarray(value.T if transpose else value))  # a copy torch owns
    sd[TIED_HEAD] = sd["transformer.wte.weight"]
    return sd


def _clean(sd: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Strip torch.compile prefixes and drop nanoGPT's causal-mask buffers."""
    out = {}
    for k, v in sd.items():
        k = k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k
        if not _MASK_BUFFER.match(k):
            out[k] = v
    return out


def from_torch_state_dict(sd: dict[str, Any], cfg: GPTConfig) -> GPT:
    """nanoGPT/torchref state_dict -> jaxgpt GPT (eval mode, float32).

    Raises UserError listing every missing, unexpected and mis-shaped key."""
    sd = _clean(sd)
    entries = _entries(cfg)
    expected = {name for _, _, name, _ in entries} | {TIED_HEAD}
    abstract = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    flat = {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}
    problems = []
    if missing := sorted(expected - {TIED_HEAD} - sd.keys()):
        problems.append(f"missing keys {missing}")
    if unexpected := sorted(sd.keys() - expected):
        problems.append(f"unexpected keys {unexpected}")
    values: dict[str, list] = {}
    for jax_path, layer, name, transpose in entries:
        if name not in sd:
            continue
        if not isinstance(sd[name], torch.Tensor):
            problems.append(f"{name} is a {type(sd[name]).__name__}, not a tensor")
            continue
        arr = sd[name].detach().to("cpu", torch.float32).numpy()
        arr = arr.T if transpose else arr
        want = flat[jax_path].shape if layer is None else flat[jax_path].shape[1:]
        if arr.shape != tuple(want):
            problems.append(f"{name} has shape {tuple(sd[name].shape)}, expected "
                            f"{tuple(want)[::-1] if transpose else tuple(want)}")
        values.setdefault(jax_path, []).append(arr)
    if TIED_HEAD in sd and "transformer.wte.weight" in sd and not problems:
        if not torch.equal(sd[TIED_HEAD].float(), sd["transformer.wte.weight"].float()):
            problems.append(f"{TIED_HEAD} differs from transformer.wte.weight; jaxgpt ties them")
    if problems:
        raise UserError("state_dict does not match GPTConfig " + str(cfg.to_dict()) + ": " + "; ".join(problems))
    for jax_path, arrays in values.items():
        value = arrays[0] if not jax_path.startswith("h.") else np.stack(arrays)
        flat[jax_path].set_value(jnp.asarray(value))
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


def jax_to_torch_model(model: GPT) -> torchref.GPT:
    """A torchref.GPT (eval mode) holding the same weights as `model`."""
    tmodel = torchref.GPT(model.config)
    tmodel.load_state_dict(to_torch_state_dict(model))
    return tmodel.eval()


def torch_to_jax_model(tmodel: torchref.GPT) -> GPT:
    return from_torch_state_dict(tmodel.state_dict(), tmodel.config)
