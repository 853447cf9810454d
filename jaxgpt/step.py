"""The compiled programs of training: the train and eval steps, the fresh state, and the
ahead-of-time compile that picks a remat policy which fits.

The hot path is functional (Flax's Gemma example): the model is split once into
(graphdef, params); `train_step` is a pure jitted function of arrays with its inputs
donated, and merges the model inside. Every random choice derives from TrainConfig.seed
and the step number, so a resumed run continues exactly where it stopped. The run around
these programs (data, checkpoints, the loop) is jaxgpt.train.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh

from jaxgpt import platform
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.optim import make_optimizer
from jaxgpt.platform import DTYPES, Platform
from jaxgpt.sharding import abstract, param_shardings, state_shardings


class TrainState(NamedTuple):
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, y: jax.Array,
            key: jax.Array | None, dtype: Any) -> jax.Array:
    """Mean next-token cross-entropy; compute in `dtype`, softmax in float32."""
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits = nnx.merge(graphdef, params)(x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, tc: TrainConfig,
                    state_sharding: Any = None, backend: str | None = None) -> Callable:
    """(state, x, y, step) -> (state, metrics); x, y (accum, batch, T). Gradients are averaged
    over the micro-batches *before* clipping and AdamW, so accumulation equals one big batch.
    Computes in tc.dtype (auto: the platform's); parameters and optimizer state stay float32.
    tc.batch_split > 1 cuts each micro-batch into that many parts of every batch_split-th row whose
    gradients are computed side by side and averaged: the same mean, summed in another order (with
    dropout, each part draws its own masks); 0: the platform's choice for an unsharded batch (train.py
    resolves it per device).
    `backend`: the platform it is compiled for (default: this process's; jaxgpt.plan.aot's targets)."""
    backend = backend or platform.backend()
    dtype = DTYPES[platform.resolve_dtype(tc.dtype, backend)]
    grad_fn = jax.value_and_grad(loss_fn, argnums=1)
    # one part's gradient, traced once however many parts call it (XLA inlines the calls)
    part_grads = jax.jit(lambda params, x, y, key: grad_fn(graphdef, params, x, y, key, dtype))

    def batch_grads(params: nnx.State, x: jax.Array, y: jax.Array, key: jax.Array) -> tuple[jax.Array, Any]:
        split = tc.batch_split or platform.resolve_batch_split(0, backend, x.shape[0])
        if split == 1:
            return grad_fn(graphdef, params, x, y, key, dtype)
        rows = lambda a, i: a.reshape(-1, split, *a.shape[1:])[:, i]  # noqa: E731  (rows i, i + split, ...)
        parts = [part_grads(params, rows(x, i), rows(y, i), jax.random.fold_in(key, i)) for i in range(split)]
        mean = lambda *a: functools.reduce(jnp.add, a) / split  # noqa: E731
        return mean(*(loss for loss, _ in parts)), jax.tree.map(mean, *(g for _, g in parts))

    def train_step(state: TrainState, x: jax.Array, y: jax.Array, step: jax.Array) -> tuple[TrainState, dict]:
        # the run's dropout key made inside the program: made eagerly it cost four tiny programs at start-up
        dropout_key = jax.random.fold_in(jax.random.key(tc.seed), 1)
        keys = jax.random.split(jax.random.fold_in(dropout_key, step), x.shape[0])

        def micro(grads, batch):
            loss, g = batch_grads(state.params, *batch)
            return jax.tree.map(jnp.add, grads, g), loss

        if x.shape[0] == 1:  # no accumulation: skip the loop and the zero-initialised sum
            loss, grads = batch_grads(state.params, x[0], y[0], keys[0])
            losses = loss[None]
        else:
            zeros = jax.tree.map(jnp.zeros_like, state.params)
            grads, losses = jax.lax.scan(micro, zeros, (x, y, keys))
            grads = jax.tree.map(lambda g: g / x.shape[0], grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params, opt_state), {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads),
                                               "param_norm": optax.tree.norm(params)}

    # pin the output layout to the input's, so the donated buffers are reused step after step
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding else None)


def make_eval_step(graphdef: nnx.GraphDef, tc: TrainConfig, backend: str | None = None) -> Callable:
    backend = backend or platform.backend()
    dtype = DTYPES[platform.resolve_dtype(tc.dtype, backend)]
    return jax.jit(lambda params, x, y: loss_fn(graphdef, params, x, y, None, dtype))


def graphdefs(model_cfg: GPTConfig, remat: str, attention: str = "xla",
              matmul: str = "float32") -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """Train- and eval-mode graphdefs. Remat, the attention kernel and the matmul precision live in
    the graph (static), the parameters do not: one state serves every choice."""
    model = nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0), remat=remat, attention=attention, matmul=matmul))
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    return nnx.graphdef(model), eval_graphdef


def init_state(model_cfg: GPTConfig, tc: TrainConfig, mesh: Mesh | None = None, *, remat: str | None = None,
               attention: str | None = None) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Fresh model and optimizer; returns the train- and eval-mode graphdefs and the state.
    remat/attention default to the platform's first choice. With a mesh, parameters are created
    directly in their sharded layout (never whole on one device); the optimizer state inherits it."""
    here = platform.backend()
    remat = remat or platform.remat_candidates(tc.remat, here)[0]
    dtype = platform.resolve_dtype(tc.dtype, here)
    attention = attention or platform.resolve_attention(model_cfg, dtype, here, tc.attention)
    make = lambda: GPT(model_cfg, rngs=nnx.Rngs(tc.seed), remat=remat, attention=attention)  # noqa: E731
    graphdef, eval_graphdef = graphdefs(model_cfg, remat, attention, platform.resolve_matmul(tc.matmul_precision, dtype, here))
    shapes = nnx.state(nnx.eval_shape(make))
    shardings = param_shardings(shapes, mesh) if mesh is not None else None
    params = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    init = make_optimizer(tc).init
    opt_shardings = state_shardings(jax.eval_shape(init, shapes), shapes, mesh) if mesh is not None else None
    opt_state = jax.jit(init, out_shardings=opt_shardings)(params)
    return graphdef, eval_graphdef, TrainState(params, opt_state)


