"""The serving engine: continuous batching over a fixed set of KV-cache slots (no HTTP in here;
jaxgpt/serve/server.py is the HTTP layer, JetStream's split of prefill, generate and orchestration).

One compiled program decodes `chunk` tokens for all `slots` at once; a background thread runs it
again and again. Between chunks, waiting requests are prefilled into free slots (prompt-length
buckets, as generate.py), and finished or cancelled ones free their slot. Every slot samples with its
own temperature / top-k / top-p and its own key, token j of a request drawing from
fold_in(key(seed), j) exactly as generate.py does, so a request's tokens depend only on its prompt,
parameters and seed — never on what else is in the batch. Past block_size the model sees exactly
the last block_size tokens (nanoGPT's crop): a slot that far recomputes its window, as generate.py.
"""
from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.paths import describe
from jaxgpt.sample import Program, check_sampling, pick_rows, prompt_bucket, state_dtype
from jaxgpt.sharding import abstract


class QueueFull(Exception):
    """More requests are waiting than the engine accepts: answer 429."""


class EngineDown(Exception):
    """The decode thread failed; no request can be served (answer 503)."""


@dataclass
class Job:
    """One sequence to continue. `emit(tokens, finish)` is called from the engine's thread with each
    chunk's new tokens, and once more with finish = 'length' or 'cancelled'."""

    prompt: np.ndarray
    max_tokens: int
    emit: Callable[[list[int], str | None], None]
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    seed: int = 0
    cancelled: bool = False
    produced: int = 0
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled = True  # the engine frees the slot before its next chunk


Carry = tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array]]  # (windows, lengths, next j, cache)


@partial(jax.jit, static_argnames=("graphdef", "bucket"), donate_argnames=("carry",))
def prefill_program(graphdef: nnx.GraphDef, state: nnx.State, carry: Carry, slot: jax.Array, window: jax.Array,
           length: jax.Array, bucket: int) -> Carry:
    """Prefill slot `slot`: its context window, length, token counter 0, and the KV cache of its first
    `bucket` positions (padding past the prompt is overwritten before any query sees it)."""
    model = nnx.merge(graphdef, state)
    ctx, n, j, (kc, vc) = carry
    if bucket:
        small = model.init_cache(1, kc.dtype)
        _, (k1, v1) = model.decode(window[None, :bucket], small, 0)
        kc = jax.lax.dynamic_update_slice_in_dim(kc, k1, slot, axis=1)
        vc = jax.lax.dynamic_update_slice_in_dim(vc, v1, slot, axis=1)
    ctx = jax.lax.dynamic_update_slice_in_dim(ctx, window[None], slot, axis=0)
    return ctx, n.at[slot].set(length), j.at[slot].set(0), (kc, vc)


@partial(jax.jit, static_argnames=("graphdef", "steps"), donate_argnames=("carry",))
def decode_program(graphdef: nnx.GraphDef, state: nnx.State, carry: Carry, rows: jax.Array, keys: jax.Array,
            temperature: jax.Array, top_k: jax.Array, top_p: jax.Array, active: jax.Array,
            steps: int) -> tuple[Carry, jax.Array]:
    """`steps` more tokens for the slots `rows` (w,) -> (carry, tokens (steps, w)). Those slots are
    gathered into a batch of w, decoded, and written back: a batch only as wide as the requests in
    flight (rounded up to a power of two, one compiled program per width), the other arguments (w,)."""
    ctx_all, n_all, j_all, (kc_all, vc_all) = carry
    compact = (ctx_all[rows], n_all[rows], j_all[rows], (kc_all[:, rows], vc_all[:, rows]))
    compact, tokens = _steps(graphdef, state, compact, keys, temperature, top_k, top_p, active, steps)
    ctx, n, j, (kc, vc) = compact
    return (ctx_all.at[rows].set(ctx), n_all.at[rows].set(n), j_all.at[rows].set(j),
            (kc_all.at[:, rows].set(kc), vc_all.at[:, rows].set(vc))), tokens


