"""Checkpoint files in four formats, all through the one table in formats/table.py:

- jaxgpt: a run folder with orbax checkpoints (jaxgpt/checkpoint.py), plus its tokenizer.json
  when it is not byte-level;
- nanoGPT `ckpt.pt`: {'model', 'model_args', 'iter_num', 'best_val_loss', 'config'}, read only
  with `torch.load(weights_only=True)`, so a crafted pickle cannot run code;
- `.safetensors`: nanoGPT names (lm_head omitted, it is tied), config in the header metadata;
- a Hugging Face GPT-2 folder (formats/hf.py).
torch is imported only for .pt/.bin files: everything else works without it installed.
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from formats.hf import is_hf_folder, load_hf, write_hf
from formats.table import (
    TIED_HEAD,
    check_representable,
    config_from_model_args,
    from_state_dict,
    model_args_from_config,
    to_state_dict,
    to_torch_state_dict,
)
from jaxgpt import paths
from jaxgpt.checkpoint import Checkpointer, load_model, resolve
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import TOKENIZER_FILE, ByteTokenizer, CharTokenizer, HFTokenizer, load_meta_pkl, load_tokenizer

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin")
KINDS = ("jaxgpt", "pt", "safetensors", "hf")


def kind_of(where: str | Path) -> str:
    """'pt', 'safetensors', 'hf' (a folder with a config.json) or 'jaxgpt', from the path."""
    path = paths.path(where)
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "pt"
    if suffix == ".safetensors":
        return "safetensors"
    return "hf" if is_hf_folder(path) else "jaxgpt"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise UserError("reading or writing .pt files needs PyTorch; pip install 'jaxgpt[torch]'") from None
    return torch


def _atomic(path: Path, write: Callable[[Path], None], folder: bool = False) -> None:
    """write(tmp) then rename over `path`: no half-written file or folder ever has the final name,
    and a failure leaves nothing behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.")) if folder else \
        Path(tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")[1])
    try:
        write(tmp)
        if folder and path.exists():
            path.rmdir()  # only ever an empty destination folder (convert.py checks)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True) if folder else tmp.unlink(missing_ok=True)
        raise