def abstract_train_state(model_cfg: GPTConfig, tc: TrainConfig, mesh: Mesh | AbstractMesh | None) -> TrainState:
    """ShapeDtypeStructs of (params, optimizer state) laid out by jaxgpt.sharding's rule
    (unsharded without a mesh)."""
    params = nnx.state(nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0))))
    opt_state = jax.eval_shape(make_optimizer(tc).init, params)
    if mesh is None:
        return TrainState(params, opt_state)
    return TrainState(abstract(params, param_shardings(params, mesh)),
                      abstract(opt_state, state_shardings(opt_state, params, mesh)))



def with_batch_split(tc: TrainConfig, x: Any, backend: str) -> TrainConfig:
    """tc with --batch_split resolved for `backend` (platform.resolve_batch_split) from the rows of the
    batch x (accum, batch, T) that each device holds; x may be an array, a ShapeDtypeStruct carrying its
    sharding, or numpy (one device's)."""
    sharding = getattr(x, "sharding", None)
    rows = sharding.shard_shape(x.shape)[1] if sharding is not None else x.shape[1]
    return dataclasses.replace(tc, batch_split=platform.resolve_batch_split(tc.batch_split, backend, rows))


class Fit(NamedTuple):
    """One compile of the train step for one candidate: the program (None when the compiler itself
    refused it for memory: XLA:TPU checks HBM while compiling) and its memory against the device's."""

    compiled: Any
    tc: TrainConfig  # the candidate: remat, batch_size, accumulation, and batch_split resolved
    memory: platform.Memory
    compile_s: float