def _steps(graphdef: nnx.GraphDef, state: nnx.State, carry: Carry, keys: jax.Array, temperature: jax.Array,
           top_k: jax.Array, top_p: jax.Array, active: jax.Array, steps: int) -> tuple[Carry, jax.Array]:
    model = nnx.merge(graphdef, state)
    bs = model.config.block_size

    def one(token: jax.Array, k: jax.Array, v: jax.Array, pos: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        logits, (k, v) = model.decode(token[None, None], (k[:, None], v[:, None]), pos)
        return logits[0, 0], k[:, 0], v[:, 0]

    def step(carry: Carry, _: Any) -> tuple[Carry, jax.Array]:
        ctx, n, j, (kc, vc) = carry
        rows = jnp.arange(ctx.shape[0])
        newest = ctx[rows, jnp.minimum(n, bs) - 1]
        at = jnp.clip(n - 1, 0, bs - 1)
        if model.config.pos_embedding == "learned":  # one batched step, each row at its own position
            logits, (kc, vc) = model.decode(newest[:, None], (kc, vc), at)
            cached = logits[:, 0]
        else:  # RoPE's rolling cache: the one-position step, vmapped over the rows
            cached, kc, vc = jax.vmap(one, in_axes=(0, 1, 1, 0), out_axes=(0, 1, 1))(newest, kc, vc, at)
        past = active & (n > bs)  # crop: the window of the last block_size tokens, run again
        windowed = jax.lax.cond(past.any(), lambda: model.last_logits(ctx).astype(cached.dtype),
                                lambda: jnp.zeros_like(cached))
        logits = jnp.where(past[:, None], windowed, cached)
        u = jax.vmap(lambda key, jj: jax.random.uniform(jax.random.fold_in(jax.random.wrap_key_data(key), jj), (1,))[0])(
            keys, j)
        tok = pick_rows(logits, u, temperature, top_k, top_p)
        grown = ctx.at[rows, jnp.minimum(n, bs - 1)].set(tok)
        shifted = jnp.concatenate([ctx[:, 1:], tok[:, None]], axis=1)
        ctx = jnp.where(active[:, None], jnp.where((n < bs)[:, None], grown, shifted), ctx)
        return (ctx, jnp.where(active, n + 1, n), jnp.where(active, j + 1, j), (kc, vc)), tok

    return jax.lax.scan(step, carry, None, length=steps)


def new_carry(model: GPT, slots: int, dtype: Any) -> Carry:
    """The state of `slots` empty slots: windows, lengths (1), token counters and the KV cache in `dtype`."""
    cfg = model.config
    return (jnp.zeros((slots, cfg.block_size), jnp.int32), jnp.ones((slots,), jnp.int32),
            jnp.zeros((slots,), jnp.int32), model.init_cache(slots, dtype))


def decode_width(busy: int, slots: int) -> int:
    """The batch the decode step runs for `busy` requests: the next power of two, at most `slots`."""
    return min(slots, 1 << (busy - 1).bit_length())


def programs(graphdef: nnx.GraphDef, state: Any, carry: Any, chunk: int) -> dict[str, Program]:
    """Every program the engine runs, over abstract inputs laid out like `state` and `carry` (arrays or
    ShapeDtypeStructs): 'decode_W' for each width W = decode_width(1 .. slots), and 'prefill_B' for each
    prompt bucket B (0: a prompt longer than the context, its window only). The engine compiles and runs
    these; jaxgpt.plan.aot compiles them for a target."""
    ctx, n = carry[0], carry[1]
    slots, block = ctx.shape
    like = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=getattr(n, "sharding", None))  # noqa: E731
    state, carry = abstract(state), abstract(carry)
    out = {}
    for w in sorted({decode_width(b, slots) for b in range(1, slots + 1)}):
        out[f"decode_{w}"] = Program(decode_program, (graphdef, state, carry, like((w,), jnp.int32), like((w, 2), jnp.uint32),
                                                      like((w,), jnp.float32), like((w,), jnp.int32), like((w,), jnp.float32),
                                                      like((w,), jnp.bool_)), dict(steps=chunk))
    for bucket in sorted({prompt_bucket(n, block) for n in range(block + 2)}):
        out[f"prefill_{bucket}"] = Program(prefill_program, (graphdef, state, carry, like((), jnp.int32),
                                                             like((block,), jnp.int32), like((), jnp.int32)), dict(bucket=bucket))
    return out


