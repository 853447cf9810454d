"""The server under load: `python scripts/bench.py --preset=cpu --sections=serve`.

A `scripts/serve.py` process (the preset's model, random weights: speed does not depend on them) on a
loopback port, driven by streaming HTTP clients (httpx): one client alone; 16 clients at once (the
aggregate tokens/s, and the time to first token under that load); time to first token for a short
prompt with the server otherwise idle; and the server's resident memory over 1,000 requests.
Each figure is min / median / max over `rounds`. Before the server starts, the engine's compiled decode
step is timed in this process at every width it runs (1, 2, 4, 8, 16 slots), inside block_size and past
it: the ceiling any HTTP layer can reach is set there.
"""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.harness import ROOT, Figure, figure


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def _one(client: Any, url: str, prompt: str, max_tokens: int, seed: int) -> dict[str, float]:
    """One streamed completion: its tokens, time to first text and total time."""
    start = time.perf_counter()
    first, tokens = None, 0
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "stream": True, "seed": seed,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif first is None and any(c.get("text") for c in event.get("choices", [])):
                first = time.perf_counter()
    end = time.perf_counter()
    return {"tokens": tokens, "ttft": (first or end) - start, "total": end - start}


async def _clients(url: str, clients: int, requests_each: int, max_tokens: int, prompt: str = "KING RICHARD III:") -> dict:
    import httpx

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients + 4)) as client:
        async def worker(i: int) -> list[dict]:
            return [await _one(client, url, prompt, max_tokens, seed=1000 * i + k) for k in range(requests_each)]
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(worker(i) for i in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    return {"tokens_per_s": sum(r["tokens"] for r in results) / wall, "ttft": [r["ttft"] for r in results],
            "per_request_tokens_per_s": [r["tokens"] / r["total"] for r in results]}


def decode_widths(cfg: Any, slots: int = 16, chunk: int = 8, calls: int = 4, repeats: int = 6,
                  log: Callable[[str], None] = print) -> list[Figure]:
    """ms per decode step of the engine's program at each width, every slot sampling at temperature 0.8
    (as the clients below): `calls` chunks from a context of 1 token (inside) or block_size + 1 (past)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxgpt.model import GPT
    from jaxgpt.serve import engine as E

    eng = E.Engine(GPT(cfg, rngs=nnx.Rngs(0)), slots=slots, chunk=chunk)
    eng.temperature[:] = 0.8  # every slot samples (top-k and top-p off)
    figures, width = [], 1
    try:
        while width <= slots:
            rows = np.arange(width, dtype=np.int32)
            for where, start in (("inside block_size", 1), ("past block_size", cfg.block_size + 1)):
                times = []
                for _ in range(repeats + 1):  # the first compiles
                    ctx, n, j, cache = eng.carry
                    eng.carry = (ctx, jnp.full_like(n, start), j, cache)
                    t = time.perf_counter()
                    for _ in range(calls):
                        tokens = eng.decode(rows, np.ones(width, bool))
                    jax.block_until_ready(tokens)
                    times.append((time.perf_counter() - t) / (calls * chunk) * 1000)
                figures.append(figure("serve", f"decode step, width {width}, {where}", times[1:], "ms",
                                      f"{calls * chunk} tokens per slot, {repeats} repeats"))
                log(f"  decode width {width:2d} {where}: {statistics.median(times[1:]):.3f} ms/step")
            width *= 2
    finally:
        eng.close()
    return figures


def serve_figures(cfg: Any, rounds: int = 3, slots: int = 16, max_tokens: int = 256, memory_requests: int = 1000,
                  log: Callable[[str], None] = print) -> list[Figure]:
    """scripts/serve.py on a random model of `cfg`, under 1 and 16 streaming clients: tokens/s, time to first
    token, and resident memory over `memory_requests` requests."""
    # Requests of max_tokens run past block_size, where every token recomputes its window (nanoGPT's
    # crop); `short` ones stay inside the context, where every token is one cached step.
    short = max(4, cfg.block_size - 24)
    work = Path(tempfile.mkdtemp(prefix="jaxgpt-serve-"))
    proc, url, log_file = _start_server(cfg, work, slots, max_tokens)
    try:
        rows = _load_rounds(url, rounds, max_tokens, short, log)
        rss, done = _memory_over_requests(url, proc.pid, memory_requests, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()
        shutil.rmtree(work, ignore_errors=True)
    single, many, short_single, short_many, idle, loaded = (rows[k] for k in ("single", "many", "short_single",
                                                                               "short_many", "idle", "loaded"))
    note = f"{slots} slots, {max_tokens} tokens per request, temperature 0.8, {rounds} rounds"
    return [figure("serve", "1 streaming client: tokens/s", single, "tok/s", note),
            figure("serve", "16 streaming clients: aggregate tokens/s", many, "tok/s", note),
            figure("serve", "16 clients / 1 client throughput", [m / s for m, s in zip(many, single, strict=True)], "x",
                   "per round"),
            figure("serve", f"{short}-token requests (inside block_size): 1 client tokens/s", short_single, "tok/s"),
            figure("serve", f"{short}-token requests: 16 clients aggregate tokens/s", short_many, "tok/s"),
            figure("serve", f"{short}-token requests: 16 clients / 1 client",
                   [m / s for m, s in zip(short_many, short_single, strict=True)], "x", "per round"),
            figure("serve", "time to first token, idle, short prompt (p50)", idle, "ms", "'ROMEO:', 20 requests per round"),
            figure("serve", "time to first token under 16-client load (p50)", loaded, "ms"),
            figure("serve", f"resident memory after {done} requests", [rss[-1]], "MiB",
                   f"from {rss[0]:.0f} MiB after the load rounds; largest {max(rss):.0f} MiB"),
            figure("serve", f"resident memory growth over {done} requests", [rss[-1] - rss[1]], "MiB",
                   "last sample minus the sample after the first 100 requests")]


def _start_server(cfg: Any, work: Path, slots: int, max_tokens: int) -> tuple[subprocess.Popen, str, Any]:
    """serve.py on a random model saved in `work`, once /health answers: (process, URL, its log file)."""
    import httpx
    from flax import nnx

    from formats.io import save_safetensors
    from jaxgpt.model import GPT

    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    save_safetensors(GPT(cfg, rngs=nnx.Rngs(0)), work / "model.safetensors", {})
    env = {**os.environ, "XDG_CACHE_HOME": str(work / "cache")}
    log_file = open(work / "server.log", "w")  # a file, not a pipe: the server logs a line per request
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), f"--checkpoint={work / 'model.safetensors'}",
                             f"--port={port}", f"--slots={slots}", f"--max_tokens={max_tokens}"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=log_file, text=True)
    deadline = time.time() + 600
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url, log_file
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            log_file.close()
            raise RuntimeError(f"the server did not start: {(work / 'server.log').read_text()[-2000:]}")
        time.sleep(0.2)


def _load_rounds(url: str, rounds: int, max_tokens: int, short: int, log: Callable[[str], None]) -> dict[str, list]:
    """Per round: tokens/s of 1 and 16 clients at max_tokens and at `short` tokens, first-token latency idle
    and under load."""
    rows: dict[str, list] = {k: [] for k in ("single", "many", "short_single", "short_many", "idle", "loaded")}
    for r in range(rounds):
        rows["single"].append(asyncio.run(_clients(url, 1, 3, max_tokens))["tokens_per_s"])
        sixteen = asyncio.run(_clients(url, 16, 2, max_tokens))
        rows["many"].append(sixteen["tokens_per_s"])
        rows["short_single"].append(asyncio.run(_clients(url, 1, 6, short))["tokens_per_s"])
        rows["short_many"].append(asyncio.run(_clients(url, 16, 4, short))["tokens_per_s"])
        rows["idle"].append(statistics.median(asyncio.run(_clients(url, 1, 20, 4, prompt="ROMEO:"))["ttft"]) * 1000)
        rows["loaded"].append(statistics.median(sixteen["ttft"]) * 1000)
        log(f"  round {r + 1}/{rounds}: {max_tokens} tokens: 1 client {rows['single'][-1]:.0f} tok/s, 16 clients "
            f"{rows['many'][-1]:.0f} tok/s; {short} tokens: 1 client {rows['short_single'][-1]:.0f}, 16 clients "
            f"{rows['short_many'][-1]:.0f} tok/s; idle first token {rows['idle'][-1]:.1f} ms, under load "
            f"{rows['loaded'][-1]:.1f} ms")
    return rows


def _memory_over_requests(url: str, pid: int, requests: int, log: Callable[[str], None]) -> tuple[list[float], int]:
    """The server's resident memory sampled every ~100 requests of 16 clients; (samples, requests made)."""
    rss, done = [_rss_mib(pid)], 0
    while done < requests:
        batch = min(100, requests - done)
        asyncio.run(_clients(url, 16, max(1, batch // 16), 16))
        done += 16 * max(1, batch // 16)
        rss.append(_rss_mib(pid))
    log(f"  memory over {done} requests: {rss[0]:.0f} -> {rss[-1]:.0f} MiB (samples {[round(x) for x in rss]})")
    return rss, done
