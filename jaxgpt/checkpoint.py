"""Checkpoints through orbax's CheckpointManager, which owns atomic commits, retention and
async writes. A checkpoint is two items: `state` (params + optimizer state, arrays) and
`meta` (JSON: step, sampler state, configs, losses). Kept: the last `keep` and the best by
val loss.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as cm

from jaxgpt.errors import UserError


class Checkpointer:
    def __init__(self, out_dir: str | Path, keep: int = 3, *, read_only: bool = False, use_async: bool = True):
        self.directory = Path(out_dir).absolute() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise UserError(f"no checkpoints in {Path(out_dir)}; train first or pass the right --out_dir")
        policy = cm.AnyPreservationPolicy([
            cm.LatestN(n=keep),
            cm.BestN(get_metric_fn=lambda m: m["val_loss"], reverse=False, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(preservation_policy=policy, enable_async_checkpointing=use_async,
                                               read_only=read_only, create=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Start writing checkpoint `step` (asynchronously); meta['val_loss'] ranks it."""
        self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(meta)),
                          metrics={"val_loss": float(meta["val_loss"])})

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

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore into `abstract_state` (ShapeDtypeStructs carrying the target shardings)."""
        out = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                                                 meta=ocp.args.JsonRestore()))
        return out["state"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