class Engine:
    """Continuous batching for one model. submit() from any thread; the work happens on the engine's."""

    def __init__(self, model: GPT, slots: int = 16, chunk: int = 8, max_queue: int = 64):
        if slots < 1 or chunk < 1:
            raise UserError(f"--slots and the chunk must be >= 1, got {slots} and {chunk}")
        model.eval()
        self.slots, self.chunk, self.max_queue = slots, chunk, max_queue
        self.graphdef, self.state = nnx.split(model)
        self.vocab, self.block = model.config.vocab_size, model.config.block_size
        self.carry: Carry = new_carry(model, slots, state_dtype(self.state))
        self.programs = programs(self.graphdef, self.state, self.carry, chunk)
        self.compiled: dict[str, Any] = {}  # name -> executable, compiled on first use or by warm_up
        self.keys = np.zeros((slots, 2), np.uint32)
        self.temperature = np.ones(slots, np.float32)
        self.top_k = np.full(slots, self.vocab, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.jobs: dict[int, Job] = {}  # slot -> job
        self.waiting: collections.deque[Job] = collections.deque()
        self.cv = threading.Condition()
        self.running = True
        self.error: str | None = None  # why the decode thread stopped, if it failed
        self.thread = threading.Thread(target=self._loop, name="jaxgpt-engine", daemon=True)
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's sequences or none (QueueFull): a refused request leaves nothing
        behind. The queue holds up to max_queue sequences beyond the free slots; cancelled ones that
        still wait are dropped first, so they never count against a new request."""
        for job in jobs:
            check_sampling(job.temperature, job.top_k, job.top_p, self.vocab)
            if job.max_tokens < 1 or len(job.prompt) < 1:
                raise UserError("a request needs at least one prompt token and max_tokens >= 1")
        if len(jobs) > self.slots + self.max_queue:
            raise UserError(f"the request asks for {len(jobs)} sequences; this server holds at most "
                            f"{self.slots + self.max_queue} at once ({self.slots} slots + a queue of {self.max_queue})")
        with self.cv:
            if self.error is not None:
                raise EngineDown(self.error)
            for job in [j for j in self.waiting if j.cancelled]:
                self.waiting.remove(job)
                job.emit([], "cancelled")
            room = self.max_queue + self.slots - len(self.jobs) - len(self.waiting)
            if len(jobs) > room:
                raise QueueFull(f"{len(self.waiting)} sequences are waiting for a slot and {len(self.jobs)} of "
                                f"{self.slots} slots are busy; {len(jobs)} more do not fit the queue of {self.max_queue}")
            self.waiting.extend(jobs)
            self.cv.notify()

    def stats(self) -> dict[str, Any]:
        with self.cv:
            return {"status": "ok" if self.error is None else f"error: {self.error}", "slots": self.slots,
                    "slots_in_use": len(self.jobs), "queue": len(self.waiting)}

    def warm_up(self) -> None:
        """Compile every program (programs(): the decode step at each width and the prefill of each
        prompt bucket) before the first request; with the persistent compilation cache, once per machine."""
        for name in self.programs:
            self._program(name)

    def _program(self, name: str) -> Any:
        if name not in self.compiled:
            self.compiled[name] = self.programs[name].compile()
        return self.compiled[name]

    def prefill(self, slot: int, window: np.ndarray, length: int, bucket: int) -> None:
        """Slot `slot` starts a sequence: its window, its length and the KV cache of its first `bucket` positions."""
        self.carry = self._program(f"prefill_{bucket}")(self.state, self.carry, jnp.int32(slot), jnp.asarray(window),
                                                         jnp.int32(length))

    def decode(self, rows: np.ndarray, active: np.ndarray) -> jax.Array:
        """`chunk` tokens for the slots `rows` (decode_width of them; `active` marks the requests) -> (chunk, width)."""
        self.carry, tokens = self._program(f"decode_{len(rows)}")(
            self.state, self.carry, jnp.asarray(rows, jnp.int32), jnp.asarray(self.keys[rows]),
            jnp.asarray(self.temperature[rows]), jnp.asarray(self.top_k[rows]), jnp.asarray(self.top_p[rows]),
            jnp.asarray(active, bool))
        return tokens

    def close(self, grace_s: float = 0.0) -> None:
        """Stop: wait up to grace_s for the running requests, then cancel what is left."""
        end = time.perf_counter() + grace_s
        while time.perf_counter() < end and (self.jobs or self.waiting):
            time.sleep(0.01)
        with self.cv:
            for job in [*self.jobs.values(), *self.waiting]:
                job.cancel()
            self.running = False
            self.cv.notify()
        self.thread.join(timeout=30)

    # --- the engine's thread ---
    def _admit(self, job: Job, slot: int) -> None:
        """The prefill of a job already reserved in self.jobs[slot] (under the lock, by _serve)."""
        P = len(job.prompt)
        window = np.zeros(self.block, np.int32)
        window[:min(P, self.block)] = job.prompt[-self.block:]
        bucket = prompt_bucket(P - 1, self.block) if P <= self.block else 0
        self.prefill(slot, window, P, bucket)
        self.keys[slot] = np.asarray(jax.random.key_data(jax.random.key(job.seed)))
        self.temperature[slot] = job.temperature
        self.top_k[slot] = self.vocab if job.top_k is None else job.top_k
        self.top_p[slot] = job.top_p

    def _loop(self) -> None:
        try:
            self._serve()
        except Exception as e:  # a bug or the device failing: every request learns it, none hangs
            with self.cv:
                self.error = describe(e, 200)
                for job in [*self.jobs.values(), *self.waiting]:
                    job.emit([], "error")
                self.jobs.clear()
                self.waiting.clear()

    def _serve(self) -> None:
        while True:
            with self.cv:
                for slot, job in list(self.jobs.items()):
                    if job.cancelled:
                        del self.jobs[slot]
                        job.emit([], "cancelled")
                while not self.running or (not self.jobs and not self.waiting):
                    if not self.running:
                        for job in self.waiting:
                            job.emit([], "cancelled")
                        self.waiting.clear()
                        return
                    self.cv.wait()
                admit = []
                free = [s for s in range(self.slots) if s not in self.jobs]
                while free and self.waiting:
                    job = self.waiting.popleft()
                    if job.cancelled:
                        job.emit([], "cancelled")
                        continue
                    slot = free.pop(0)
                    self.jobs[slot] = job  # reserved under the lock: submit() and close() see it during its prefill
                    admit.append((job, slot))
            for job, slot in admit:
                self._admit(job, slot)
            if not self.jobs:
                continue
            busy = sorted(self.jobs)
            width = decode_width(len(busy), self.slots)
            rows = np.array(busy + [s for s in range(self.slots) if s not in self.jobs][:width - len(busy)], np.int32)
            tokens = np.asarray(self.decode(rows, np.arange(width) < len(busy)))
            column = {slot: i for i, slot in enumerate(busy)}
            with self.cv:
                for slot, job in list(self.jobs.items()):
                    if job.cancelled or slot not in column:
                        continue
                    new = tokens[:job.max_tokens - job.produced, column[slot]].tolist()
                    job.produced += len(new)
                    done = job.produced >= job.max_tokens
                    job.emit(new, "length" if done else None)
                    if done:
                        del self.jobs[slot]
