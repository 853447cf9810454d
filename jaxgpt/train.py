"""A training run: the data, the compiled step (jaxgpt.step), checkpoints, and the loop.

`train` reads as the shape of a run: set up (data, mesh, sizes, the compiled step, a fresh
state), resume (or refuse to overwrite), record the config, then the step loop, whose logged
steps may evaluate and save, and finish (the summary). Every random choice derives from
TrainConfig.seed and the step number, so a resumed run continues exactly where it stopped.
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
from typing import Any, cast

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from tqdm import tqdm

from jaxgpt import cli, paths, platform, rundir, tracking
from jaxgpt.checkpoint import Checkpointer, restore_latest
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import Interrupted, UserError
from jaxgpt.evaluate import split_scorer
from jaxgpt.loader import SPLITS, BatchSampler, Dataset, open_dataset
from jaxgpt.lock import run_lock
from jaxgpt.optim import lr_schedule
from jaxgpt.platform import DTYPES, Platform
from jaxgpt.probes import Probes
from jaxgpt.sharding import (
    batch_sharding,
    check_shared_folder,
    global_batch,
    local_rows,
    make_mesh,
    preempted,
    row_sharding,
    whole_batch,
)
from jaxgpt.step import TrainState, abstract_train_state, compile_train_step, init_state, make_eval_step
from jaxgpt.tokenizer import TOKENIZER_FILE, ByteTokenizer, HFTokenizer, Tokenizer, check_tokenizer


def estimate_loss(eval_step: Callable, params: nnx.State, samplers: dict[str, BatchSampler], iters: int,
                  to_global: Callable) -> dict[str, float]:
    """Mean loss over `iters` fixed batches per split (the same batches at every evaluation);
    `to_global` makes this host's (rows, T) of a batch the global (B, T) array."""
    out = {}
    for split, sampler in samplers.items():
        losses = [eval_step(params, *(to_global(a[0]) for a in sampler.get(i, stream=1))) for i in range(iters)]
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
    run = _set_up(model_cfg, tc, out_dir, tokenizer, init_params)
    _resume(run)
    config = _record_config(run)
    if on_start:
        on_start(run.plat, run.memory)
    loop = _Loop(run, tracking.sinks(out_dir, tc, model_cfg, config, run.start, on_log, writer=run.main))
    loop.run_steps()
    return _finish(run, loop)


@dataclasses.dataclass
class _Run:
    """What a run set up before its first step; `state` is the one thing the loop replaces."""

    model_cfg: GPTConfig
    tc: TrainConfig
    out_dir: Any
    data: Dataset
    data_meta: dict[str, Any]
    identity: dict[str, Any]  # the tokenizer's
    tokenizer: Tokenizer | None
    mesh: Mesh
    bsh: NamedSharding  # the batch's layout on the mesh
    samplers: dict[str, BatchSampler]  # the training batches (with accumulation), per split
    eval_samplers: dict[str, BatchSampler]
    main: bool  # process 0: the one that logs, plots and draws the bar
    train_step: Callable
    eval_graphdef: nnx.GraphDef
    plat: Platform
    memory: dict[str, Any]
    state: TrainState
    ckpt: Checkpointer
    start: int = 0

    def to_global(self, a: np.ndarray) -> jax.Array:
        return _to_global(a, self.bsh, self.tc.batch_size)

    def rows_to_global(self, a: np.ndarray) -> jax.Array:
        """This host's rows (rows, T) of an evaluation batch as the global (batch_size, T) array."""
        return global_batch(a, row_sharding(self.bsh), (self.tc.batch_size, *a.shape[1:]))

    def batch(self, step: int) -> tuple[jax.Array, ...]:
        return tuple(self.to_global(a) for a in self.samplers["train"].get(step))


def _to_global(a: np.ndarray, bsh: NamedSharding, batch_size: int) -> jax.Array:
    """This host's rows (accum, rows, T) as the global (accum, batch_size, T) array on the mesh."""
    return global_batch(a, bsh, (a.shape[0], batch_size, a.shape[2]))


