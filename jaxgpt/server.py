"""The HTTP layer of `scripts/serve.py`: the OpenAI completions API over jaxgpt.engine, on Starlette.

It only parses and validates requests, turns tokens into text and streams it, and maps errors to
OpenAI-style JSON error objects (400 bad request, 401 wrong key, 404, 413 body too large, 429 queue
full, 504 timeout). Text is sent as it is produced, but a byte-level model's partial UTF-8
characters and a possible beginning of a stop string are held back until resolved, so a client
never receives broken or retracted text. Chat completions use a plain template (CHAT_TEMPLATE).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from jaxgpt.engine import Engine, EngineDown, Job, QueueFull
from jaxgpt.errors import UserError

log = logging.getLogger("jaxgpt.serve")
CHAT_TEMPLATE = "{role}: {content}\n"  # each message, then "assistant:" for the model to continue
SUPPORTED = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stream", "stop", "seed", "user",
             "stream_options", "messages", "max_completion_tokens"}
IGNORED_DEFAULTS = {"echo": False, "logprobs": None, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0,
                    "suffix": None, "logit_bias": None}


@dataclass(frozen=True)
class Limits:
    max_prompt_tokens: int = 8192
    max_tokens: int = 4096  # cap on a request's max_tokens
    max_n: int = 16
    timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.param = status, kind, param

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": str(self), "type": self.kind, "param": self.param, "code": None}},
                            status_code=self.status)


class StopFilter:
    """Text in, text out: holds back the end of the text while it could still begin a stop string,
    and reports a stop string once it appears (the text before it is emitted, the rest dropped)."""

    def __init__(self, stops: list[str]):
        self.stops, self.pending, self.stopped = stops, "", False

    def push(self, text: str) -> str:
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - keep], self.pending[len(self.pending) - keep:]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class Choice:
    """One sequence being generated: its job in the engine, and the text pipeline after it."""

    def __init__(self, index: int, prompt: np.ndarray, params: dict[str, Any], tokenizer: Any, stops: list[str],
                 loop: asyncio.AbstractEventLoop):
        self.index = index
        self.queue: asyncio.Queue[tuple[list[int], str | None]] = asyncio.Queue()
        self.decoder, self.stop = tokenizer.stream_decoder(), StopFilter(stops)
        self.finish: str | None = None
        self.tokens = 0
        def emit(tokens: list[int], finish: str | None) -> None:
            loop.call_soon_threadsafe(self.queue.put_nowait, (tokens, finish))
        self.job = Job(prompt, params["max_tokens"], emit, params["temperature"], params["top_k"], params["top_p"],
                       params["seed"] + index % params["n"])

    async def deltas(self) -> AsyncIterator[str]:
        """Text as it becomes final, then sets self.finish ('stop' or 'length')."""
        while self.finish is None:
            tokens, finish = await self.queue.get()
            self.tokens += len(tokens)
            text = self.stop.push(self.decoder.feed(tokens))
            if finish is not None and not self.stop.stopped:  # the last tokens: what the decoder and filter still hold
                text += self.stop.push(self.decoder.flush())
                text += "" if self.stop.stopped else self.stop.flush()
            if self.stop.stopped:
                self.job.cancel()
                self.finish = "stop"
            elif finish is not None:
                self.finish = "length" if finish != "error" else "error"
            if text:
                yield text


def _int(body: dict, name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be an integer in [{low}, {high}], got {value!r}", param=name)
    return value


def _float(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise ApiError(400, f"{name} must be a number in [{low}, {high}], got {value!r}", param=name)
    return float(value)


class Server:
    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None, limits: Limits):
        self.engine, self.tokenizer, self.model_name, self.api_key, self.limits = engine, tokenizer, model_name, api_key, limits
        self.created = int(time.time())

    # --- request parsing ---
    def params(self, body: dict) -> dict[str, Any]:
        for name, default in IGNORED_DEFAULTS.items():
            if body.get(name, default) not in (default, None):
                raise ApiError(400, f"{name} is not supported by this server (leave it at {default!r})", param=name)
        unknown = sorted(set(body) - SUPPORTED - set(IGNORED_DEFAULTS))
        if unknown:
            raise ApiError(400, f"unsupported parameter(s) {unknown}", param=unknown[0])
        stop = body.get("stop") or []
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
            raise ApiError(400, "stop must be a non-empty string or a list of up to 4 of them", param="stop")
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31):
            raise ApiError(400, f"seed must be an integer in [0, 2^31), got {seed!r}", param="seed")
        top_k = body.get("top_k")
        if top_k is not None and (not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k):
            raise ApiError(400, f"top_k must be an integer >= 1, got {top_k!r}", param="top_k")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        return {"max_tokens": _int({"max_tokens": max_tokens}, "max_tokens", 16, 1, self.limits.max_tokens),
                "temperature": _float(body, "temperature", 1.0, 0.0, 2.0),
                "top_p": _float(body, "top_p", 1.0, 1e-9, 1.0) if body.get("top_p", 1.0) is not None else 1.0,
                "top_k": min(top_k, self.engine.vocab) if top_k else None,
                "n": _int(body, "n", 1, 1, self.limits.max_n),
                "seed": seed if seed is not None else secrets.randbelow(2**31 - 1024),
                "stream": bool(body.get("stream", False)), "stops": stops,
                "include_usage": bool((body.get("stream_options") or {}).get("include_usage", False))}

    def prompts(self, prompt: Any) -> list[np.ndarray]:
        """A string, a list of strings, a list of token ids, or a list of such lists."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            prompt = [prompt]
        if not isinstance(prompt, list) or not prompt or len(prompt) > self.limits.max_n:
            raise ApiError(400, f"prompt must be a string or a list of 1 to {self.limits.max_n} prompts", param="prompt")
        out = []
        for p in prompt:
            if isinstance(p, str):
                ids = np.asarray(self.tokenizer.encode(p or "\n"), np.int32)
            elif isinstance(p, list) and p and all(isinstance(t, int) and 0 <= t < self.engine.vocab for t in p):
                ids = np.asarray(p, np.int32)
            else:
                raise ApiError(400, f"each prompt must be a string or a list of token ids in [0, {self.engine.vocab})",
                               param="prompt")
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(400, f"a prompt of {len(ids)} tokens exceeds the limit of {self.limits.max_prompt_tokens}",
                               param="prompt")
            out.append(ids)
        return out

    # --- endpoints ---
    async def health(self, request: Request) -> Response:
        stats = self.engine.stats()
        return JSONResponse({"model": self.model_name, **stats}, status_code=200 if stats["status"] == "ok" else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                         "owned_by": "jaxgpt"}]})

    async def completions(self, request: Request) -> Response:
        body = await self.body(request)
        return await self.generate(request, body, self.prompts(body.get("prompt", "")), chat=False)

    async def chat(self, request: Request) -> Response:
        body = await self.body(request)
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str) for m in messages):
            raise ApiError(400, "messages must be a list of {role, content} objects with string content", param="messages")
        text = "".join(CHAT_TEMPLATE.format(role=m["role"], content=m["content"]) for m in messages) + "assistant:"
        return await self.generate(request, body, self.prompts(text), chat=True)

    async def body(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise ApiError(413, f"the request body is {size} bytes; the limit is {self.limits.max_body_bytes}")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > self.limits.max_body_bytes:
                raise ApiError(413, f"the request body exceeds {self.limits.max_body_bytes} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON ({str(e).splitlines()[0][:100]})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def generate(self, request: Request, body: dict, prompts: list[np.ndarray], chat: bool) -> Response:
        p = self.params(body)
        loop = asyncio.get_running_loop()
        choices = [Choice(i * p["n"] + c, prompt, p, self.tokenizer, p["stops"], loop)
                   for i, prompt in enumerate(prompts) for c in range(p["n"])]
        try:
            for choice in choices:
                self.engine.submit(choice.job)
        except QueueFull as e:
            for choice in choices:
                choice.job.cancel()
            raise ApiError(429, f"the server is busy: {e}; retry later", kind="rate_limit_exceeded") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        except EngineDown as e:
            raise ApiError(503, f"the engine stopped ({e}); restart the server", kind="server_error") from None
        meta: dict[str, Any] = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}", "created": int(time.time()),
                "model": self.model_name, "start": time.perf_counter(), "prompt_tokens": sum(len(x) for x in prompts),
                "first": None}
        if p["stream"]:
            return StreamingResponse(self.stream(choices, meta, p, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        texts = {c.index: "" for c in choices}

        async def collect(choice: Choice) -> None:
            async for text in choice.deltas():
                meta["first"] = meta["first"] or time.perf_counter()
                texts[choice.index] += text
        gather = asyncio.gather(*(collect(c) for c in choices))
        try:
            while not gather.done():
                done, _ = await asyncio.wait({gather}, timeout=0.1)
                if not done and await request.is_disconnected():
                    raise asyncio.CancelledError
                if time.perf_counter() - meta["start"] > self.limits.timeout_s:
                    raise ApiError(504, f"the request took longer than {self.limits.timeout_s:.0f} s", kind="timeout")
        finally:
            if not gather.done():
                gather.cancel()
            for choice in choices:
                choice.job.cancel()
        self.log_request(meta, choices, 200)
        usage = self.usage(meta, choices)
        if chat:
            items = [{"index": c.index, "message": {"role": "assistant", "content": texts[c.index]}, "logprobs": None,
                      "finish_reason": c.finish} for c in choices]
            return JSONResponse({"id": meta["id"], "object": "chat.completion", "created": meta["created"],
                                 "model": self.model_name, "choices": items, "usage": usage})
        items = [{"text": texts[c.index], "index": c.index, "logprobs": None, "finish_reason": c.finish} for c in choices]
        return JSONResponse({"id": meta["id"], "object": "text_completion", "created": meta["created"],
                             "model": self.model_name, "choices": items, "usage": usage})

    async def stream(self, choices: list[Choice], meta: dict, p: dict, chat: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"

        def event(index: int, text: str | None, finish: str | None) -> str:
            if chat:
                delta = {"content": text} if text is not None else {}
                choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": meta["id"], "object": kind, "created": meta["created"],
                                          "model": self.model_name, "choices": [choice]}) + "\n\n"

        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for text in choice.deltas():
                await merged.put((choice.index, text, None))
            await merged.put((choice.index, None, choice.finish))
        tasks = [asyncio.ensure_future(pump(c)) for c in choices]
        finished, status = 0, 200
        try:
            if chat:
                for c in choices:
                    yield "data: " + json.dumps({"id": meta["id"], "object": kind, "created": meta["created"],
                                                 "model": self.model_name, "choices": [{"index": c.index, "delta": {
                                                     "role": "assistant", "content": ""}, "logprobs": None,
                                                     "finish_reason": None}]}) + "\n\n"
            while finished < len(choices):
                left = self.limits.timeout_s - (time.perf_counter() - meta["start"])
                try:
                    index, text, finish = await asyncio.wait_for(merged.get(), timeout=max(left, 0.001))
                except asyncio.TimeoutError:
                    status = 504
                    yield "data: " + json.dumps({"error": {"message": f"the request took longer than "
                                                           f"{self.limits.timeout_s:.0f} s", "type": "timeout",
                                                           "param": None, "code": None}}) + "\n\n"
                    break
                if finish is not None:
                    finished += 1
                    yield event(index, None if chat else "", finish)
                else:
                    meta["first"] = meta["first"] or time.perf_counter()
                    yield event(index, text, None)
            if p["include_usage"] and status == 200:
                yield "data: " + json.dumps({"id": meta["id"], "object": kind, "created": meta["created"],
                                             "model": self.model_name, "choices": [],
                                             "usage": self.usage(meta, choices)}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:  # a client that went away cancels its jobs: their slots free at the next chunk
            for choice in choices:
                choice.job.cancel()
            for task in tasks:
                task.cancel()
            self.log_request(meta, choices, status)

    def usage(self, meta: dict, choices: list[Choice]) -> dict[str, int]:
        completion = sum(c.tokens for c in choices)
        return {"prompt_tokens": meta["prompt_tokens"], "completion_tokens": completion,
                "total_tokens": meta["prompt_tokens"] + completion}

    def log_request(self, meta: dict, choices: list[Choice], status: int) -> None:
        elapsed = time.perf_counter() - meta["start"]
        tokens = sum(c.tokens for c in choices)
        ttft = f"{(meta['first'] - meta['start']) * 1000:.0f} ms" if meta["first"] else "-"
        log.info("%s %d: %d choice(s), %d prompt tokens, %d tokens, first token %s, %.0f tokens/s, %s", meta["id"], status,
                 len(choices), meta["prompt_tokens"], tokens, ttft, tokens / max(elapsed, 1e-9),
                 ",".join(sorted({c.finish or "cancelled" for c in choices})))

    def app(self) -> Starlette:
        def guarded(handler: Any) -> Any:
            async def run(request: Request) -> Response:
                try:
                    if self.api_key is not None and not secrets.compare_digest(
                            request.headers.get("authorization", ""), f"Bearer {self.api_key}"):
                        raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)",
                                       kind="authentication_error")
                    return await handler(request)
                except ApiError as e:
                    return e.response()
            return run

        async def not_found(request: Request, exc: Exception) -> Response:
            return ApiError(404, f"no such endpoint: {request.method} {request.url.path}").response()

        async def not_allowed(request: Request, exc: Exception) -> Response:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

        routes = [Route("/health", guarded(self.health), methods=["GET"]),
                  Route("/v1/models", guarded(self.models), methods=["GET"]),
                  Route("/v1/completions", guarded(self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", guarded(self.chat), methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


def api_key_from(flag: str | None) -> str | None:
    """--api_key, else $JAXGPT_API_KEY, else none (open, on the address it binds)."""
    return flag or os.environ.get("JAXGPT_API_KEY") or None
