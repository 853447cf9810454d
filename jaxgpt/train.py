"""Training: the optimizer, the jitted train/eval steps, and the loop with checkpoints.

The hot path is functional (Flax's Gemma example): the model is split once into
(graphdef, params); `train_step` is a pure jitted function of arrays with its inputs
donated, and merges the model inside. Every random choice derives from TrainConfig.seed
and the step number, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh
from tqdm import tqdm

from jaxgpt import paths, platform, rundir, tracking
from jaxgpt.checkpoint import Checkpointer, restore_latest
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.data import BatchSampler, check_dataset, dataset_dir, read_meta
from jaxgpt.errors import Interrupted, UserError
from jaxgpt.evaluate import split_scorer
from jaxgpt.lock import run_lock
from jaxgpt.model import GPT
from jaxgpt.optim import lr_schedule, make_optimizer
from jaxgpt.platform import DTYPES, Platform
from jaxgpt.sharding import (
    batch_sharding,
    check_shared_folder,
    global_batch,
    local_rows,
    make_mesh,
    param_shardings,
    preempted,
    state_shardings,
    whole_batch,
)
from jaxgpt.tokenizer import TOKENIZER_FILE, HFTokenizer, Tokenizer, check_tokenizer


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
    `backend`: the platform it is compiled for (default: this process's; jaxgpt.aot's targets)."""
    backend = backend or platform.backend()
    dtype = DTYPES[platform.resolve_dtype(tc.dtype, backend)]
    dropout_key = jax.random.fold_in(jax.random.key(tc.seed), 1)

    def train_step(state: TrainState, x: jax.Array, y: jax.Array, step: jax.Array) -> tuple[TrainState, dict]:
        keys = jax.random.split(jax.random.fold_in(dropout_key, step), x.shape[0])
        grad_fn = jax.value_and_grad(loss_fn, argnums=1)

        def micro(grads, batch):
            loss, g = grad_fn(graphdef, state.params, *batch, dtype)
            return jax.tree.map(jnp.add, grads, g), loss

        if x.shape[0] == 1:  # no accumulation: skip the loop and the zero-initialised sum
            loss, grads = grad_fn(graphdef, state.params, x[0], y[0], keys[0], dtype)
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
    return platform.jit(train_step, backend, donate_argnums=0,
                        out_shardings=(state_sharding, None) if state_sharding else None)


def make_eval_step(graphdef: nnx.GraphDef, tc: TrainConfig, backend: str | None = None) -> Callable:
    backend = backend or platform.backend()
    dtype = DTYPES[platform.resolve_dtype(tc.dtype, backend)]
    return platform.jit(lambda params, x, y: loss_fn(graphdef, params, x, y, None, dtype), backend)


def graphdefs(model_cfg: GPTConfig, remat: str, attention: str = "xla") -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """Train- and eval-mode graphdefs. Remat and the attention kernel live in the graph (static),
    the parameters do not: one state serves every choice."""
    model = nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0), remat=remat, attention=attention))
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
    attention = attention or platform.resolve_attention(model_cfg, platform.resolve_dtype(tc.dtype, here), here)
    make = lambda: GPT(model_cfg, rngs=nnx.Rngs(tc.seed), remat=remat, attention=attention)  # noqa: E731
    graphdef, eval_graphdef = graphdefs(model_cfg, remat, attention)
    abstract = nnx.state(nnx.eval_shape(make))
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    params = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    init = make_optimizer(tc).init
    opt_shardings = state_shardings(jax.eval_shape(init, abstract), abstract, mesh) if mesh is not None else None
    opt_state = jax.jit(init, out_shardings=opt_shardings)(params)
    return graphdef, eval_graphdef, TrainState(params, opt_state)