def train_candidates(tc: TrainConfig, backend: str, devices: int, batch_auto: bool = False,
                     device_kind: str = "") -> list[TrainConfig]:
    """The train steps to try, in order; the first that fits is the run's. Each remat policy of
    --remat (auto: none, dots, full); with batch_auto, under each policy, the global batch
    (batch_size x accumulation) split into the fewest micro-steps, largest micro-batch first, each a
    multiple of the devices (remat first: recomputing costs FLOPs, accumulation does not). Each with the
    dtype resolved for the devices (platform.resolve_dtype)."""
    total = tc.batch_size * tc.gradient_accumulation_steps
    splits = [(b, total // b) for b in range(total, 0, -1) if total % b == 0 and b % devices == 0] if batch_auto \
        else [(tc.batch_size, tc.gradient_accumulation_steps)]
    if not splits:
        raise UserError(f"--batch_size=auto: the global batch of {total} sequences cannot be split over {devices} "
                        f"devices; give --batch_size and --gradient_accumulation_steps whose product is a multiple of it")
    dtype = cast(Any, platform.resolve_dtype(tc.dtype, backend, device_kind))
    return [dataclasses.replace(tc, remat=cast(Any, remat), batch_size=b, gradient_accumulation_steps=n, dtype=dtype)
            for remat in platform.remat_candidates(tc.remat, backend) for b, n in splits]


def search_train_step(model_cfg: GPTConfig, candidates: list[TrainConfig], state: TrainState,
                      batch: Callable[[TrainConfig], tuple[Any, Any]], step: Any, attention: str,
                      site: platform.Site) -> tuple[list[Fit], nnx.GraphDef]:
    """The train step a run compiles, and the planner (jaxgpt.plan.aot) too: each candidate in order
    until one fits `site`'s memory with platform.MEMORY_MARGIN. `state` and batch(candidate) -> (x, y)
    may be arrays or ShapeDtypeStructs carrying their shardings. Returns every Fit tried (the
    last is the choice, fitting or not) and its eval-mode graphdef; raises nothing for memory."""
    shardings = jax.tree.map(lambda a: a.sharding, state)
    tried: list[Fit] = []
    for cand in candidates:
        x, y = batch(cand)
        cand = with_batch_split(cand, x, site.backend)
        matmul = platform.resolve_matmul(cand.matmul_precision, platform.resolve_dtype(cand.dtype, site.backend),
                                         site.backend)
        graphdef, eval_graphdef = graphdefs(model_cfg, cand.remat, attention, matmul)
        t = time.perf_counter()
        lowered = cast(Any, make_train_step(graphdef, make_optimizer(cand), cand, shardings, site.backend)).lower(
            state, x, y, step)
        try:
            compiled, refused = lowered.compile(), ""
        except Exception as e:  # XLA:TPU: "RESOURCE_EXHAUSTED: Ran out of memory ... exceeds available HBM"
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, refused = None, str(e).split("\n")[0]
        what = f"the train step (remat={cand.remat}, batch_size={cand.batch_size} x {cand.gradient_accumulation_steps})"
        sizes = platform.program_bytes(compiled) if compiled is not None else None
        memory = platform.Memory(what, sizes["total"] if sizes else None, site.memory,
                                 site.memory_source, platform.MEMORY_MARGIN, refused)
        tried.append(Fit(compiled, cand, memory, round(time.perf_counter() - t, 3)))
        if memory.fits():
            break
    return tried, eval_graphdef


def compile_train_step(model_cfg: GPTConfig, tc: TrainConfig, state: TrainState, x: jax.Array, y: jax.Array,
                       step: int, attention: str | None = None) -> tuple[Callable, nnx.GraphDef, Platform, dict[str, Any]]:
    """Compile the train step ahead of time for this process's devices (search_train_step). Stops with
    UserError, before any step runs, when even the last candidate cannot fit. Returns (compiled
    step, eval graphdef, Platform, memory figures). `attention` overrides the platform's kernel
    choice (benchmarks)."""
    site = platform.local_site()
    dtype = platform.resolve_dtype(tc.dtype, site.backend, site.device_kind)
    attention = attention or platform.resolve_attention(model_cfg, dtype, site.backend, tc.attention)
    tried, eval_graphdef = search_train_step(model_cfg, train_candidates(tc, site.backend, site.devices,
                                                                         device_kind=site.device_kind), state,
                                             lambda _: (x, y), step, attention, site)
    fit = tried[-1]
    whole = dataclasses.replace(fit.memory, margin=1.0)  # the search keeps a margin; the run needs none
    if not whole.fits():
        raise UserError(whole.shortfall(platform.advice(remat=fit.tc.remat, batch_size=tc.batch_size,
                                                             accumulation=tc.gradient_accumulation_steps,
                                                             fsdp=tc.mesh_fsdp)))
    memory = {"step_bytes_per_device": fit.memory.need, "limit_bytes_per_device": site.memory,
              "limit_source": site.memory_source, "compile_s": fit.compile_s}
    plat = dataclasses.replace(platform.resolve(model_cfg, tc, fit.tc.remat, site), attention=attention,
                               batch_split=fit.tc.batch_split)
    return fit.compiled, eval_graphdef, plat, memory
