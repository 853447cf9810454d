"""THE conversion table between jaxgpt parameters and nanoGPT / Hugging Face GPT-2 names.

Used in both directions and by every format (nanoGPT ckpt.pt, safetensors, Hugging Face
folders), so a name can only be wrong in one place. Four facts cover it:
- the names are nanoGPT's, which are also GPT-2's in transformers (`transformer.h.0.attn.c_attn.weight`);
- Linear kernels are (in, out) in Flax and in GPT-2's Conv1D, (out, in) in torch's nn.Linear:
  the `layout` argument says which one a state_dict uses ("linear" transposes, "conv1d" does not);
- jaxgpt stacks the n_layer blocks (leading layer axis); the others number them h.0, h.1, ...;
- lm_head.weight is tied to transformer.wte.weight, unless the model unties it (tie_embeddings=False).
The table lists every parameter any recipe has; a model's entries are the rows its parameters
match (a RoPE model has no wpe, an RMSNorm has no bias, qk_norm adds q_norm/k_norm).
It works on numpy arrays: torch is imported only by the torch helpers at the end.
"""
from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.platform import check_model_fits

# (jaxgpt path, name, is a Linear kernel?)
TOP_TABLE = [
    ("wte.embedding", "transformer.wte.weight", False),
    ("wpe.embedding", "transformer.wpe.weight", False),
    ("ln_f.scale", "transformer.ln_f.weight", False),
    ("ln_f.bias", "transformer.ln_f.bias", False),
    ("lm_head.kernel", "lm_head.weight", True),  # untied models only
    ("ve.embedding", "transformer.ve.weight", False),  # value embeddings (value_embeds, vocab, C)
]
# per block: jaxgpt's h.<path>[i] <-> transformer.h.<i>.<name>
LAYER_TABLE = [
    ("ln_1.scale", "ln_1.weight", False),
    ("ln_1.bias", "ln_1.bias", False),
    ("attn.c_attn.kernel", "attn.c_attn.weight", True),
    ("attn.c_attn.bias", "attn.c_attn.bias", False),
    ("attn.q_norm.scale", "attn.q_norm.weight", False),
    ("attn.k_norm.scale", "attn.k_norm.weight", False),
    ("attn.ve_lambda", "attn.ve_lambda", False),
    ("attn.c_proj.kernel", "attn.c_proj.weight", True),
    ("attn.c_proj.bias", "attn.c_proj.bias", False),
    ("ln_2.scale", "ln_2.weight", False),
    ("ln_2.bias", "ln_2.bias", False),
    ("mlp.c_fc.kernel", "mlp.c_fc.weight", True),
    ("mlp.c_fc.bias", "mlp.c_fc.bias", False),
    ("mlp.c_proj.kernel", "mlp.c_proj.weight", True),
    ("mlp.c_proj.bias", "mlp.c_proj.bias", False),
]
LAYOUTS = ("linear", "conv1d")  # nanoGPT/torchref nn.Linear (out, in); GPT-2 Conv1D (in, out)
TIED_HEAD = "lm_head.weight"  # == transformer.wte.weight when tied
COMPILE_PREFIX = "_orig_mod."  # torch.compile wraps the module and prefixes every key
# causal-mask buffers: nanoGPT without flash attention, and transformers before v5
_MASK_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_BLOCK = re.compile(r"^transformer\.h\.(\d+)\.")


def _entries(cfg: GPTConfig, with_bias: bool | None = None) -> list[tuple[str, int | None, str, bool]]:
    """Every parameter of a `cfg` model as (jax path, layer index or None, name, is a Linear kernel?);
    with_bias=True lists the biases a bias=False model would have (GPT-2 export writes zeros)."""
    with_bias = cfg.bias if with_bias is None else with_bias
    present = _shapes(dataclasses.replace(cfg, bias=with_bias))
    out: list[tuple[str, int | None, str, bool]] = [(jp, None, tn, t) for jp, tn, t in TOP_TABLE if jp in present]
    for i in range(cfg.n_layer):
        out += [("h." + jp, i, f"transformer.h.{i}.{tn}", t) for jp, tn, t in LAYER_TABLE if "h." + jp in present]
    return out