def _sds(tree: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def abstract_train_state(model_cfg: GPTConfig, tc: TrainConfig, mesh: Mesh | AbstractMesh | None) -> TrainState:
    """ShapeDtypeStructs of (params, optimizer state) laid out by jaxgpt.sharding's rule
    (unsharded without a mesh)."""
    params = nnx.state(nnx.eval_shape(lambda: GPT(model_cfg, rngs=nnx.Rngs(0))))
    opt_state = jax.eval_shape(make_optimizer(tc).init, params)
    if mesh is None:
        return TrainState(params, opt_state)
    return TrainState(_sds(params, param_shardings(params, mesh)),
                      _sds(opt_state, state_shardings(opt_state, params, mesh)))


def estimate_loss(eval_step: Callable, params: nnx.State, samplers: dict[str, BatchSampler], iters: int,
                  to_global: Callable) -> dict[str, float]:
    """Mean loss over `iters` fixed batches per split (the same batches at every evaluation)."""
    out = {}
    for split, sampler in samplers.items():
        losses = [eval_step(params, *(to_global(a)[0] for a in sampler.get(i, stream=1))) for i in range(iters)]
        out[split] = float(np.mean(jax.device_get(losses)))
    return out


@contextlib.contextmanager
def stop_signals(sigterm: bool = True) -> Iterator[tuple[list[int], list[int]]]:
    """Turn SIGINT and SIGTERM into a flag (`caught`) the loop checks after each step (main thread
    only). A multi-process run leaves SIGTERM to JAX's preemption sync point (every host stops at
    the same step), and turns a SIGINT into a SIGTERM to itself so that Ctrl-C on one host stops
    them all there too: `asked` then records the SIGINT, for this host's exit code."""
    caught: list[int] = []
    asked: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught, asked
        return

    def coordinated(signum: int, _: Any) -> None:
        asked.append(signum)
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier tells every host

    handlers = {signal.SIGINT: lambda signum, _: caught.append(signum), signal.SIGTERM: lambda signum, _: caught.append(signum)} \
        if sigterm else {signal.SIGINT: coordinated}
    previous = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        yield caught, asked
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class Fit(NamedTuple):
    """One compile of the train step for a remat policy: the program, or None when the compiler
    itself refused it for memory (XLA:TPU checks HBM while compiling); its bytes per device."""

    compiled: Any
    remat: str
    need: int | None
    compile_s: float
    refused: str  # the compiler's out-of-memory message ('' when it compiled)

    def fits(self, memory: int | None, margin: float = 1.0) -> bool:
        """Compiled, and within `margin` of `memory` bytes per device (unknown sizes fit)."""
        return not self.refused and (self.need is None or memory is None or self.need <= margin * memory)


def fit_train_step(model_cfg: GPTConfig, tc: TrainConfig, state: TrainState, x: Any, y: Any, step: Any, attention: str,
                   site: platform.Site) -> tuple[Fit, nnx.GraphDef]:
    """The train step a run compiles, and the planner (jaxgpt.aot) too: under remat=auto the first
    policy of none -> dots -> full whose program fits `site`'s memory with a margin. `state`, x and
    y may be arrays or ShapeDtypeStructs carrying their shardings. Returns the last Fit tried and
    its eval-mode graphdef; raises nothing for memory (the caller decides)."""
    shardings = jax.tree.map(lambda a: a.sharding, state)
    for remat in platform.remat_candidates(tc.remat, site.backend):
        graphdef, eval_graphdef = graphdefs(model_cfg, remat, attention)
        t = time.perf_counter()
        lowered = cast(Any, make_train_step(graphdef, make_optimizer(tc), tc, shardings, site.backend)).lower(state, x, y, step)
        try:
            compiled, refused = lowered.compile(), ""
            need = platform.step_memory(compiled)
        except Exception as e:  # XLA:TPU: "RESOURCE_EXHAUSTED: Ran out of memory ... exceeds available HBM"
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            compiled, need, refused = None, None, str(e).split("\n")[0]
        fit = Fit(compiled, remat, need, round(time.perf_counter() - t, 3), refused)
        if fit.fits(site.memory, platform.MEMORY_MARGIN):
            break
    return fit, eval_graphdef


def compile_train_step(model_cfg: GPTConfig, tc: TrainConfig, state: TrainState, x: jax.Array, y: jax.Array,
                       step: int, attention: str | None = None) -> tuple[Callable, nnx.GraphDef, Platform, dict[str, Any]]:
    """Compile the train step ahead of time for this process's devices (fit_train_step). Stops with
    UserError, before any step runs, when even the chosen program cannot fit. Returns (compiled
    step, eval graphdef, Platform, memory figures). `attention` overrides the platform's kernel
    choice (benchmarks)."""
    site = platform.local_site()
    attention = attention or platform.resolve_attention(model_cfg, platform.resolve_dtype(tc.dtype, site.backend),
                                                         site.backend)
    fit, eval_graphdef = fit_train_step(model_cfg, tc, state, x, y, step, attention, site)
    if fit.refused:
        raise UserError(f"the train step does not fit on {site.device_kind} (remat={fit.remat}, batch_size={tc.batch_size}): "
                        f"{fit.refused}; try --batch_size=auto, --remat=full, or --mesh_fsdp")
    platform.check_fits(fit.need, site.memory, site.memory_source, tc, fit.remat)
    memory = {"step_bytes_per_device": fit.need, "limit_bytes_per_device": site.memory, "limit_source": site.memory_source,
              "compile_s": fit.compile_s}
    return (fit.compiled, eval_graphdef, dataclasses.replace(platform.describe(model_cfg, tc, fit.remat, site), attention=attention),
            memory)


def train(model_cfg: GPTConfig, tc: TrainConfig, *, on_log: Callable[[dict], None] | None = None,
          on_start: Callable[[Platform, dict], None] | None = None, init_params: nnx.State | None = None,
          tokenizer: Tokenizer | None = None) -> dict:
    """Run (or resume) training as configured; returns a summary dict. Writes to tc.out_dir:
    checkpoints/, config.json (with the resolved platform choices and the tokenizer's identity),
    metrics.jsonl, loss.png and, for a tokenizer.json tokenizer, a copy of it.
    `init_params`: start from these weights (fine-tuning) with a fresh optimizer; `tokenizer`:
    theirs (default: the data's). `on_start(platform, memory)` is called once the step is
    compiled, `on_log(record)` per record. One run writes a folder at a time (jaxgpt.lock)."""
    out_dir = paths.path(tc.out_dir)
    paths.check_gcs(out_dir)
    with run_lock(out_dir):
        tc = dataclasses.replace(tc, resume=rundir.resolve_resume(out_dir, tc.resume, model_cfg, tc))
        return _train(model_cfg, tc, out_dir, on_log=on_log, on_start=on_start, init_params=init_params,
                      tokenizer=tokenizer)


def _train(model_cfg: GPTConfig, tc: TrainConfig, out_dir: Any, *, on_log: Callable[[dict], None] | None,
           on_start: Callable[[Platform, dict], None] | None, init_params: nnx.State | None,
           tokenizer: Tokenizer | None) -> dict:
    data = dataset_dir(tc.data_dir, tc.dataset)
    data_meta = read_meta(data)
    check_dataset(data, data_meta)
    if data_meta["vocab_size"] > model_cfg.vocab_size:
        raise UserError(f"dataset {tc.dataset} has a vocabulary of {data_meta['vocab_size']} tokens but the model only "
                        f"{model_cfg.vocab_size}; raise --vocab_size")
    saved = rundir.read_config(out_dir) if tc.resume else {}
    identity = saved.get("tokenizer") or (tokenizer.identity() if tokenizer is not None else data_meta["tokenizer_identity"])
    check_tokenizer(data_meta, identity, "the resumed run" if saved.get("tokenizer") else "the model", tc.dataset)
    if tokenizer is None and identity["kind"] == "tokenizer.json":
        tokenizer = HFTokenizer(data / TOKENIZER_FILE)
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp)
    if tc.batch_size % mesh.size:
        raise UserError(f"--batch_size={tc.batch_size} must be divisible by the {mesh.size} devices of the mesh")
    bsh = batch_sharding(mesh)
    to_global = lambda a: global_batch(a, bsh, (a.shape[0], tc.batch_size, a.shape[2]))  # noqa: E731
    rows = local_rows(bsh, (1, tc.batch_size, model_cfg.block_size))
    samplers = {s: BatchSampler(data / f"{s}.bin", model_cfg.block_size, tc.batch_size, seed=tc.seed,
                                accum=tc.gradient_accumulation_steps, rows=rows, dtype=data_meta["dtype"])
                for s in ("train", "val")}
    eval_samplers = {s: BatchSampler(data / f"{s}.bin", model_cfg.block_size, tc.batch_size, seed=tc.seed, rows=rows,
                                     dtype=data_meta["dtype"]) for s in ("train", "val")}
    main = jax.process_index() == 0  # only process 0 logs, plots and draws the bar
    # Sizes first, allocation after: the parameters and optimizer state (abstract, as laid out on the
    # mesh), then the compiled step (its arguments are that state) must fit, or nothing is allocated.
    abstract = abstract_train_state(model_cfg, tc, mesh)
    platform.check_state_fits(platform.bytes_per_device(abstract), "the parameters and optimizer state",
                              f"a smaller model, or shard them with --mesh_fsdp=N (N devices; now {tc.mesh_fsdp})")
    batch = lambda step: tuple(to_global(a) for a in samplers["train"].get(step))  # noqa: E731
    x0, y0 = batch(0)
    train_step, eval_graphdef, plat, memory = compile_train_step(model_cfg, tc, abstract, x0, y0, 0)
    _, _, state = init_state(model_cfg, tc, mesh, remat=plat.remat, attention=plat.attention)
    if init_params is not None and not tc.resume:  # fine-tuning: these weights, laid out like the fresh ones
        copy = lambda new, old: jax.device_put(np.asarray(new), old.sharding)  # noqa: E731  (the step donates it)
        state = TrainState(jax.tree.map(copy, init_params, state.params), state.opt_state)
    rundir.preflight(out_dir, sum(a.nbytes for a in jax.tree.leaves(state)))
    check_shared_folder(out_dir)
    ckpt = Checkpointer(out_dir, tc.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if tc.resume:
        if ckpt.latest_step() is None:
            raise UserError(f"--resume given but {out_dir} has no checkpoint; drop --resume to start a new run "
                            f"(--resume=auto does either)")
        state, start = restore_latest(ckpt, state)
        if main:
            rundir.truncate_metrics(metrics_path, start)
    elif ckpt.latest_step() is not None:
        raise UserError(f"{out_dir} already holds checkpoints; pass --resume to continue that run "
                        f"or choose a new --out_dir")
    elif main:
        metrics_path.unlink(missing_ok=True)
    if main:
        if isinstance(tokenizer, HFTokenizer):
            paths.write_bytes(out_dir / TOKENIZER_FILE, tokenizer.raw)
    config = {"model": model_cfg.to_dict(), "train": tc.to_dict(), "tokenizer": identity, "platform": plat.to_dict(),
              "memory": memory}
    if main:
        rundir.write_json(out_dir / "config.json", config)
    if on_start:
        on_start(plat, memory)
    sinks = tracking.sinks(out_dir, tc, model_cfg, config, start, on_log, writer=main)

    def save(step: int, val_loss: float, train_loss: float) -> None:
        ckpt.save(step, state.params, state.opt_state,
                  {"step": step, "val_loss": val_loss, "train_loss": train_loss, "sampler": samplers["train"].state(step),
                   "model": model_cfg.to_dict(), "train": tc.to_dict(), "platform": plat.to_dict()})

    eval_step = make_eval_step(eval_graphdef, dataclasses.replace(tc, dtype=cast(Any, plat.dtype)))
    score_val = split_scorer(data / "val.bin", data_meta["dtype"], eval_graphdef, model_cfg, DTYPES[plat.dtype],
                             to_device=lambda a: whole_batch(a, bsh), devices=mesh.size, tokenizer=tokenizer)
    eval_s = 0.0  # time spent evaluating (time-to-loss runs exclude it)
    log = tracking.MetricsLog(tc.batch_size * tc.gradient_accumulation_steps * model_cfg.block_size, lr_schedule(tc))
    summary: dict[str, Any] = {"start_step": start, "out_dir": str(out_dir), "compile_s": memory["compile_s"]}
    reached = -1  # the step whose evaluation ended the run
    bar = tqdm(total=tc.max_iters, initial=start, disable=not (tc.progress and main), unit="step", dynamic_ncols=True)
    t_begin = time.perf_counter()
    last_loss = math.nan
    recent: collections.deque[float] = collections.deque(maxlen=20)  # for --eval_below
    try:
        with stop_signals(sigterm=jax.process_count() == 1) as (caught, asked):
            for step in range(start, tc.max_iters):
                state, metrics = train_step(state, *batch(step), step)
                log.step()
                done = step + 1
                if preempted(done):  # every host reaches this step together
                    caught.append(asked[0] if asked else signal.SIGTERM)
                gated = 0 < tc.eval_below and not (len(recent) == recent.maxlen and np.mean(recent) <= tc.eval_below)
                is_eval = done % tc.eval_interval == 0 and not gated or done == tc.max_iters
                if done % tc.log_interval == 0 or is_eval or step == start or caught:
                    log.add(done, metrics)
                if log.pending and (log.due() or is_eval or step == start or caught):
                    records = log.fetch()
                    bad = next((r for r in records if not math.isfinite(r["train_loss"])), None)
                    if bad is not None:
                        ckpt.wait()
                        last = ckpt.latest_step()
                        raise UserError(f"loss became {bad['train_loss']} at step {bad['step']}; stopped. The last good "
                                        f"checkpoint ({'step ' + str(last) if last is not None else 'none'}) is kept in "
                                        f"{out_dir}; lower --learning_rate or raise --warmup_iters and --resume")
                    last_loss = records[-1]["train_loss"]
                    if gated:
                        recent.extend(r["train_loss"] for r in records)
                    if is_eval and records[-1]["step"] == done:
                        t_eval = time.perf_counter()
                        losses = estimate_loss(eval_step, state.params, eval_samplers, tc.eval_iters, to_global)
                        whole = score_val(state.params) if tc.eval_full else None  # instead of eval_iters batches
                        if whole is not None:
                            losses["val"] = whole.loss
                        eval_s += time.perf_counter() - t_eval
                        records[-1].update(val_loss=losses["val"], eval_train_loss=losses["train"])
                        if tc.eval_full:
                            records[-1].update(time=time.time(), eval_s=eval_s)
                        if done == tc.max_iters or 0 < tc.stop_loss and losses["val"] <= tc.stop_loss:
                            final = whole or score_val(state.params)  # the whole val split, for the summary
                            records[-1].update(val_loss_full=final.loss, val_bpb=final.bits_per_byte)
                            reached = done
                        if not math.isfinite(losses["val"]):
                            raise UserError(f"val loss became {losses['val']} at step {done}; not saved, last good "
                                            f"checkpoint kept")
                        save(done, losses["val"], losses["train"])
                    for sink in sinks:
                        sink.write(records)
                    r = records[-1]
                    bar.set_postfix(loss=f"{r['train_loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_sec']:.0f}",
                                    **({"val": f"{r['val_loss']:.4f}"} if "val_loss" in r else {}))
                    if is_eval and tc.plot and main:
                        rundir.plot_metrics(metrics_path, out_dir / "loss.png")
                bar.update(1)
                if reached == done and done < tc.max_iters:  # --stop_loss reached
                    break
                if caught:  # finish the step, save it (unranked: not evaluated), then stop
                    if not is_eval:
                        save(done, math.inf, last_loss)
                    ckpt.wait()
                    ckpt.close()
                    bar.close()
                    name = signal.Signals(caught[0]).name
                    raise Interrupted(caught[0], f"{name} at step {done}; checkpoint saved in {ckpt.directory / str(done)}; "
                                      f"continue with --resume --out_dir={out_dir}")
    except paths.StorageError as e:  # a metrics or config write refused for good: say what survives
        ckpt.abandon()
        raise UserError(f"{e}; {ckpt.intact()}") from None
    except BaseException:
        ckpt.abandon()
        raise
    finally:
        for sink in sinks:
            sink.close()
    bar.close()
    ckpt.wait()
    ckpt.close()
    last_step = reached if reached > 0 else tc.max_iters
    summary.update(steps=last_step - start, wall_s=time.perf_counter() - t_begin, final_step=last_step,
                   platform=plat.to_dict(), eval_s=eval_s)
    logged = rundir.read_metrics(metrics_path)
    evals = [r for r in logged if "val_loss" in r]
    if evals:
        summary.update(val_loss=evals[-1]["val_loss"], best_val_loss=min(r["val_loss"] for r in evals))
    if logged and "val_loss_full" in logged[-1]:
        summary.update(val_loss_full=logged[-1]["val_loss_full"], val_bpb=logged[-1]["val_bpb"])
    return summary
