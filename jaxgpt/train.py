"""Training: the optimizer, the jitted train/eval steps, and the loop with checkpoints.

The hot path is functional (Flax's Gemma example): the model is split once into
(graphdef, params); `train_step` is a pure jitted function of arrays with its inputs
donated, and merges the model inside. Every random choice derives from TrainConfig.seed
and the step number, so a resumed run continues exactly where it stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh
from tqdm import tqdm

from jaxgpt.checkpoint import Checkpointer, abstract_like
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.data import BatchSampler, dataset_dir
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.sharding import batch_sharding, global_batch, local_rows, make_mesh, param_shardings, state_shardings

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class TrainState(NamedTuple):
    params: nnx.State  # float32 master weights
    opt_state: optax.OptState


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, cosine decay to min_lr at decay_iters, then flat."""
    warmup = min(tc.warmup_iters, tc.decay_iters - 1)  # leave the cosine at least one step in tiny runs
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, tc.decay_iters, tc.min_lr)


def decays(path: str) -> bool:
    """Weight decay on matrices and embeddings only (nanoGPT's rule: dim >= 2). Decided by
    name, because the stacked layers make LayerNorm scales 2-D too."""
    return path.removesuffix(".value").rsplit(".", 1)[-1] in ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """A tree of bools matching `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(
        lambda p, _: decays(jax.tree_util.keystr(p, simple=True, separator=".")), params)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=1e-8, weight_decay=tc.weight_decay,
                        mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), adamw) if tc.grad_clip > 0 else adamw


def loss_fn(graphdef: nnx.GraphDef, params: nnx.State, x: jax.Array, y: jax.Array,
            key: jax.Array | None, dtype: Any) -> jax.Array:
    """Mean next-token cross-entropy; compute in `dtype`, softmax in float32."""
    if dtype != jnp.float32:
        params = jax.tree.map(lambda p: p.astype(dtype), params)
    logits = nnx.merge(graphdef, params)(x, key=key)
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y).mean()


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, tc: TrainConfig,
                    state_sharding: Any = None) -> Callable:
    """(state, x, y, step) -> (state, metrics); x, y (accum, batch, T). Gradients are averaged
    over the micro-batches *before* clipping and AdamW, so accumulation equals one big batch."""
    dtype = DTYPES[tc.dtype]
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
        return TrainState(params, opt_state), {"loss": losses.mean(), "grad_norm": optax.tree.norm(grads)}

    # pin the output layout to the input's, so the donated buffers are reused step after step
    return jax.jit(train_step, donate_argnums=0, out_shardings=(state_sharding, None) if state_sharding else None)


def make_eval_step(graphdef: nnx.GraphDef, tc: TrainConfig) -> Callable:
    dtype = DTYPES[tc.dtype]
    return jax.jit(lambda params, x, y: loss_fn(graphdef, params, x, y, None, dtype))


def init_state(model_cfg: GPTConfig, tc: TrainConfig, mesh: Mesh | None = None
               ) -> tuple[nnx.GraphDef, nnx.GraphDef, TrainState]:
    """Fresh model and optimizer; returns the train- and eval-mode graphdefs and the state.
    With a mesh, parameters are created directly in their sharded layout (never whole on
    one device) and the optimizer state inherits it."""
    make = lambda: GPT(model_cfg, rngs=nnx.Rngs(tc.seed), remat=tc.remat)  # noqa: E731
    model = nnx.eval_shape(make)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    model.train()
    graphdef, abstract = nnx.split(model)
    shardings = param_shardings(abstract, mesh) if mesh is not None else None
    params = jax.jit(lambda: nnx.state(make()), out_shardings=shardings)()
    init = make_optimizer(tc).init
    opt_shardings = state_shardings(jax.eval_shape(init, abstract), abstract, mesh) if mesh is not None else None
    opt_state = jax.jit(init, out_shardings=opt_shardings)(params)
    return graphdef, eval_graphdef, TrainState(params, opt_state)


def estimate_loss(eval_step: Callable, params: nnx.State, samplers: dict[str, BatchSampler], iters: int,
                  to_global: Callable) -> dict[str, float]:
    """Mean loss over `iters` fixed batches per split (the same batches at every evaluation)."""
    out = {}
    for split, sampler in samplers.items():
        losses = [eval_step(params, *(to_global(a)[0] for a in sampler.get(i, stream=1))) for i in range(iters)]
        out[split] = float(np.mean(jax.device_get(losses)))
    return out


def check_writable(out_dir: Path) -> None:
    """Fail before any training if out_dir cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"0" * 1024)
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to out_dir {out_dir} ({e.strerror}); choose a writable --out_dir") from None


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, last_step: int) -> None:
    """On resume, drop records past the checkpoint: those steps are about to be redone."""
    if path.exists():
        keep = [l for l in path.read_text().splitlines() if l.strip() and json.loads(l)["step"] <= last_step]
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, path)