def _set_up(model_cfg: GPTConfig, tc: TrainConfig, out_dir: Any, tokenizer: Tokenizer | None,
            init_params: nnx.State | None) -> _Run:
    """Check the data, lay out the mesh and samplers, check the run folder, compile the step (sizes
    first: nothing is allocated unless the parameters, optimizer state and compiled step fit), then a
    fresh state."""
    data = open_dataset(tc.data_dir, tc.dataset, model_cfg.vocab_size)
    data_meta = data.meta
    if data_meta.get("format") == "llm.c":  # no meta.json: the vocabulary is the user's word; check it on a sample
        top = int(data.stream("train").head(1 << 20).max())
        if top >= model_cfg.vocab_size:
            raise UserError(f"dataset {tc.dataset} holds token ids up to {top} but the model's vocabulary is "
                            f"{model_cfg.vocab_size}; give --vocab_size (50304 for GPT-2's tokenizer)")
    if data_meta["vocab_size"] > model_cfg.vocab_size:
        raise UserError(f"dataset {tc.dataset} has a vocabulary of {data_meta['vocab_size']} tokens but the model only "
                        f"{model_cfg.vocab_size}; raise --vocab_size")
    saved = rundir.read_config(out_dir) if tc.resume else {}
    identity = saved.get("tokenizer") or (tokenizer.identity() if tokenizer is not None else data_meta["tokenizer_identity"])
    check_tokenizer(data_meta, identity, "the resumed run" if saved.get("tokenizer") else "the model", tc.dataset)
    if tokenizer is None and identity["kind"] == "tokenizer.json":
        tokenizer = HFTokenizer(data.local / TOKENIZER_FILE)
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp)
    if tc.batch_size % mesh.size:
        raise UserError(f"--batch_size={tc.batch_size} must be divisible by the {mesh.size} devices of the mesh")
    bsh = batch_sharding(mesh)
    rows = local_rows(bsh, (1, tc.batch_size, model_cfg.block_size))
    streams = {s: data.stream(s) for s in SPLITS}
    limit = {"train": 0, "val": tc.val_tokens}  # evaluation reads at most --val_tokens of the val split
    samplers = {s: BatchSampler(streams[s], model_cfg.block_size, tc.batch_size, seed=tc.seed, split=s,
                                accum=tc.gradient_accumulation_steps, rows=rows, limit=limit[s],
                                order=tc.data_order if s == "train" else "random") for s in SPLITS}
    eval_samplers = {s: BatchSampler(streams[s], model_cfg.block_size, tc.batch_size, seed=tc.seed, rows=rows, split=s,
                                     limit=limit[s]) for s in SPLITS}
    # Sizes first, allocation after: the parameters and optimizer state (abstract, as laid out on the
    # mesh), then the compiled step (its arguments are that state) must fit, or nothing is allocated.
    abstract = abstract_train_state(model_cfg, tc, mesh)
    platform.check_state_fits(platform.bytes_per_device(abstract), "the train state (parameters and optimizer state)",
                              remedy=platform.advice(fsdp=tc.mesh_fsdp, step=False))
    # the run folder before the compile (minutes for a large model): writable, room for two
    # checkpoints, and on many hosts the same folder for all of them
    rundir.preflight(out_dir, platform.total_bytes(abstract))
    check_shared_folder(out_dir)
    x0, y0 = (_to_global(a, bsh, tc.batch_size) for a in samplers["train"].get(0))
    train_step, eval_graphdef, plat, memory = compile_train_step(model_cfg, tc, abstract, x0, y0, 0)
    if plat.site.backend == "cpu":  # what the CLI did to this process's allocator, recorded with the run
        plat = dataclasses.replace(plat, host_allocator=cli.host_allocator())
    _, _, state = init_state(model_cfg, tc, mesh, remat=plat.remat, attention=plat.attention)
    if init_params is not None and not tc.resume:  # fine-tuning: these weights, laid out like the fresh ones
        copy = lambda new, old: jax.device_put(np.asarray(new), old.sharding)  # noqa: E731  (the step donates it)
        state = TrainState(jax.tree.map(copy, init_params, state.params), state.opt_state)
    return _Run(model_cfg, tc, out_dir, data, data_meta, identity, tokenizer, mesh, bsh, samplers, eval_samplers,
                jax.process_index() == 0, train_step, eval_graphdef, plat, memory, state,
                Checkpointer(out_dir, tc.keep_checkpoints))


def _resume(run: _Run) -> None:
    """--resume: the latest checkpoint's state and step (metrics after it dropped); a new run: refuse
    a folder that holds checkpoints, and start a fresh metrics log."""
    metrics_path = run.out_dir / "metrics.jsonl"
    if run.tc.resume:
        if run.ckpt.latest_step() is None:
            raise UserError(f"--resume given but {run.out_dir} has no checkpoint; drop --resume to start a new run "
                            f"(--resume=auto does either)")
        run.state, run.start = restore_latest(run.ckpt, run.state)
        if run.main:
            rundir.truncate_metrics(metrics_path, run.start)
    elif run.ckpt.latest_step() is not None:
        raise UserError(f"{run.out_dir} already holds checkpoints; pass --resume to continue that run "
                        f"or choose a new --out_dir")
    elif run.main:
        metrics_path.unlink(missing_ok=True)


