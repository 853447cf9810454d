"""One metrics stream, many sinks: the train loop emits one record per logged step (step,
train_loss, lr, tokens_per_sec, grad_norm, param_norm; val_loss and eval_train_loss on evaluations)
and every sink consumes the same records — metrics.jsonl in the run folder, TensorBoard event files
(`--tensorboard`, tensorboardX: no TensorFlow), Weights & Biases (`--wandb_log`). Only process 0 of a
multi-host run writes. Adding a sink never touches the loop.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import jax
import optax

from jaxgpt import paths, rundir
from jaxgpt.errors import UserError

TB_DIR = "tb"
WANDB_ID_FILE = "wandb_run.json"  # the W&B run id, so that a resumed run continues the same W&B run


class MetricsLog:
    """Logged steps wait on the device and are fetched together — every SYNC_EVERY logged
    steps, before an evaluation, at the end — because fetching a loss each step would block
    JAX's asynchronous dispatch. tokens/s is measured over each fetched window."""

    SYNC_EVERY = 25

    def __init__(self, tokens_per_step: int, schedule: optax.Schedule):
        # one compiled program: evaluated op by op, the schedule loaded ~10 tiny programs (~0.1 s of a short run)
        self.tokens_per_step, self.schedule = tokens_per_step, jax.jit(schedule)
        self.pending: list[tuple[int, dict[str, jax.Array]]] = []  # (steps done, the step's metrics still on device)
        self.steps_since, self.t_last = 0, time.perf_counter()

    def step(self) -> None:
        self.steps_since += 1

    def add(self, done: int, metrics: dict[str, jax.Array]) -> None:
        self.pending.append((done, metrics))

    def due(self) -> bool:
        return len(self.pending) >= self.SYNC_EVERY

    def fetch(self) -> list[dict]:
        """The pending records with their metrics on the host (one sync for all of them)."""
        if not self.pending:
            return []
        fetched = jax.device_get([metrics for _, metrics in self.pending])
        now = time.perf_counter()
        rate = self.tokens_per_step * self.steps_since / max(now - self.t_last, 1e-9)
        records = [{"step": done, "train_loss": float(m["loss"]), "lr": float(self.schedule(done - 1)), "tokens_per_sec": rate,
                    "grad_norm": float(m["grad_norm"]), "param_norm": float(m["param_norm"])}
                   for (done, _), m in zip(self.pending, fetched, strict=True)]
        self.pending, self.steps_since, self.t_last = [], 0, now
        return records


class Sink(Protocol):
    def write(self, records: list[dict[str, Any]]) -> None: ...
    def close(self) -> None: ...


class MetricsFile:
    """metrics.jsonl: the run folder's own record of every logged step (the plot and resume read it)."""

    def __init__(self, path: Any):
        self.path = path

    def write(self, records: list[dict[str, Any]]) -> None:
        rundir.append_metrics(self.path, records)

    def close(self) -> None:
        pass


def derived(record: dict[str, Any], tokens_per_step: int, flops_per_token: float, peak: float | None) -> dict[str, float]:
    """Step time and MFU, computed from tokens/s (so metrics.jsonl stays free of machine-dependent
    columns beyond tokens_per_sec, and resumed runs compare bit for bit)."""
    rate = record.get("tokens_per_sec") or 0.0
    out = {"step_time_ms": 1000.0 * tokens_per_step / rate} if rate else {}
    if rate and peak:
        out["mfu"] = rate * flops_per_token / peak
    return out


SCALARS = {"train_loss": "train/loss", "eval_train_loss": "train/loss_eval", "val_loss": "val/loss",
           "val_loss_full": "val/loss_whole_split", "val_bpb": "val/bits_per_byte", "lr": "train/learning_rate",
           "tokens_per_sec": "perf/tokens_per_sec", "step_time_ms": "perf/step_time_ms", "mfu": "perf/mfu",
           "grad_norm": "train/grad_norm", "param_norm": "train/param_norm", "hellaswag_acc": "eval/hellaswag_acc",
           "hellaswag_acc_norm": "eval/hellaswag_acc_norm"}


def _flat_config(config: dict[str, Any]) -> dict[str, bool | str | float | int]:
    out: dict[str, bool | str | float | int] = {}
    for section in ("model", "train"):
        for k, v in config.get(section, {}).items():
            out[f"{section}.{k}"] = v if isinstance(v, (bool, str, float, int)) else json.dumps(v)
    return out


