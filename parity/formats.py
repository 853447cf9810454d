"""Checkpoint files in three formats, all through the one table in parity/convert.py:

- jaxgpt: a run folder with orbax checkpoints (jaxgpt/checkpoint.py);
- nanoGPT `ckpt.pt`: {'model', 'model_args', 'iter_num', 'best_val_loss', 'config'}, read only
  with `torch.load(weights_only=True)`, so a crafted pickle cannot run code;
- `.safetensors`: nanoGPT names (lm_head omitted, it is tied), config in the header metadata.
"""
from __future__ import annotations

import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from jaxgpt.checkpoint import Checkpointer, load_model
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import ByteTokenizer, CharTokenizer, load_meta_pkl
from parity.convert import TIED_HEAD, config_from_model_args, from_torch_state_dict, model_args_from_config, to_torch_state_dict

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt")


def kind_of(path: str | Path) -> str:
    """'pt', 'safetensors' or 'jaxgpt', from the path alone."""
    suffix = Path(path).suffix.lower()
    return "pt" if suffix in TORCH_SUFFIXES else "safetensors" if suffix == ".safetensors" else "jaxgpt"


def _atomic(path: Path, write) -> None:
    """write(tmp_path) then rename over `path`: no half-written file ever has the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_pt(path: Path) -> tuple[GPT, dict[str, Any]]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"refusing {path}: it holds objects other than tensors and plain data "
                        f"({str(e).splitlines()[0][:160]}); only weights-only checkpoints are loaded") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"cannot read {path} as a torch checkpoint ({type(e).__name__}: {str(e)[:160]})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or not isinstance(obj.get("model_args"), dict):
        raise UserError(f"{path} is not a nanoGPT checkpoint (expected a dict with 'model' state_dict and "
                        f"'model_args')")
    cfg = config_from_model_args(obj["model_args"])
    model = from_torch_state_dict(obj["model"], cfg)
    best = obj.get("best_val_loss")
    info = {"step": int(obj.get("iter_num", 0)), "val_loss": float(best) if best is not None else None,
            "config": obj.get("config") if isinstance(obj.get("config"), dict) else {}}
    return model, info


def save_pt(model: GPT, path: Path, info: dict[str, Any]) -> None:
    """nanoGPT's format, loadable by its sample.py (whose decoder needs a meta.pkl for non-GPT-2 vocabularies)."""
    obj = {"model": to_torch_state_dict(model), "model_args": model_args_from_config(model.config),
           "iter_num": int(info.get("step") or 0), "best_val_loss": float(info.get("val_loss") or float("nan")),
           "config": {**model_args_from_config(model.config), "tokenizer": "bytes", "source": "jaxgpt"}}
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_safetensors(path: Path) -> tuple[GPT, dict[str, Any]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as safetensors ({str(e)[:160]})") from None
    if "model_args" in header:
        model_args = json.loads(header["model_args"])
    elif (sidecar := path.with_suffix(".json")).is_file():
        model_args = json.loads(sidecar.read_text())
    else:
        raise UserError(f"{path} carries no model_args metadata and {path.with_suffix('.json')} does not exist; "
                        f"put the model config JSON there")
    model = from_torch_state_dict(sd, config_from_model_args(model_args))
    return model, {"step": int(header.get("step", 0)), "val_loss": json.loads(header.get("val_loss", "null"))}


def save_safetensors(model: GPT, path: Path, info: dict[str, Any]) -> None:
    sd = {k: v.contiguous() for k, v in to_torch_state_dict(model).items() if k != TIED_HEAD}  # no shared tensors
    metadata = {"model_args": json.dumps(model_args_from_config(model.config)), "step": str(int(info.get("step") or 0)),
                "val_loss": json.dumps(info.get("val_loss")), "tokenizer": "bytes", "format": "nanogpt-names"}
    _atomic(path, lambda tmp: save_file(sd, tmp, metadata=metadata))


def save_jaxgpt(model: GPT, out_dir: Path, info: dict[str, Any]) -> None:
    """A run folder whose checkpoint has params and meta but no optimizer state."""
    from flax import nnx

    step = int(info.get("step") or 0)
    val = info.get("val_loss")
    ckpt = Checkpointer(out_dir, use_async=False)
    meta = {"step": step, "val_loss": float(val) if val is not None and val == val else float("inf"),
            "model": model.config.to_dict(), "converted_from": info.get("source", "")}
    ckpt.save(step, nnx.state(model, nnx.Param), None, meta)
    ckpt.wait()
    ckpt.close()
    (Path(out_dir) / "config.json").write_text(json.dumps({"model": model.config.to_dict()}, indent=2))


def load_any(path: str | Path) -> tuple[GPT, dict[str, Any]]:
    """Any of the three formats -> (GPT in eval mode, info with step / val_loss)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint {path} does not exist; pass a jaxgpt run folder, a .pt or a .safetensors file")
    kind = kind_of(path)
    if kind == "pt":
        return load_pt(path)
    if kind == "safetensors":
        return load_safetensors(path)
    return load_model(path)


def tokenizer_for(model: GPT, path: Path, info: dict[str, Any], meta_path: str | None) -> ByteTokenizer | CharTokenizer:
    """Bytes for vocab 256; otherwise nanoGPT's meta.pkl: --meta, beside the checkpoint, or
    data/<dataset>/meta.pkl as nanoGPT's sample.py looks for it."""
    if meta_path is None and model.config.vocab_size == 256:
        return ByteTokenizer()
    candidates = [Path(meta_path)] if meta_path else [Path(path).parent / "meta.pkl"]
    dataset = str(info.get("config", {}).get("dataset", ""))
    if not meta_path and dataset and "/" not in dataset and dataset not in (".", ".."):
        candidates.append(Path("data") / dataset / "meta.pkl")
    for candidate in candidates:
        if candidate.is_file():
            tok = load_meta_pkl(candidate)
            if tok.vocab_size > model.config.vocab_size:
                raise UserError(f"{candidate} has {tok.vocab_size} characters but the model only {model.config.vocab_size}")
            return tok
    raise UserError(f"the model's vocabulary has {model.config.vocab_size} tokens (not bytes) and no meta.pkl was found "
                    f"({', '.join(map(str, candidates))}); pass --meta PATH/meta.pkl")
