"""Device mesh and partition rules (FSDP + data parallel) on jax.sharding.

Mesh axes: `data` (pure data parallelism: parameters replicated) and `fsdp` (data
parallelism with parameters and optimizer state sharded, gathered per layer by XLA).
The batch is split over both axes; each parameter is split over `fsdp` along its first
dimension that divides evenly (after the stacked layer axis), and replicated otherwise.
The same code runs on 1 CPU, 8 GPUs or a TPU pod slice.
"""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.errors import UserError

BATCH_AXES = ("data", "fsdp")  # the batch dimension is split over every device


def abstract(tree: Any, shardings: Any = None) -> Any:
    """ShapeDtypeStructs of a tree of arrays or ShapeDtypeStructs, laid out by `shardings`: one
    sharding for every leaf, a tree of them like `tree`, or None (each leaf's own). What programs are
    lowered over when they are planned or exported without the arrays themselves."""
    def one(a: Any, s: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s if s is not None else getattr(a, "sharding", None))
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda a: one(a, shardings), tree)
    return jax.tree.map(one, tree, shardings)


def init_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
    """Join a multi-process run. With no arguments JAX auto-detects the cluster (Cloud TPU,
    SLURM, ...); on CPU, cross-process collectives go through gloo."""
    if getattr(jax.config, "jax_cpu_collectives_implementation", None) in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address, num_processes, process_id)


def make_mesh(data: int = 0, fsdp: int = 1, devices: list | None = None) -> Mesh:
    """A (data, fsdp) mesh over all devices (or `devices`: a target's, jaxgpt.plan.aot); data=0 means
    'all devices not used by fsdp'."""
    n = len(devices) if devices is not None else jax.device_count()
    if fsdp < 1 or n % fsdp:
        raise UserError(f"--mesh_fsdp={fsdp} must divide the {n} devices")
    data = data or n // fsdp
    if data * fsdp != n:
        raise UserError(f"--mesh_data={data} x --mesh_fsdp={fsdp} must equal the device count {n}")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def param_spec(path: str, shape: tuple[int, ...], fsdp: int) -> P:
    """The one partition rule: shard over `fsdp` along the first dimension that divides,
    skipping the leading layer axis of the stacked blocks (`h.*`); else replicate."""
    start = 1 if path.startswith("h.") else 0
    for dim in range(start, len(shape)):
        if fsdp > 1 and shape[dim] % fsdp == 0 and shape[dim] >= fsdp:
            return P(*([None] * dim), "fsdp")
    return P()


def _path(keypath: tuple) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator=".")


def param_shardings(params: Any, mesh: Mesh | AbstractMesh) -> Any:
    """NamedShardings for a params tree (arrays or ShapeDtypeStructs)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree_util.tree_map_with_path(
        lambda kp, a: NamedSharding(mesh, param_spec(_path(kp), a.shape, fsdp)), params)


def state_shardings(tree: Any, params: Any, mesh: Mesh | AbstractMesh) -> Any:
    """Shardings for a tree that holds copies of the params (optimizer moments): a leaf whose
    path ends with a parameter's path (e.g. `1.0.mu.h.mlp.c_fc.kernel`) is laid out like that
    parameter; anything else (step counts) is replicated."""
    fsdp = mesh.shape["fsdp"]
    names = {_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]}

    def rule(kp: tuple, a: Any) -> NamedSharding:
        path = _path(kp)
        name = next((n for n in names if path == n or path.endswith("." + n)), None)
        return NamedSharding(mesh, param_spec(name, a.shape, fsdp) if name else P())

    return jax.tree_util.tree_map_with_path(rule, tree)


def batch_sharding(mesh: Mesh | AbstractMesh) -> NamedSharding:
    """For (accum, batch, T) arrays: the batch axis over every device."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def local_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The contiguous rows (axis 1) of the global batch that this process's devices hold."""
    spans = [idx[1] for idx in sharding.addressable_devices_indices_map(global_shape).values() if idx is not None]
    start = min(s.start or 0 for s in spans)
    stop = max(global_shape[1] if s.stop is None else s.stop for s in spans)
    return slice(start, stop)


def global_batch(local: np.ndarray, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
    """This process's rows -> one global array laid out as `sharding` (no cross-host copy)."""
    return jax.make_array_from_process_local_data(sharding, local, global_shape)


def row_sharding(sharding: NamedSharding) -> NamedSharding:
    """The layout of a (B, ...) array whose rows are split like the batch axis of `sharding`'s
    (accum, B, ...) training batches: built directly, not indexed out of a batch (an eager program)."""
    return NamedSharding(sharding.mesh, P(*sharding.spec[1:]))


def whole_batch(a: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A (B, ...) array every process holds whole (evaluation windows) -> one global array whose
    batch axis is split like training batches: each process feeds only its own rows."""
    return global_batch(a[local_rows(sharding, (1, *a.shape))], row_sharding(sharding), a.shape)


def check_shared_folder(out_dir: Any) -> None:
    """Multi-process runs write one checkpoint from every host, so out_dir must be the same folder
    for all of them (gs:// or a shared filesystem). Process 0 leaves a marker with a fresh token;
    every process looks for it; a host that cannot see it stops the run with one clear line
    instead of a hang or a half-written checkpoint."""
    if jax.process_count() == 1:
        return
    import secrets

    from jax.experimental import multihost_utils

    from jaxgpt import paths

    token = int(multihost_utils.broadcast_one_to_all(np.int64(secrets.randbits(62))))
    marker = paths.path(out_dir) / f".shared-{token}"
    if jax.process_index() == 0:
        paths.write_bytes(marker, b"")
    multihost_utils.sync_global_devices("jaxgpt: shared marker written")
    seen = multihost_utils.process_allgather(np.int32(marker.exists()))
    multihost_utils.sync_global_devices("jaxgpt: shared marker checked")
    if jax.process_index() == 0:
        marker.unlink()
    if not np.all(seen):
        raise UserError(f"--out_dir={out_dir} is not the same folder on every host ({int(np.sum(seen))} of "
                        f"{len(seen)} processes see process 0's files): multi-host runs need a shared path, a gs:// "
                        f"bucket or a shared filesystem")


def preempted(step: int) -> bool:
    """True on every process at the same step once any host got SIGTERM (how Cloud TPU announces
    preemption): JAX's preemption sync point, which catches the signal itself when
    jax.distributed is initialized. Single-process runs use a Python signal handler instead."""
    if jax.process_count() == 1:
        return False
    from jax.experimental import multihost_utils
    return bool(multihost_utils.reached_preemption_sync_point(step))
