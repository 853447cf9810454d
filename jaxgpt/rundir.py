"""The run folder (out_dir, local or gs://): its preflight checks, config.json, metrics.jsonl and
loss plot, all through jaxgpt.paths.

Every file here is written so that a crash leaves either the old or the new version, never
half of one, and metrics.jsonl is cut back to the checkpoint a resumed run starts from.
"""
from __future__ import annotations

import io
import json
import os
import secrets
import shutil
from dataclasses import replace
from typing import Any

from jaxgpt import paths
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import UserError


def preflight(out_dir: Any, checkpoint_bytes: int) -> None:
    """Fail before any training if out_dir cannot be written or (locally) cannot hold two checkpoints."""
    out_dir = paths.path(out_dir)
    paths.check_gcs(out_dir)
    try:
        paths.ensure_dir(out_dir)
        # a name of its own on every host: on a pod, each host's trainer may have the same pid (containers),
        # and one host's unlink must not remove another's probe from the shared bucket
        probe = out_dir / f".write-test-{os.getpid()}-{secrets.token_hex(6)}"
        paths.write_bytes(probe, b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise paths.unwritable_out_dir(out_dir, e) from None
    if paths.is_remote(out_dir):
        return  # a bucket has no free-space figure to check
    need = 2 * checkpoint_bytes + (16 << 20)  # one being written while the last is kept, plus logs
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise UserError(f"only {free / 2**20:.0f} MiB free under {out_dir}, a run needs about {need / 2**20:.0f} MiB "
                        f"for its checkpoints; free some space or choose another --out_dir")


def write_json(path: Any, obj: Any) -> None:
    paths.write_text(path, json.dumps(obj, indent=2))


def read_config(out_dir: Any) -> dict:
    """A run's config.json ({} when there is none yet)."""
    path = paths.path(out_dir) / "config.json"
    return json.loads(path.read_text()) if path.exists() else {}


def append_metrics(path: Any, records: list[dict]) -> None:
    paths.append_text(path, "".join(json.dumps(r) + "\n" for r in records))


def read_metrics(path: Any) -> list[dict]:
    path = paths.path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
    return rows


FINAL_KEYS = ("val_loss_full", "val_bpb")  # the whole-split evaluation at a run's last step (train.py)


def truncate_metrics(path: Any, last_step: int) -> None:
    """On resume, drop records past the checkpoint: those steps are about to be redone; and the
    end-of-run evaluation, since the run now ends later."""
    keep = [{k: v for k, v in r.items() if k not in FINAL_KEYS} for r in read_metrics(path) if r["step"] <= last_step]
    paths.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def import_plotting_in_background() -> None:
    """Import matplotlib (~0.3 s) on a thread while the steps run, so the first plot finds it loaded."""
    import importlib
    import threading

    threading.Thread(target=importlib.import_module, args=("matplotlib.figure",), daemon=True).start()


def plot_metrics(metrics_path: Any, png_path: Any) -> None:
    """Loss curves (train per logged step, val per evaluation) as a PNG. A bare Figure drawn by Agg,
    without pyplot: no global figure state or backend switch, and 0.3 s less to import (BENCHMARKS.md)."""
    from matplotlib.figure import Figure

    rows = read_metrics(metrics_path)
    fig = Figure(figsize=(7, 4), dpi=100)
    ax = fig.subplots()
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.7, label="train (per step)")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title=paths.path(png_path).parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")  # a Figure without a canvas draws with Agg
    paths.write_bytes(png_path, buffer.getvalue())


def has_checkpoint(out_dir: Any) -> bool:
    """Whether out_dir holds a committed checkpoint (orbax lists only complete steps)."""
    from jaxgpt.checkpoint import Checkpointer

    if not (paths.path(out_dir) / "checkpoints").exists():
        return False
    ckpt = Checkpointer(out_dir, read_only=True, use_async=False)
    try:
        return ckpt.latest_step() is not None
    finally:
        ckpt.close()


# settings a restart may change without being another run
RESTART_FREE = ("resume", "max_iters", "progress", "plot", "keep_checkpoints", "log_interval", "eval_interval", "stop_loss", "eval_below",
                "eval_full")