def load_pt(path: Path) -> tuple[GPT, dict[str, Any]]:
    torch = _torch()
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():  # a damaged file, not a refused object
            raise UserError(f"cannot read {path} as a torch checkpoint ({paths.describe(e)})") from None
        raise UserError(f"refusing {path}: it holds objects other than tensors and plain data "
                        f"({str(e).splitlines()[0][:160]}); only weights-only checkpoints are loaded") from None
    except Exception as e:  # torch.load on a truncated or damaged file raises many kinds (zip, pickle, index, ...)
        raise UserError(f"cannot read {path} as a torch checkpoint ({paths.describe(e)})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict) or not isinstance(obj.get("model_args"), dict):
        raise UserError(f"{path} is not a nanoGPT checkpoint (expected a dict with 'model' state_dict and "
                        f"'model_args')")
    model = from_state_dict(obj["model"], config_from_model_args(obj["model_args"]))
    best = obj.get("best_val_loss")
    try:
        info: dict[str, Any] = {"step": int(obj.get("iter_num", 0)), "val_loss": float(best) if best is not None else None,
                                "config": obj.get("config") if isinstance(obj.get("config"), dict) else {}}
    except (TypeError, ValueError, RuntimeError) as e:
        raise UserError(f"{path}: iter_num/best_val_loss are not numbers ({paths.describe(e)})") from None
    return model, info


def save_pt(model: GPT, path: Path, info: dict[str, Any]) -> None:
    """nanoGPT's format, loadable by its sample.py (whose decoder needs a meta.pkl for non-GPT-2 vocabularies)."""
    check_representable(model.config, "nanoGPT's ckpt.pt", "a .safetensors file or a jaxgpt run folder")
    torch = _torch()
    sd = to_torch_state_dict(model)
    obj = {"model": sd, "model_args": model_args_from_config(model.config),
           "iter_num": int(info.get("step") or 0), "best_val_loss": float(info.get("val_loss") or float("nan")),
           "config": {**model_args_from_config(model.config), "tokenizer": "bytes", "source": "jaxgpt"}}
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def load_safetensors(path: Path) -> tuple[GPT, dict[str, Any]]:
    from safetensors import SafetensorError, safe_open

    from formats.hf import read_safetensors
    try:
        with safe_open(str(path), framework="np") as f:
            header = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as safetensors ({str(e)[:160]})") from None
    sd = read_safetensors(path)
    sidecar = path.with_suffix(".json")
    if "model_args" not in header and not sidecar.is_file():
        raise UserError(f"{path} carries no model_args metadata and {sidecar} does not exist; "
                        f"put the model config JSON there (a Hugging Face folder: pass the folder instead)")
    try:  # metadata is text anyone can edit (or damage): it is checked before it is trusted
        model_args = json.loads(header["model_args"] if "model_args" in header else sidecar.read_text())
        info = {"step": int(header.get("step", 0)), "val_loss": json.loads(header.get("val_loss", "null"))}
    except (ValueError, TypeError) as e:
        raise UserError(f"{path}'s metadata (model_args, step, val_loss) cannot be read ({str(e)[:120]}); the file "
                        f"is damaged: convert the checkpoint again") from None
    return from_state_dict(sd, config_from_model_args(model_args)), info


def save_safetensors(model: GPT, path: Path, info: dict[str, Any]) -> None:
    from safetensors.numpy import save_file

    sd = to_state_dict(model)
    if model.config.tie_embeddings:
        del sd[TIED_HEAD]  # no shared tensors in safetensors: it is wte
    metadata = {"model_args": json.dumps(model_args_from_config(model.config)), "step": str(int(info.get("step") or 0)),
                "val_loss": json.dumps(info.get("val_loss")), "tokenizer": "bytes", "format": "nanogpt-names"}
    _atomic(path, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def save_jaxgpt(model: GPT, out_dir: Path, info: dict[str, Any]) -> None:
    """A run folder whose checkpoint has params and meta but no optimizer state, with the
    source's tokenizer.json when it has one. Locally the folder appears whole or not at all; on
    gs:// orbax's commit marker makes an interrupted checkpoint unusable instead."""
    from flax import nnx

    def write(tmp: Any) -> None:
        step = int(info.get("step") or 0)
        val = info.get("val_loss")
        ckpt = Checkpointer(tmp, use_async=False)
        meta = {"step": step, "val_loss": float(val) if val is not None and val == val else float("inf"),
                "model": model.config.to_dict(), "converted_from": info.get("source", "")}
        ckpt.save(step, nnx.state(model, nnx.Param), None, meta)
        ckpt.wait()
        ckpt.close()
        tokenizer = info.get("tokenizer")
        if isinstance(tokenizer, HFTokenizer):
            paths.write_bytes(paths.path(tmp) / TOKENIZER_FILE, tokenizer.raw)
        identity = tokenizer.identity() if tokenizer is not None else ByteTokenizer().identity()
        paths.write_text(paths.path(tmp) / "config.json",
                         json.dumps({"model": model.config.to_dict(), "tokenizer": identity}, indent=2))

    write(out_dir) if paths.is_remote(out_dir) else _atomic(out_dir, write, folder=True)


def save_hf(model: GPT, out_dir: Path, info: dict[str, Any]) -> None:
    tokenizer = info.get("tokenizer")
    if tokenizer is None:
        raise UserError(f"the model has {model.config.vocab_size} tokens and no tokenizer came with it; a Hugging Face "
                        f"folder needs one (put the {TOKENIZER_FILE} beside the source)")
    if not isinstance(tokenizer, (ByteTokenizer, HFTokenizer)):
        raise UserError(f"a {tokenizer.name} tokenizer cannot be exported to a Hugging Face folder; only byte-level "
                        f"and tokenizer.json models can")
    text = tokenizer.raw.decode() if isinstance(tokenizer, HFTokenizer) else None
    _atomic(out_dir, lambda tmp: write_hf(model, tmp, text), folder=True)


SAVERS = {"pt": save_pt, "safetensors": save_safetensors, "jaxgpt": save_jaxgpt, "hf": save_hf}


def save_any(kind: str, model: GPT, dst: str | Path, info: dict[str, Any]) -> None:
    """Write `model` as `kind` to a local path or gs:// (files and HF folders are written locally
    first and uploaded whole; a run folder is written in place by orbax)."""
    if not paths.is_remote(dst) or kind == "jaxgpt":
        SAVERS[kind](model, paths.path(dst) if paths.is_remote(dst) else Path(dst), info)
        return
    paths.check_gcs(dst)
    with tempfile.TemporaryDirectory(prefix="jaxgpt-convert-") as tmp:
        local = Path(tmp) / paths.path(dst).name
        SAVERS[kind](model, local, info)
        paths.publish(local, dst)


def load_any(path: str | Path, meta_path: str | None = None, which: str = "best") -> tuple[GPT, dict[str, Any]]:
    """Any of the four formats, local or gs:// -> (GPT in eval mode, info: step, val_loss,
    tokenizer). `which`: the best or latest checkpoint of a jaxgpt run folder."""
    paths.check_gcs(path)
    if not paths.path(path).exists():
        raise UserError(f"checkpoint {path} does not exist; pass a jaxgpt run folder, a .pt or .safetensors file, "
                        f"or a Hugging Face GPT-2 folder")
    kind = kind_of(path)
    if kind == "jaxgpt":  # orbax reads gs:// itself
        model, info = load_model(path, which)
        info["tokenizer"] = tokenizer_for(model, paths.path(path), kind, info, meta_path)
        return model, info
    with paths.fetched(path) as local:
        model, info = {"pt": load_pt, "safetensors": load_safetensors, "hf": load_hf}[kind](local)
        info["tokenizer"] = tokenizer_for(model, local, kind, info, meta_path)
    return model, info


def tokenizer_for(model: GPT, path: Path, kind: str, info: dict[str, Any],
                  meta_path: str | None) -> ByteTokenizer | HFTokenizer | CharTokenizer | None:
    """The tokenizer.json a folder carries (run or Hugging Face); otherwise bytes for vocab 256,
    or nanoGPT's meta.pkl: --meta, beside the checkpoint, or data/<dataset>/meta.pkl as nanoGPT's
    sample.py looks for it; None when there is none. Refuses a tokenizer whose vocabulary does not
    fit the model."""
    tok: ByteTokenizer | HFTokenizer | CharTokenizer | None = None
    if meta_path is None and kind in ("hf", "jaxgpt"):
        folder = path if kind == "hf" else resolve(path)[0]
        tok = load_tokenizer(folder)
        if isinstance(tok, ByteTokenizer) and model.config.vocab_size != 256:
            tok = None
    elif meta_path is None and model.config.vocab_size == 256:
        tok = ByteTokenizer()
    if tok is None:
        candidates = [Path(meta_path)] if meta_path else [Path(path).parent / "meta.pkl"]
        dataset = str(info.get("config", {}).get("dataset", ""))
        if not meta_path and dataset and "/" not in dataset and dataset not in (".", ".."):
            candidates.append(Path("data") / dataset / "meta.pkl")
        found = [c for c in candidates if c.is_file()]
        if not found:
            if meta_path:
                raise UserError(f"--meta {meta_path} does not exist")
            return None  # weights without a tokenizer: convertible, not sampleable (see need_tokenizer)
        tok = load_meta_pkl(found[0])
    if tok.vocab_size > model.config.vocab_size:
        raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}; "
                        f"they do not belong together")
    return tok


def need_tokenizer(model: GPT, info: dict[str, Any], path: str | Path) -> ByteTokenizer | HFTokenizer | CharTokenizer:
    """The tokenizer from load_any, or one clear error for weights that came without one."""
    if info.get("tokenizer") is None:
        raise UserError(f"{path}: the model's vocabulary has {model.config.vocab_size} tokens (not bytes) and neither "
                        f"a {TOKENIZER_FILE} nor a nanoGPT meta.pkl comes with it; pass --meta PATH/meta.pkl, or add "
                        f"the model's {TOKENIZER_FILE}")
    return info["tokenizer"]
