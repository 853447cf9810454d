"""Checkpoints through orbax's CheckpointManager, which owns atomic commits (a step folder
appears only once complete), retention and async writes.

A checkpoint step holds up to three items: `params` (float32 weights), `opt_state` (absent
in checkpoints converted from other formats) and `meta` (JSON: step, losses, configs, data
sampler state). Kept: the last `keep` steps and the best by val loss.
"""
from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx
from orbax.checkpoint import checkpoint_managers as cm

from jaxgpt import paths, platform
from jaxgpt.config import GPTConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep: int = 3, *, read_only: bool = False, use_async: bool = True):
        out = paths.path(out_dir)
        self.directory = (out if paths.is_remote(out) else paths.path(os.path.abspath(out))) / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in {Path(out_dir)}; train first or pass the right --out_dir/--checkpoint")
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            # BestN sorts by the metric and keeps the *last* n: reverse=True puts the lowest loss last
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=use_async,
                                               read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("params", "opt_state", "meta"))

    def save(self, step: int, params: Any, opt_state: Any | None, meta: dict[str, Any]) -> None:
        """Start writing checkpoint `step` (asynchronously); meta['val_loss'] ranks it. A write that
        fails (after the storage clients' own retries) is one UserError saying which checkpoint is intact."""
        items = {"params": ocp.args.StandardSave(params), "meta": ocp.args.JsonSave(meta)}
        if opt_state is not None:
            items["opt_state"] = ocp.args.StandardSave(opt_state)
        try:
            self.manager.save(step, args=ocp.args.Composite(**items), metrics={"val_loss": float(meta["val_loss"])})
        except Exception as e:  # this save, or the previous asynchronous one, could not be written
            raise self._failed(step, e) from None

    def intact(self) -> str:
        """Which checkpoint a failed write left usable, for error messages."""
        try:
            self.manager.reload()
            last = self.manager.latest_step()
        except Exception:  # the storage may still be down: say what is known
            return "committed checkpoints are kept; --resume=auto continues from the last once the storage answers"
        if last is None:
            return "no checkpoint was committed yet; --resume=auto starts the run again"
        return f"the last committed checkpoint (step {last}) is intact; --resume=auto continues from it"

    def _failed(self, step: int | None, e: Exception) -> UserError:
        return UserError(f"a checkpoint{f' (step {step})' if step is not None else ''} could not be written to "
                         f"{self.directory} ({paths.describe(e)}); {self.intact()}")

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def meta(self, step: int) -> dict[str, Any]:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def best_step(self) -> int | None:
        """The kept checkpoint with the lowest val loss."""
        steps = self.steps()
        return min(steps, key=lambda s: self.meta(s)["val_loss"]) if steps else None

    def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any | None = None) -> dict[str, Any]:
        """Restore into abstract targets (ShapeDtypeStructs carrying the target shardings), so a
        checkpoint written on one device layout loads onto another."""
        items = {"params": ocp.args.StandardRestore(abstract_params), "meta": ocp.args.JsonRestore()}
        if abstract_opt_state is not None:
            if not (self.directory / str(step) / "opt_state").exists():
                raise UserError(f"checkpoint {self.directory / str(step)} has no optimizer state (converted from "
                                f"another format?); start a new run from it instead of --resume")
            items["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        return dict(self.manager.restore(step, args=ocp.args.Composite(**items)))

    def quarantine(self, step: int) -> Any:
        """Move an unreadable step folder aside (kept for inspection, never deleted)."""
        bad = self.directory / f"unreadable-{step}-{time.strftime('%Y%m%d-%H%M%S')}"
        (self.directory / str(step)).rename(bad)
        self.manager.reload()
        return bad

    def wait(self) -> None:
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._failed(None, e) from None

    def close(self) -> None:
        self.manager.close()

    def abandon(self) -> None:
        """On the way out after an error: let an in-flight asynchronous save end (its own failure is
        already reported or moot) so no background write dies mid-way with the process."""
        import absl.logging

        level = absl.logging.get_verbosity()
        absl.logging.set_verbosity(absl.logging.FATAL)  # orbax logs the failed write's traceback; it is reported
        try:
            for step in (self.manager.wait_until_finished, self.manager.close):
                try:
                    step()
                except Exception:
                    pass
        finally:
            absl.logging.set_verbosity(level)


def resolve(where: str | Path) -> tuple[Any, int | None]:
    """(out_dir, step) for a run folder (its best or latest step) or a checkpoints/<step> folder."""
    path = paths.path(where)
    if path.name.isdigit() and path.parent.name == "checkpoints":
        return path.parent.parent, int(path.name)
    if not (path / "checkpoints").is_dir():
        raise UserError(f"{path} is not a jaxgpt run folder (no checkpoints/ inside); pass --out_dir of a "
                        f"training run, a .pt or a .safetensors file")
    return path, None


def load_model(path: str | Path, which: str = "best") -> tuple[GPT, dict[str, Any]]:
    """A jaxgpt checkpoint -> (GPT in eval mode, its meta). `which`: 'best' or 'latest'."""
    out_dir, step = resolve(path)
    ckpt = Checkpointer(out_dir, read_only=True, use_async=False)
    try:
        if step is None:
            step = ckpt.best_step() if which == "best" else ckpt.latest_step()
        if step is None or step not in ckpt.steps():
            raise UserError(f"no complete checkpoint found in {out_dir}/checkpoints; train first")
        cfg = GPTConfig.from_dict(ckpt.meta(step)["model"])
        platform.check_model_fits(cfg, f"checkpoint {out_dir}")
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
        # onto this process's first device, whatever mesh wrote the checkpoint
        here = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        restored = ckpt.restore(step, jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=here), abstract))
    except UserError:
        raise
    except Exception as e:  # orbax/tensorstore errors on truncated or foreign files
        raise UserError(f"checkpoint in {out_dir} could not be read ({type(e).__name__}: {str(e)[:200]}); "
                        f"it may be incomplete or corrupt — pick another step") from None
    finally:
        ckpt.close()
    model = nnx.merge(graphdef, restored["params"])
    model.eval()
    return model, {**restored["meta"], "step": step}


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs (with shardings) of a pytree of arrays: a restore target."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def restore_latest(ckpt: Checkpointer, state: Any) -> tuple[Any, int]:
    """The newest checkpoint that restores; an unreadable one (cut short by a crash, damaged
    on disk) is reported, moved aside and the next older one tried — never loaded silently."""
    for step in reversed(ckpt.steps()):
        try:  # storage that does not answer is retried, then reported: it is not a damaged checkpoint
            restored = paths.retrying(f"restoring checkpoint {step} from {ckpt.directory}", ckpt.restore, step,
                                      abstract_like(state.params), abstract_like(state.opt_state))
            return type(state)(restored["params"], restored["opt_state"]), step
        except UserError:
            raise
        except Exception as e:  # orbax/tensorstore: truncated or missing files
            where = ckpt.quarantine(step)
            warnings.warn(f"checkpoint step {step} is unreadable ({type(e).__name__}: {str(e)[:120]}); "
                          f"moved to {where}, trying an older one", stacklevel=2)
    raise UserError(f"no readable checkpoint left in {ckpt.directory}; start a new run without --resume")