def resolve_resume(out_dir: Any, resume: bool | str, model_cfg: GPTConfig | None = None,
                   tc: TrainConfig | None = None) -> bool:
    """--resume=auto -> True when out_dir holds a committed checkpoint, else False (a new run), after
    checking that a config.json already there (a run stopped before its first checkpoint) is this
    run's; plain true/false pass through."""
    if resume != "auto":
        return bool(resume)
    if has_checkpoint(out_dir):
        return True
    saved = read_config(out_dir)
    if saved and model_cfg is not None and tc is not None:
        diffs = [f"model.{k}" for k, v in model_cfg.to_dict().items() if saved.get("model", {}).get(k, v) != v]
        diffs += [f"train.{k}" for k, v in tc.to_dict().items()
                  if k not in RESTART_FREE and saved.get("train", {}).get(k, v) != v]
        if diffs:
            raise UserError(f"--resume=auto: {out_dir} holds another run's config.json (it differs in {', '.join(diffs)}) "
                            f"and no checkpoint; choose another --out_dir, or delete that folder to start over")
    return False


def resolve_configs(model_flags: dict[str, Any], train_flags: dict[str, Any], preset: dict[str, Any],
                    init_cfg: GPTConfig | None = None, data_vocab: int | None = None) -> tuple[GPTConfig, TrainConfig]:
    """Configs from explicit flags over a preset. The architecture comes from the saved run with
    --resume, from the checkpoint with --init_from (`init_cfg`; dropout may change, block_size
    only shrink), refusing flags that contradict either; a fresh model takes the prepared
    data's vocabulary (`data_vocab`) unless --vocab_size is given."""
    pick = lambda cls: {k: v for k, v in preset.items() if k in cls.__dataclass_fields__}  # noqa: E731
    tc = TrainConfig(**{**pick(TrainConfig), **train_flags})
    auto = tc.resume == "auto"
    if auto:  # decided now: a resumed run takes its saved configs below
        tc = replace(tc, resume=has_checkpoint(tc.out_dir))
    saved_path = paths.path(tc.out_dir) / "config.json"
    if init_cfg is not None and not (tc.resume and saved_path.exists()):
        free = {"dropout": None, "block_size": init_cfg.block_size}  # may differ (block_size: not above)
        diffs = [f"--{k}={v} (checkpoint has {getattr(init_cfg, k)})" for k, v in model_flags.items()
                 if getattr(init_cfg, k) != v and not (k in free and (free[k] is None or v <= free[k]))]
        if diffs:
            raise UserError(f"--init_from {tc.init_from} fixes the architecture: {', '.join(diffs)}; drop those flags")
        dropout = model_flags.get("dropout", pick(GPTConfig).get("dropout", GPTConfig.dropout))
        return replace(init_cfg, dropout=dropout, block_size=model_flags.get("block_size", init_cfg.block_size)), tc
    if not tc.resume or not saved_path.exists():
        # the data's vocabulary, unless a flag gives one or the preset's pads it (GPT-2's 50257 -> 50304)
        padded = pick(GPTConfig).get("vocab_size", 0) >= (data_vocab or 0)
        vocab = {"vocab_size": data_vocab} if data_vocab and "vocab_size" not in model_flags and not padded else {}
        model_cfg = GPTConfig(**{**pick(GPTConfig), **vocab, **model_flags})
        if auto:  # a new run: but not over another run's config.json
            resolve_resume(tc.out_dir, "auto", model_cfg, tc)
        return model_cfg, tc
    saved = json.loads(saved_path.read_text())
    diffs = [f"--{k}={v} (checkpoint has {saved['model'][k]})" for k, v in model_flags.items() if saved["model"][k] != v]
    if diffs:
        raise UserError(f"cannot resume {tc.out_dir} with a different model: {', '.join(diffs)}; "
                        f"drop those flags or use a new --out_dir")
    return GPTConfig(**saved["model"]), TrainConfig(**{**saved["train"], **train_flags})
