"""Hugging Face GPT-2 folders (`save_pretrained`: config.json, model.safetensors — or a sharded
model.safetensors.index.json, or pytorch_model.bin — and tokenizer.json), in and out.

The weights go through the one table in formats/table.py with layout="conv1d" (GPT-2's Conv1D
stores (in, out), as Flax does). Safetensors are read with the numpy API: importing a
safetensors folder needs no torch; only pytorch_model.bin does. The written folder loads with
GPT2LMHeadModel.from_pretrained and AutoTokenizer.from_pretrained, no custom code.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from formats.table import TIED_HEAD, check_representable, from_state_dict, to_state_dict
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import TOKENIZER_FILE

ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}  # HF name -> ours
EXPORTED_ACTIVATION = {"gelu": "gelu", "gelu_tanh": "gelu_new"}
SAFETENSORS, INDEX, BIN = "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"


def is_hf_folder(path: Any) -> bool:
    return path.is_dir() and (path / "config.json").exists() and not (path / "checkpoints").exists()


def config_from_hf(hf: dict[str, Any], where: Path) -> GPTConfig:
    """GPT2Config fields -> GPTConfig; refuses, naming the field, what the model cannot compute."""
    if hf.get("model_type") != "gpt2":
        raise UserError(f"{where}: model_type is {hf.get('model_type')!r}; only Hugging Face GPT-2 ('gpt2') folders "
                        f"can be imported")
    n_embd = hf.get("n_embd", 768)
    refused = {"scale_attn_by_inverse_layer_idx": (hf.get("scale_attn_by_inverse_layer_idx", False), False),
               "reorder_and_upcast_attn": (hf.get("reorder_and_upcast_attn", False), False),
               "scale_attn_weights": (hf.get("scale_attn_weights", True), True),
               "add_cross_attention": (hf.get("add_cross_attention", False), False),
               "tie_word_embeddings": (hf.get("tie_word_embeddings", True), True)}
    for name, (value, supported) in refused.items():
        if value != supported:
            raise UserError(f"{where}: {name}={value} is not supported by jaxgpt's GPT (it needs {supported})")
    if hf.get("n_inner") not in (None, 4 * n_embd):
        raise UserError(f"{where}: n_inner={hf['n_inner']} is not supported (jaxgpt's MLP is 4 x n_embd = {4 * n_embd})")
    activation = hf.get("activation_function", "gelu_new")
    if activation not in ACTIVATIONS:
        raise UserError(f"{where}: activation_function={activation!r} is not supported; use one of {sorted(ACTIVATIONS)}")
    return GPTConfig(block_size=hf.get("n_positions", 1024), vocab_size=hf.get("vocab_size", 50257),
                     n_layer=hf.get("n_layer", 12), n_head=hf.get("n_head", 12), n_embd=n_embd,
                     dropout=0.0, bias=True, activation=ACTIVATIONS[activation],  # type: ignore[arg-type]
                     layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)))


def config_to_hf(cfg: GPTConfig) -> dict[str, Any]:
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
            "n_positions": cfg.block_size, "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head,
            "n_inner": None, "activation_function": EXPORTED_ACTIVATION[cfg.activation],
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "resid_pdrop": cfg.dropout, "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropout, "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
            "tie_word_embeddings": True, "bos_token_id": None, "eos_token_id": None, "dtype": "float32"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, TypeError) as e:  # bf16 files have no numpy dtype: TypeError
        if "bfloat16" in str(e) or "BF16" in str(e):
            return _read_with_torch(path)
        raise UserError(f"cannot read {path} as safetensors ({str(e)[:160]})") from None


def _read_with_torch(path: Path) -> dict[str, Any]:
    try:
        import torch
    except ImportError:
        raise UserError(f"{path} holds bfloat16 tensors or a pickle, which need torch; pip install 'jaxgpt[torch]'") from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncation
        raise UserError(f"cannot read {path} as a weights-only torch file ({str(e).splitlines()[0][:160]})") from None


def read_weights(folder: Path) -> dict[str, Any]:
    """All tensors of a folder: model.safetensors, its sharded index, or pytorch_model.bin."""
    if (folder / SAFETENSORS).is_file():
        sd = read_safetensors(folder / SAFETENSORS)
    elif (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{folder / INDEX} is not a safetensors index ({e})") from None
        sd = {}
        for shard in shards:
            if "/" in shard or not (folder / shard).is_file():
                raise UserError(f"{folder / INDEX} names shard {shard!r}, which is not a file in {folder}")
            sd.update(read_safetensors(folder / shard))
    elif (folder / BIN).is_file():
        sd = _read_with_torch(folder / BIN)
        if not isinstance(sd, dict):
            raise UserError(f"{folder / BIN} does not hold a state_dict")
    else:
        raise UserError(f"{folder} has a config.json but no weights ({SAFETENSORS}, {INDEX} or {BIN})")
    # transformers' older files name the body without the `transformer.` prefix
    return {k if k.startswith("transformer.") or k == TIED_HEAD else "transformer." + k: v for k, v in sd.items()}


def load_hf(folder: str | Path) -> tuple[GPT, dict[str, Any]]:
    folder = Path(folder)
    try:
        hf = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {folder / 'config.json'} ({e})") from None
    if not isinstance(hf, dict):
        raise UserError(f"{folder / 'config.json'} is not a model config")
    cfg = config_from_hf(hf, folder)
    model = from_state_dict(read_weights(folder), cfg, layout="conv1d")
    return model, {"step": 0, "val_loss": None, "source": str(folder)}


def byte_tokenizer_json() -> str:
    """A tokenizer.json whose ids are the byte values: GPT-2's byte-to-unicode alphabet in byte
    order, no merges, byte-level pre-tokenizer and decoder — what a byte-level run exports."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    char = {b: chr(b if b in printable else next(extra)) for b in range(256)}  # GPT-2's bytes_to_unicode
    tok = Tokenizer(models.BPE(vocab={char[b]: b for b in range(256)}, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok.to_str()


def write_hf(model: GPT, folder: Path, tokenizer_json: str | None) -> None:
    """Write the folder's files (the caller makes the whole write atomic). `tokenizer_json`:
    the run's tokenizer.json, or None for a byte-level run."""
    from safetensors.numpy import save_file

    try:
        tokenizer_json = tokenizer_json or byte_tokenizer_json()
    except ImportError:
        raise UserError("exporting to a Hugging Face folder needs the `tokenizers` package; pip install 'jaxgpt[hf]'") from None
    cfg = model.config
    check_representable(cfg, "a Hugging Face GPT-2 folder", "a .safetensors file or a jaxgpt run folder")
    sd = {k: v for k, v in to_state_dict(model, layout="conv1d", zero_biases=True).items() if k != TIED_HEAD}
    save_file(sd, str(folder / SAFETENSORS), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config_to_hf(cfg), indent=2))
    (folder / TOKENIZER_FILE).write_text(tokenizer_json)
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": cfg.block_size,
         "clean_up_tokenization_spaces": False}, indent=2))