class TensorBoard:
    """Event files in <out_dir>/tb. A resumed run writes a new event file that starts with a purge
    at its first step, so TensorBoard drops what the killed run logged past its checkpoint and the
    curves continue without duplicated steps (a purge from the step after the checkpoint). On gs://, events are written to a local folder and
    the event file is uploaded whole at every flush (objects cannot be appended to)."""

    def __init__(self, out_dir: Any, config: dict[str, Any], start_step: int, derive: Any):
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            raise UserError("--tensorboard needs tensorboardX; pip install 'jaxgpt[track]'") from None
        self.remote = paths.path(out_dir) / TB_DIR if paths.is_remote(out_dir) else None
        self.local = Path(tempfile.mkdtemp(prefix="jaxgpt-tb-")) if self.remote else Path(paths.path(out_dir)) / TB_DIR
        self.writer = SummaryWriter(logdir=str(self.local), purge_step=start_step + 1 if start_step > 0 else None,
                                    flush_secs=30)
        self.derive = derive
        if start_step == 0:
            self.writer.add_hparams(_flat_config(config), {}, name="hparams")  # its own event file, tb/hparams
            self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```", 0)

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            for key, value in {**r, **self.derive(r)}.items():
                if key in SCALARS and value is not None:
                    self.writer.add_scalar(SCALARS[key], value, r["step"])
            if "sample" in r:
                self.writer.add_text("sample", r["sample"], r["step"])
        if any("val_loss" in r for r in records):
            self.flush()

    def flush(self) -> None:
        self.writer.flush()
        if self.remote is not None:
            for f in self.local.rglob("events.out.tfevents.*"):
                paths.write_bytes(self.remote / str(f.relative_to(self.local)), f.read_bytes())

    def close(self) -> None:
        self.writer.close()
        self.flush()
        if self.remote is not None:
            shutil.rmtree(self.local, ignore_errors=True)


class WandB:
    """nanoGPT's --wandb_log: one W&B run per run folder, its id kept in the folder so that --resume
    continues it. W&B accepts only increasing steps, so a resumed run logs from the last step W&B
    has; the steps redone after a kill keep their first values there (metrics.jsonl has the new ones)."""

    def __init__(self, out_dir: Any, config: dict[str, Any], resume: bool, project: str, name: str, derive: Any):
        try:
            import wandb
        except ImportError:
            raise UserError("--wandb_log needs the wandb package; pip install wandb (or 'jaxgpt[track]')") from None
        self.wandb = wandb
        id_path = paths.path(out_dir) / WANDB_ID_FILE
        saved = json.loads(id_path.read_text()) if resume and id_path.exists() else {}
        local = Path(tempfile.gettempdir()) / "jaxgpt-wandb" if paths.is_remote(out_dir) else Path(paths.path(out_dir))
        local.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=project, name=name or None, id=saved.get("id"), resume="allow", dir=str(local),
                              config=config)
        self.last = int(self.run.step or 0) if saved else 0
        self.derive = derive
        if not saved:
            rundir.write_json(id_path, {"id": self.run.id, "project": project, "name": self.run.name,
                                        "created": time.strftime("%Y-%m-%d %H:%M:%S")})

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            if r["step"] < self.last:
                continue
            values = {SCALARS[k]: v for k, v in {**r, **self.derive(r)}.items() if k in SCALARS and v is not None}
            self.wandb.log(values, step=r["step"])
            self.last = r["step"]

    def close(self) -> None:
        self.run.finish()


class Callback:
    """train(on_log=...): a function called with each record."""

    def __init__(self, fn: Callable[[dict[str, Any]], None]):
        self.fn = fn

    def write(self, records: list[dict[str, Any]]) -> None:
        for r in records:
            self.fn(r)

    def close(self) -> None:
        pass


def sinks(out_dir: Any, tc: Any, model_cfg: Any, config: dict[str, Any], start: int,
          on_log: Callable[[dict[str, Any]], None] | None, writer: bool = True) -> list[Sink]:
    """The sinks one run writes to: on the writer (process 0) metrics.jsonl always, then what the flags ask
    for; the caller's on_log on every process (each host may want its own view of the run)."""
    out: list[Sink] = [MetricsFile(paths.path(out_dir) / "metrics.jsonl")] if writer else []
    if writer and (tc.tensorboard or tc.wandb_log):
        from functools import partial

        from jaxgpt.plan.perf import device_peak_flops, flops_per_token
        peak, _ = device_peak_flops()
        derive = partial(derived, tokens_per_step=tc.batch_size * tc.gradient_accumulation_steps * model_cfg.block_size,
                         flops_per_token=flops_per_token(model_cfg), peak=peak)
        if tc.tensorboard:
            out.append(TensorBoard(out_dir, config, start, derive))
        if tc.wandb_log:
            out.append(WandB(out_dir, config, tc.resume and start > 0, tc.wandb_project, tc.wandb_run_name, derive))
    if on_log is not None:
        out.append(Callback(on_log))
    return out