@functools.lru_cache(maxsize=64)
def _shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Parameter shapes by jaxgpt path, without creating the arrays."""
    state = nnx.state(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    return {".".join(map(str, p)): tuple(v.shape) for p, v in nnx.to_flat_state(state)}


def flat_params(model: GPT) -> dict[str, np.ndarray]:
    """jaxgpt parameters as {"h.attn.c_attn.kernel": array, ...} (layer params keep their stacked axis)."""
    return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


NANOGPT_ARGS = ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "dropout", "bias")  # nanoGPT's GPTConfig


def model_args_from_config(cfg: GPTConfig) -> dict[str, Any]:
    """GPTConfig -> nanoGPT's `model_args` dict (the field names are the same by design): nanoGPT's
    own keys, then only the fields set away from nanoGPT's model (rope_base with RoPE), so a nanoGPT
    model's ckpt.pt loads in nanoGPT's sample.py (GPTConfig(**model_args) takes no other key)."""
    defaults = GPTConfig()
    args = {k: v for k, v in cfg.to_dict().items() if k in NANOGPT_ARGS or v != getattr(defaults, k) or k == "rope_base"}
    return args if cfg.pos_embedding == "rope" else {k: v for k, v in args.items() if k != "rope_base"}


def check_representable(cfg: GPTConfig, fmt: str, instead: str) -> None:
    """UserError naming the switches `fmt` (nanoGPT's or GPT-2's fixed architecture) cannot hold."""
    if switches := cfg.modern_fields():
        fields = ", ".join(f"{k}={v!r}" for k, v in switches.items())
        raise UserError(f"{fmt} cannot hold this model ({fields}: nanoGPT's architecture has no such switch); "
                        f"convert it to {instead} instead")


def config_from_model_args(model_args: dict[str, Any]) -> GPTConfig:
    """nanoGPT's `model_args` -> GPTConfig; names the keys that are missing."""
    missing = [k for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size") if k not in model_args]
    if missing:
        raise UserError(f"model_args lacks {missing}; is this a nanoGPT checkpoint?")
    return GPTConfig.from_dict({"bias": True, "dropout": 0.0, **model_args})


def to_state_dict(model: GPT, layout: str = "linear", zero_biases: bool = False) -> dict[str, np.ndarray]:
    """jaxgpt model -> {name: float32 array} with lm_head.weight (the same array as wte when tied).
    zero_biases: write explicit zero biases for a bias=False model (GPT-2 always has biases;
    zeros compute the same function)."""
    flat = flat_params(model)
    cfg = model.config
    biased = _shapes(dataclasses.replace(cfg, bias=True)) if zero_biases and not cfg.bias else {}
    sd: dict[str, np.ndarray] = {}
    for jax_path, layer, name, kernel in _entries(cfg, with_bias=cfg.bias or zero_biases):
        if jax_path in flat:
            value = flat[jax_path] if layer is None else flat[jax_path][layer]
        else:  # a bias the model does not have
            value = np.zeros(biased[jax_path][1:] if layer is not None else biased[jax_path], np.float32)
        sd[name] = np.ascontiguousarray(value.T if kernel and layout == "linear" else value)
    if cfg.tie_embeddings:
        sd[TIED_HEAD] = sd["transformer.wte.weight"]
    return sd


def _clean(sd: Mapping[str, Any]) -> dict[str, Any]:
    """Strip torch.compile prefixes and drop causal-mask buffers."""
    out = {}
    for k, v in sd.items():
        k = k[len(COMPILE_PREFIX):] if k.startswith(COMPILE_PREFIX) else k
        if not _MASK_BUFFER.match(k):
            out[k] = v
    return out


def _as_numpy(value: Any) -> np.ndarray | None:
    """float32 numpy array from a numpy array or a torch tensor (duck-typed: no torch import)."""
    if hasattr(value, "detach"):  # torch.Tensor, any dtype (bf16 has no numpy twin)
        return value.detach().to("cpu").float().numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    return None


def _some(names: list[str], most: int = 8) -> str:
    """A list of names for an error line: the first few and how many more."""
    return str(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def from_state_dict(sd: Mapping[str, Any], cfg: GPTConfig, layout: str = "linear") -> GPT:
    """State_dict (numpy arrays or torch tensors, nanoGPT names) -> jaxgpt GPT (eval mode, float32).

    Raises UserError listing every missing, unexpected and mis-shaped key."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_model_fits(cfg, "the checkpoint")
    sd = _clean(sd)
    # a config that disagrees with the weights on the number of blocks is refused before the work
    # below, which grows with the config's claim (a damaged config.json may claim a million layers)
    blocks = {int(m.group(1)) for k in sd if (m := _BLOCK.match(k))}
    if blocks and len(blocks) != cfg.n_layer:
        raise UserError(f"the weights hold {len(blocks)} transformer block(s) but the model config says n_layer="
                        f"{cfg.n_layer}; use the config that was saved with these weights")
    entries = _entries(cfg)
    tied = {TIED_HEAD} if cfg.tie_embeddings else set()  # optional in a tied state_dict (nanoGPT has it)
    expected = {name for _, _, name, _ in entries} | tied
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    shapes = _shapes(cfg)
    problems = []
    if missing := sorted(expected - tied - sd.keys()):
        problems.append(f"missing tensors {_some(missing)}")
    if unexpected := sorted(sd.keys() - expected):
        problems.append(f"unexpected tensors {_some(unexpected)}")
    values: dict[str, list[np.ndarray]] = {}
    for jax_path, layer, name, kernel in entries:
        if name not in sd:
            continue
        arr = _as_numpy(sd[name])
        if arr is None:
            problems.append(f"{name} is a {type(sd[name]).__name__}, not a tensor")
            continue
        transpose = kernel and layout == "linear"
        arr = arr.T if transpose else arr
        want = tuple(shapes[jax_path] if layer is None else shapes[jax_path][1:])
        if arr.shape != want:
            problems.append(f"{name} has shape {tuple(np.shape(sd[name]))}, expected {want[::-1] if transpose else want}")
        values.setdefault(jax_path, []).append(arr)
    if tied and TIED_HEAD in sd and "transformer.wte.weight" in sd and not problems:
        head, wte = _as_numpy(sd[TIED_HEAD]), _as_numpy(sd["transformer.wte.weight"])
        if head is None or wte is None or not np.array_equal(head, wte):
            problems.append(f"{TIED_HEAD} differs from transformer.wte.weight; jaxgpt ties them")
    if problems:
        raise UserError("weights do not match the model config " + str(cfg.to_dict()) + ": " + "; ".join(problems))
    arrays = {p: jnp.asarray(v[0] if not p.startswith("h.") else np.stack(v)) for p, v in values.items()}
    state = nnx.from_flat_state([(p, v.replace(arrays[".".join(map(str, p))])) for p, v in nnx.to_flat_state(state)])
    model = nnx.merge(graphdef, state)
    model.eval()
    return model


# --- torch state_dicts (torch imported here only; torchref models are parity's: parity/twins.py) ---

def to_torch_state_dict(model: GPT) -> dict[str, Any]:
    """jaxgpt model -> nanoGPT-named state_dict of CPU torch tensors (a tied lm_head shares wte)."""
    import torch

    tied = model.config.tie_embeddings
    sd = {k: torch.tensor(v) for k, v in to_state_dict(model).items() if not (tied and k == TIED_HEAD)}  # copies torch owns
    if tied:
        sd[TIED_HEAD] = sd["transformer.wte.weight"]
    return sd


def from_torch_state_dict(sd: Mapping[str, Any], cfg: GPTConfig) -> GPT:
    """nanoGPT/torchref state_dict (torch tensors, nn.Linear layout) -> jaxgpt GPT."""
    return from_state_dict(sd, cfg, "linear")