def _record_config(run: _Run) -> dict[str, Any]:
    """config.json (and a tokenizer.json tokenizer's copy): what the run's folder is, for generate,
    convert and a later --resume."""
    if run.main and isinstance(run.tokenizer, HFTokenizer):
        paths.write_bytes(run.out_dir / TOKENIZER_FILE, run.tokenizer.raw)
    config = {"model": run.model_cfg.to_dict(), "train": run.tc.to_dict(), "tokenizer": run.identity,
              "platform": run.plat.to_dict(), "memory": run.memory}
    if run.main:
        rundir.write_json(run.out_dir / "config.json", config)
    return config


class _Loop:
    """The step loop: steps, logs, evaluations with their checkpoints, and stops (a signal, a
    non-finite loss, --stop_loss). What changes as it runs lives here."""

    def __init__(self, run: _Run, sinks: list) -> None:
        tc = run.tc
        self.run, self.sinks = run, sinks
        self.eval_step = make_eval_step(run.eval_graphdef, dataclasses.replace(tc, dtype=cast(Any, run.plat.dtype)))
        val = run.samplers["val"].stream.head(tc.val_tokens)
        whole = len(val) == run.samplers["val"].stream.n_tokens
        self.score_val = split_scorer(val, run.data.split_bytes("val") if whole else None, run.eval_graphdef, run.model_cfg,
                                      DTYPES[run.plat.dtype], to_device=lambda a: whole_batch(a, run.bsh),
                                      devices=run.mesh.size, tokenizer=run.tokenizer)
        self.eval_s = 0.0  # time spent evaluating (time-to-loss runs exclude it)
        self.log = tracking.MetricsLog(tc.batch_size * tc.gradient_accumulation_steps * run.model_cfg.block_size,
                                       lr_schedule(tc))
        self.reached = -1  # the step whose evaluation ended the run
        self.bar = tqdm(total=tc.max_iters, initial=run.start, disable=not (tc.progress and run.main), unit="step",
                        dynamic_ncols=True)
        self.t_begin = time.perf_counter()
        self.last_loss = math.nan
        self.recent: collections.deque[float] = collections.deque(maxlen=20)  # for --eval_below
        self.probes = Probes(tc, run.eval_graphdef, run.tokenizer or ByteTokenizer(), jax.process_count())

    def run_steps(self) -> None:
        run = self.run
        try:
            with stop_signals(sigterm=jax.process_count() == 1) as (caught, asked):
                for step in range(run.start, run.tc.max_iters):
                    if self.step(step, caught, asked):
                        break
        except paths.StorageError as e:  # a metrics or config write refused for good: say what survives
            run.ckpt.abandon()
            raise UserError(f"{e}; {run.ckpt.intact()}") from None
        except BaseException:
            run.ckpt.abandon()
            raise
        finally:
            for sink in self.sinks:
                sink.close()
        self.bar.close()
        run.ckpt.wait()
        run.ckpt.close()

    def step(self, step: int, caught: list[int], asked: list[int]) -> bool:
        """One step, and whatever is due after it; True when the run is over (--stop_loss)."""
        run, tc = self.run, self.run.tc
        run.state, metrics = run.train_step(run.state, *run.batch(step), step)
        if step == run.start + 1 and run.tc.plot and run.main:
            rundir.import_plotting_in_background()
        self.log.step()
        done = step + 1
        if preempted(done):  # every host reaches this step together
            caught.append(asked[0] if asked else signal.SIGTERM)
        gated = 0 < tc.eval_below and not (len(self.recent) == self.recent.maxlen and np.mean(self.recent) <= tc.eval_below)
        is_eval = done % tc.eval_interval == 0 and not gated or done == tc.max_iters
        probe = self.probes.due(done)  # HellaSwag or a sample (--hellaswag_interval, --sample_interval)
        if done % tc.log_interval == 0 or is_eval or probe or step == run.start or caught:
            self.log.add(done, metrics)
        if self.log.pending and (self.log.due() or is_eval or probe or step == run.start or caught):
            self.write(done, is_eval, gated, probe)
        self.bar.update(1)
        if self.reached == done and done < tc.max_iters:  # --stop_loss reached
            return True
        if caught:
            self.stop(done, caught[0], is_eval)
        return False

    def write(self, done: int, is_eval: bool, gated: bool, probe: bool = False) -> None:
        """Fetch the logged steps' metrics (stopping on a non-finite loss), evaluate and save when
        due, and hand the records to the sinks, the bar and the plot."""
        run = self.run
        records = self.log.fetch()
        bad = next((r for r in records if not math.isfinite(r["train_loss"])), None)
        if bad is not None:
            run.ckpt.wait()
            last = run.ckpt.latest_step()
            raise UserError(f"loss became {bad['train_loss']} at step {bad['step']}; stopped. The last good "
                            f"checkpoint ({'step ' + str(last) if last is not None else 'none'}) is kept in "
                            f"{run.out_dir}; lower --learning_rate or raise --warmup_iters and --resume")
        self.last_loss = records[-1]["train_loss"]
        if gated:
            self.recent.extend(r["train_loss"] for r in records)
        if is_eval and records[-1]["step"] == done:
            self.evaluate_and_save(done, records[-1])
        if probe and records[-1]["step"] == done and (text := self.probes(done, run.state.params, records[-1])) and run.main:
            self.bar.write(f"step {done} sample: {text!r}")
        for sink in self.sinks:
            sink.write(records)
        r = records[-1]
        self.bar.set_postfix(loss=f"{r['train_loss']:.4f}", lr=f"{r['lr']:.2e}", tok_s=f"{r['tokens_per_sec']:.0f}",
                             **({"val": f"{r['val_loss']:.4f}"} if "val_loss" in r else {}))
        if is_eval and run.tc.plot and run.main:
            rundir.plot_metrics(run.out_dir / "metrics.jsonl", run.out_dir / "loss.png")

    def evaluate_and_save(self, done: int, record: dict[str, Any]) -> None:
        """Both splits' losses (or the whole val split with --eval_full) into `record`; at the last
        step or --stop_loss also the whole val split's loss and bits per byte; then a checkpoint."""
        run, tc = self.run, self.run.tc
        t_eval = time.perf_counter()
        losses = estimate_loss(self.eval_step, run.state.params, run.eval_samplers, tc.eval_iters, run.rows_to_global)
        whole = self.score_val(run.state.params) if tc.eval_full else None  # instead of eval_iters batches
        if whole is not None:
            losses["val"] = whole.loss
        self.eval_s += time.perf_counter() - t_eval
        record.update(val_loss=losses["val"], eval_train_loss=losses["train"])
        if tc.eval_full:
            record.update(time=time.time(), eval_s=self.eval_s)
        if done == tc.max_iters or 0 < tc.stop_loss and losses["val"] <= tc.stop_loss:
            final = whole or self.score_val(run.state.params)  # the whole val split, for the summary
            record.update(val_loss_full=final.loss, val_bpb=final.bits_per_byte)
            self.reached = done
        if not math.isfinite(losses["val"]):
            raise UserError(f"val loss became {losses['val']} at step {done}; not saved, last good checkpoint kept")
        self.save(done, losses["val"], losses["train"])

    def save(self, step: int, val_loss: float, train_loss: float) -> None:
        run = self.run
        run.ckpt.save(step, run.state.params, run.state.opt_state,
                      {"step": step, "val_loss": val_loss, "train_loss": train_loss,
                       "sampler": run.samplers["train"].state(step), "model": run.model_cfg.to_dict(),
                       "train": run.tc.to_dict(), "platform": run.plat.to_dict()})

    def stop(self, done: int, signum: int, is_eval: bool) -> None:
        """After a signal: save the finished step (unranked: not evaluated) unless it was just saved,
        then raise Interrupted with how to continue."""
        run = self.run
        if not is_eval:
            self.save(done, math.inf, self.last_loss)
        run.ckpt.wait()
        run.ckpt.close()
        self.bar.close()
        raise Interrupted(signum, f"{signal.Signals(signum).name} at step {done}; checkpoint saved in "
                          f"{run.ckpt.directory / str(done)}; continue with --resume --out_dir={run.out_dir}")


def _finish(run: _Run, loop: _Loop) -> dict:
    """The run's summary: steps, wall clock (its evaluations included, and their share), the last and
    best val losses, and the whole val split's loss and bits per byte."""
    last_step = loop.reached if loop.reached > 0 else run.tc.max_iters
    summary: dict[str, Any] = {"start_step": run.start, "out_dir": str(run.out_dir), "compile_s": run.memory["compile_s"],
                               "steps": last_step - run.start, "wall_s": time.perf_counter() - loop.t_begin,
                               "final_step": last_step, "platform": run.plat.to_dict(), "eval_s": loop.eval_s}
    logged = rundir.read_metrics(run.out_dir / "metrics.jsonl")
    evals = [r for r in logged if "val_loss" in r]
    if evals:
        summary.update(val_loss=evals[-1]["val_loss"], best_val_loss=min(r["val_loss"] for r in evals))
    if logged and "val_loss_full" in logged[-1]:
        summary.update(val_loss_full=logged[-1]["val_loss_full"], val_bpb=logged[-1]["val_bpb"])
    return summary
