"""The accelerator programs, lowered ahead of time for platforms this host does not have.

`jax.export` traces and lowers a jitted function for `cuda` or `tpu` on any host, CPU included,
over abstract inputs that carry their shardings on an AbstractMesh (no devices needed). CI
exports the train step, the eval step and the decode step this way, so a CPU-only construct,
an op the target cannot lower, or a host callback in the hot path fails on the CPU VM instead of
in a user's TPU job. Compiling the result still happens on the target (XLA's SPMD partitioner
inserts the collectives there).
"""
from __future__ import annotations

from typing import Any, cast

import jax
import jax.numpy as jnp
from jax import export
from jax.sharding import AbstractMesh, AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.optim import make_optimizer
from jaxgpt.platform import DTYPES, resolve_matmul
from jaxgpt.sharding import BATCH_AXES, batch_sharding
from jaxgpt.step import abstract_train_state, graphdefs, loss_fn, make_train_step, with_batch_split

# Custom calls that run Python on the host: never acceptable inside a step for an accelerator.
HOST_CALLBACKS = ("xla_python_cpu_callback", "xla_python_gpu_callback", "xla_ffi_python_cpu_callback",
                  "xla_ffi_python_gpu_callback", "xla_ffi_partitioned_python_cpu_callback",
                  "xla_ffi_partitioned_python_gpu_callback")

# cuDNN flash attention (forward, backward): custom calls without export compatibility guarantees,
# allowed in the programs that use them, so the exported module shows which attention ran.
CUDNN_ATTENTION = ("__cudnn$fmhaSoftmax", "__cudnn$fmhaSoftmaxBackward")


def _allowed(attention: str) -> list[export.DisabledSafetyCheck]:
    return [export.DisabledSafetyCheck.custom_call(n) for n in CUDNN_ATTENTION] if attention == "cudnn" else []


def abstract_mesh(data: int, fsdp: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto))


def export_train_step(model_cfg: GPTConfig, tc: TrainConfig, platforms: tuple[str, ...], mesh: AbstractMesh | None,
                      remat: str, attention: str = "xla") -> export.Exported:
    """The train step for tc.dtype ('float32' or 'bfloat16') and `remat`, over `mesh`. cuDNN
    attention lowers only without a mesh (its partitioning rule needs real devices)."""
    graphdef, _ = graphdefs(model_cfg, remat, attention, resolve_matmul(tc.matmul_precision, tc.dtype, platforms[0]))
    state = abstract_train_state(model_cfg, tc, mesh)
    batch = jax.ShapeDtypeStruct((tc.gradient_accumulation_steps, tc.batch_size, model_cfg.block_size), jnp.int32,
                                 sharding=batch_sharding(mesh) if mesh is not None else None)
    shardings = jax.tree.map(lambda a: a.sharding, state) if mesh is not None else None
    tc = with_batch_split(tc, batch, platforms[0])  # the target's rule
    step = make_train_step(graphdef, make_optimizer(tc), tc, shardings)
    return export.export(cast(Any, step), platforms=platforms, disabled_checks=_allowed(attention))(state, batch, batch, jax.ShapeDtypeStruct((), jnp.int32))


def export_eval_step(model_cfg: GPTConfig, tc: TrainConfig, platforms: tuple[str, ...], mesh: AbstractMesh | None,
                     attention: str = "xla") -> export.Exported:
    _, eval_graphdef = graphdefs(model_cfg, "none", attention)
    params = abstract_train_state(model_cfg, tc, mesh).params
    batch = jax.ShapeDtypeStruct((tc.batch_size, model_cfg.block_size), jnp.int32,
                                 sharding=NamedSharding(mesh, P(BATCH_AXES)) if mesh is not None else None)
    dtype = DTYPES[tc.dtype]
    fn = jax.jit(lambda p, x, y: loss_fn(eval_graphdef, p, x, y, None, dtype))
    return export.export(fn, platforms=platforms, disabled_checks=_allowed(attention))(params, batch, batch)


def export_decode_step(model_cfg: GPTConfig, batch: int, platforms: tuple[str, ...], dtype: str = "float32",
                       chunk: int = 8, mode: str = "mixed") -> export.Exported:
    """Generation's compiled chunk (sample.abstract_chunk): `chunk` tokens per sequence through the KV
    cache or, past block_size, the window; top-k/top-p sampling inside. The default 'mixed'
    chunk holds both steps (the one crossing block_size); 'cache' and 'window' are the others."""
    from jaxgpt import sample

    return sample.abstract_chunk(model_cfg, batch, dtype=DTYPES[dtype], steps=chunk, top_k=40, top_p=0.95,
                                 mode=mode).export(platforms)


def custom_calls(exported: export.Exported) -> set[str]:
    """Names of the custom calls in an exported module (cuDNN attention, callbacks, ...)."""
    text = exported.mlir_module()
    names = set()
    for marker in ("stablehlo.custom_call @", "call_target_name = \""):
        for part in text.split(marker)[1:]:
            names.add(part.split("(")[0].split("\"")[0].strip())
    return names