def resolve_configs(model_flags: dict[str, Any], train_flags: dict[str, Any],
                    preset: dict[str, Any]) -> tuple[GPTConfig, TrainConfig]:
    """Configs from explicit flags over a preset; with --resume, over the saved run instead,
    refusing model flags that contradict the checkpoint."""
    tc = TrainConfig(**{**{k: v for k, v in preset.items() if k in TrainConfig.__dataclass_fields__}, **train_flags})
    saved_path = Path(tc.out_dir) / "config.json"
    if not tc.resume or not saved_path.exists():
        return GPTConfig(**{**{k: v for k, v in preset.items() if k in GPTConfig.__dataclass_fields__}, **model_flags}), tc
    saved = json.loads(saved_path.read_text())
    diffs = [f"--{k}={v} (checkpoint has {saved['model'][k]})" for k, v in model_flags.items() if saved["model"][k] != v]
    if diffs:
        raise UserError(f"cannot resume {tc.out_dir} with a different model: {', '.join(diffs)}; "
                        f"drop those flags or use a new --out_dir")
    return GPTConfig(**saved["model"]), TrainConfig(**{**saved["train"], **train_flags})


def plot_metrics(metrics_path: Path, png_path: Path) -> None:
    """Loss curves (train per logged step, val per evaluation) as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["train_loss"] for r in rows], lw=0.8, alpha=0.7, label="train (per step)")
    val = [r for r in rows if "val_loss" in r]
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/byte)", title=png_path.parent.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)


def train(model_cfg: GPTConfig, tc: TrainConfig, *, on_log: Callable[[dict], None] | None = None) -> dict:
    """Run (or resume) training as configured; returns a summary dict. Writes to tc.out_dir:
    checkpoints/, config.json, metrics.jsonl, loss.png."""
    out_dir = Path(tc.out_dir)
    data = dataset_dir(tc.data_dir, tc.dataset)
    if json.loads((data / "meta.json").read_text())["vocab_size"] > model_cfg.vocab_size:
        raise UserError(f"dataset {tc.dataset} needs vocab_size >= 256, got {model_cfg.vocab_size}")
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp)
    if tc.batch_size % mesh.size:
        raise UserError(f"--batch_size={tc.batch_size} must be divisible by the {mesh.size} devices of the mesh")
    bsh = batch_sharding(mesh)
    shape = lambda accum: (accum, tc.batch_size, model_cfg.block_size)  # noqa: E731
    to_global = lambda a: global_batch(a, bsh, (a.shape[0], tc.batch_size, a.shape[2]))  # noqa: E731
    rows = local_rows(bsh, shape(1))
    samplers = {s: BatchSampler(data / f"{s}.bin", model_cfg.block_size, tc.batch_size, seed=tc.seed,
                                accum=tc.gradient_accumulation_steps, rows=rows) for s in ("train", "val")}
    eval_samplers = {s: BatchSampler(data / f"{s}.bin", model_cfg.block_size, tc.batch_size, seed=tc.seed, rows=rows)
                     for s in ("train", "val")}
    main = jax.process_index() == 0  # only process 0 logs, plots and draws the bar
    check_writable(out_dir)
    graphdef, eval_graphdef, state = init_state(model_cfg, tc, mesh)
    ckpt = Checkpointer(out_dir, tc.keep_checkpoints)
    metrics_path = out_dir / "metrics.jsonl"
    start = 0
    if tc.resume:
        if ckpt.latest_step() is None:
            raise UserError(f"--resume given but {out_dir} has no checkpoint; drop --resume to start a new run")
        start = ckpt.latest_step()
        restored = ckpt.restore(start, abstract_like(state.params), abstract_like(state.opt_state))
        state = TrainState(restored["params"], restored["opt_state"])
        if main:
            _truncate_metrics(metrics_path, start)
    elif ckpt.latest_step() is not None:
        raise UserError(f"{out_dir} already holds checkpoints; pass --resume to continue that run "
                        f"or choose a new --out_dir")
    elif main:
        metrics_path.unlink(missing_ok=True)
    if main:
        (out_dir / "config.json").write_text(json.dumps({"model": model_cfg.to_dict(), "train": tc.to_dict()}, indent=2))

    state_sharding = jax.tree.map(lambda a: a.sharding, state)
    train_step = make_train_step(graphdef, make_optimizer(tc), tc, state_sharding)
    eval_step = make_eval_step(eval_graphdef, tc)
    schedule = lr_schedule(tc)
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * model_cfg.block_size
    summary: dict[str, Any] = {"start_step": start, "out_dir": str(out_dir)}
    bar = tqdm(total=tc.max_iters, initial=start, disable=not (tc.progress and main), unit="step", dynamic_ncols=True)
    t_last, steps_since = time.perf_counter(), 0
    t_begin = time.perf_counter()
    for step in range(start, tc.max_iters):
        x, y = (to_global(a) for a in samplers["train"].get(step))
        state, metrics = train_step(state, x, y, step)
        steps_since += 1
        done = step + 1
        is_eval = done % tc.eval_interval == 0 or done == tc.max_iters
        if done % tc.log_interval == 0 or is_eval or step == start:
            loss = float(metrics["loss"])  # the one host sync per logged step
            now = time.perf_counter()
            record = {"step": done, "train_loss": loss, "lr": float(schedule(step)),
                      "tokens_per_sec": tokens_per_step * steps_since / (now - t_last)}
            if step == start:
                summary["first_step_s"] = now - t_last  # includes compilation
            t_last, steps_since = now, 0
            if not math.isfinite(loss):
                ckpt.wait()
                last = ckpt.latest_step()
                raise UserError(f"loss became {loss} at step {done}; stopped. The last good checkpoint "
                                f"({'step ' + str(last) if last is not None else 'none'}) is kept in {out_dir}; "
                                f"lower --learning_rate or raise --warmup_iters and --resume")
            if is_eval:
                losses = estimate_loss(eval_step, state.params, eval_samplers, tc.eval_iters, to_global)
                record.update(val_loss=losses["val"], eval_train_loss=losses["train"])
                if not math.isfinite(losses["val"]):
                    raise UserError(f"val loss became {losses['val']} at step {done}; not saved, last good checkpoint kept")
                ckpt.save(done, state.params, state.opt_state, {"step": done, "val_loss": losses["val"], "train_loss": losses["train"],
                                        "sampler": samplers["train"].state(done), "model": model_cfg.to_dict(),
                                        "train": tc.to_dict()})
            if main:
                _append_jsonl(metrics_path, record)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}",
                            **({"val": f"{record['val_loss']:.4f}"} if is_eval else {}))
            if on_log:
                on_log(record)
            if is_eval and tc.plot and main:
                plot_metrics(metrics_path, out_dir / "loss.png")
        bar.update(1)
    bar.close()
    ckpt.wait()
    ckpt.close()
    summary.update(steps=tc.max_iters - start, wall_s=time.perf_counter() - t_begin, final_step=tc.max_iters)
    rows = [json.loads(l) for l in metrics_path.read_text().splitlines() if l.strip()] if metrics_path.exists() else []
    evals = [r for r in rows if "val_loss" in r]
    if evals:
        summary.update(val_loss=evals[-1]["val_loss"], best_val_loss=min(r["val_loss"] for r in evals))
    return summary
