"""The HTTP layer of `scripts/serve.py`: the OpenAI completions API over jaxgpt.serve.engine, on Starlette.

It reads a request into its typed model (jaxgpt.serve.api), checks it against the server's limits, turns
tokens into text (jaxgpt.serve.textstream) and streams it. Every answer other than 200 is an OpenAI-style
JSON error: 400 bad request, 401 wrong key, 404, 405, 408 body too slow, 413 body too large, 415 not
JSON, 429 queue full, 500 unexpected (one line in the log, never a traceback), 503 engine down, 504
timeout. The work of a request is bounded by the limits, not by what it asks for; a client that goes
away or stops reading frees its slots (jaxgpt/serve/http.py: the connections' deadlines). Chat completions
use a plain template (CHAT_TEMPLATE).
`GET /` is the playground page (playground.html), unless the server runs with --no_ui.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from jaxgpt.errors import UserError
from jaxgpt.paths import describe
from jaxgpt.serve.api import ApiError, ChatRequest, CompletionRequest, Sampling
from jaxgpt.serve.engine import Engine, EngineDown, QueueFull
from jaxgpt.serve.http import TimedStream
from jaxgpt.serve.textstream import Choice, Params

log = logging.getLogger("jaxgpt.serve")
CHAT_TEMPLATE = "{role}: {content}\n"  # each message, then "assistant:" for the model to continue
PAGE = Path(__file__).with_name("playground.html")
R = TypeVar("R", bound=Sampling)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for. serve.py sets the token caps to the model's block_size unless told."""

    max_prompt_tokens: int
    max_tokens: int  # cap on a request's max_tokens
    max_n: int = 16
    timeout_s: float = 300.0
    max_body_bytes: int = 1 << 20
    body_timeout_s: float = 30.0  # the whole body must arrive within this


def _sse(payload: dict) -> str:
    """One server-sent event."""
    return "data: " + json.dumps(payload) + "\n\n"


class Server:
    """The endpoints: each reads its request, checks it against the limits and hands it to the
    engine; a Reply answers. Every error on the way is an ApiError (guarded)."""

    def __init__(self, engine: Engine, tokenizer: Any, model_name: str, api_key: str | None, limits: Limits,
                 ui: bool = True):
        self.engine, self.tokenizer, self.model_name, self.api_key, self.limits = engine, tokenizer, model_name, api_key, limits
        self.ui, self.created = ui, int(time.time())

    # --- reading and checking a request ---
    async def read(self, request: Request, model: type[R]) -> R:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            raise ApiError(415, f"the request body must be JSON (Content-Type: application/json), got {kind or 'none'!r}")
        size = request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.limits.max_body_bytes:
            raise ApiError(413, f"the request body is {size} bytes; the limit is {self.limits.max_body_bytes}")
        raw = bytearray()
        try:
            async with asyncio.timeout(self.limits.body_timeout_s):
                async for part in request.stream():
                    raw += part
                    if len(raw) > self.limits.max_body_bytes:
                        raise ApiError(413, f"the request body exceeds {self.limits.max_body_bytes} bytes")
        except TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.limits.body_timeout_s:.0f} s") from None
        try:
            return model.model_validate_json(bytes(raw))
        except ValidationError as e:
            raise ApiError.from_validation(e) from None

    def params(self, r: Sampling) -> Params:
        if unsupported := r.unsupported():
            raise ApiError(400, f"{unsupported[0]} is not supported by this server (leave it unset)", param=unsupported[0])
        max_tokens = r.max_completion_tokens or r.max_tokens or 16
        if max_tokens > self.limits.max_tokens:
            raise ApiError(400, f"max_tokens must be at most {self.limits.max_tokens} on this server, got {max_tokens}",
                           param="max_tokens")
        n = r.n or 1
        if n > self.limits.max_n:
            raise ApiError(400, f"n must be at most {self.limits.max_n}, got {n}", param="n")
        return Params(max_tokens=max_tokens, temperature=1.0 if r.temperature is None else r.temperature,
                      top_k=min(r.top_k, self.engine.vocab) if r.top_k else None,
                      top_p=1.0 if r.top_p is None else r.top_p, n=n,
                      seed=r.seed if r.seed is not None else secrets.randbelow(2**31 - 1024),
                      stream=bool(r.stream), stops=r.stops(),
                      include_usage=bool(r.stream_options and r.stream_options.include_usage))

    def encode(self, prompts: list[str | list[int]]) -> list[np.ndarray]:
        if len(prompts) > self.limits.max_n:
            raise ApiError(400, f"at most {self.limits.max_n} prompts per request, got {len(prompts)}", param="prompt")
        out = []
        for p in prompts:
            if isinstance(p, str):
                try:
                    ids = np.asarray(self.tokenizer.encode(p or "\n"), np.int32)
                except UserError as e:
                    raise ApiError(400, f"the prompt cannot be encoded: {e}", param="prompt") from None
            elif max(p) >= self.engine.vocab:
                raise ApiError(400, f"token ids must be in [0, {self.engine.vocab}), got {max(p)}", param="prompt")
            else:
                ids = np.asarray(p, np.int32)
            if len(ids) > self.limits.max_prompt_tokens:
                raise ApiError(400, f"a prompt of {len(ids)} tokens exceeds this server's limit of "
                               f"{self.limits.max_prompt_tokens} (the model attends to {self.engine.block})",
                               param="prompt")
            out.append(ids)
        return out

    # --- endpoints ---
    async def page(self, request: Request) -> Response:
        if not self.ui:
            raise ApiError(404, "the playground page is off (--no_ui); the API is at /v1")
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        stats = self.engine.stats()
        return JSONResponse({"model": self.model_name, **stats}, status_code=200 if stats["status"] == "ok" else 503)

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model", "created": self.created,
                                                         "owned_by": "jaxgpt"}]})

    async def completions(self, request: Request) -> Response:
        r = await self.read(request, CompletionRequest)
        return await self.generate(request, r, self.encode(r.prompts()), chat=False)

    async def chat(self, request: Request) -> Response:
        r = await self.read(request, ChatRequest)
        text = "".join(CHAT_TEMPLATE.format(role=m.role, content=m.content) for m in r.messages) + "assistant:"
        return await self.generate(request, r, self.encode([text]), chat=True)

    # --- generating ---
    async def generate(self, request: Request, r: Sampling, prompts: list[np.ndarray], chat: bool) -> Response:
        p = self.params(r)
        loop = asyncio.get_running_loop()
        choices = [Choice(i * p.n + c, prompt, p, self.tokenizer, loop) for i, prompt in enumerate(prompts) for c in range(p.n)]
        try:
            self.engine.submit([c.job for c in choices])
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later", kind="rate_limit_exceeded") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        except EngineDown as e:
            raise ApiError(503, f"the engine stopped ({e}); restart the server", kind="server_error") from None
        reply = Reply(self, choices, sum(len(x) for x in prompts), chat)
        if p.stream:
            return TimedStream(reply.events(p.include_usage), reply.start + self.limits.timeout_s, reply.id)
        return await reply.whole(request)

    # --- the application ---
    def authorized(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        given = request.headers.get("authorization", "").encode("latin-1")  # any bytes a client sent
        return secrets.compare_digest(given, f"Bearer {self.api_key}".encode())

    def guarded(self, handler: Callable[[Request], Awaitable[Response]], open_: bool = False) -> Callable:
        async def run(request: Request) -> Response:
            try:
                if not open_ and not self.authorized(request):
                    raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", kind="authentication_error")
                return await handler(request)
            except ApiError as e:
                return e.response()
            except ClientDisconnect:  # went away mid-upload: nobody to answer
                log.info("%s %s: the client disconnected before sending its whole body", request.method, request.url.path)
                return Response(status_code=400)
            except Exception as e:  # the last resort: one line in the log, a JSON 500 to the client
                log.error("%s %s: unexpected %s", request.method, request.url.path, describe(e, 200))
                return ApiError(500, "internal error; the server's log has the details", kind="server_error").response()
        return run

    def app(self) -> Starlette:
        async def not_found(request: Request, exc: Exception) -> Response:
            return ApiError(404, f"no such endpoint: {request.method} {request.url.path}").response()

        async def not_allowed(request: Request, exc: Exception) -> Response:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

        routes = [Route("/", self.guarded(self.page, open_=True), methods=["GET"]),
                  Route("/health", self.guarded(self.health), methods=["GET"]),
                  Route("/v1/models", self.guarded(self.models), methods=["GET"]),
                  Route("/v1/completions", self.guarded(self.completions), methods=["POST"]),
                  Route("/v1/chat/completions", self.guarded(self.chat), methods=["POST"])]
        return Starlette(routes=routes, exception_handlers={404: not_found, 405: not_allowed})


class Reply:
    """One request's answer: its choices, as one JSON object (whole) or as server-sent events."""

    def __init__(self, server: Server, choices: list[Choice], prompt_tokens: int, chat: bool):
        self.server, self.choices, self.prompt_tokens, self.chat = server, choices, prompt_tokens, chat
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{secrets.token_hex(12)}"
        self.created, self.start = int(time.time()), time.perf_counter()
        self.first: float | None = None  # when the first text was ready
        self.timeout_s = server.limits.timeout_s

    def too_slow(self) -> ApiError:
        return ApiError(504, f"the request took longer than {self.timeout_s:.0f} s", kind="timeout")

    def failure(self) -> ApiError | None:
        """Why the request cannot end with a 200: too slow, or the engine failed."""
        if time.perf_counter() - self.start > self.timeout_s:
            return self.too_slow()
        if any(c.finish == "error" for c in self.choices):
            return ApiError(503, f"the engine stopped ({self.server.engine.stats()['status']}); restart the server",
                            kind="server_error")
        return None

    async def whole(self, request: Request) -> Response:
        async def collect(choice: Choice) -> None:
            async for _ in choice.deltas():
                self.first = self.first or time.perf_counter()
        gather = asyncio.gather(*(collect(c) for c in self.choices))
        status = 200
        try:
            while not gather.done():
                await asyncio.wait({gather}, timeout=0.1)
                if not gather.done() and await request.is_disconnected():
                    status = 499  # nginx's "client closed request": logged, never sent
                    return Response(status_code=status)
                if (error := self.failure()) is not None and not gather.done():
                    status = error.status
                    raise error
            gather.result()
            if (error := self.failure()) is not None and error.status == 503:
                status = error.status
                raise error
        finally:
            gather.cancel()
            for choice in self.choices:
                choice.job.cancel()
            self.log(status)
        if self.chat:
            items = [{"index": c.index, "message": {"role": "assistant", "content": c.text}, "logprobs": None,
                      "finish_reason": c.finish} for c in self.choices]
        else:
            items = [{"text": c.text, "index": c.index, "logprobs": None, "finish_reason": c.finish} for c in self.choices]
        return JSONResponse({"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                             "created": self.created, "model": self.server.model_name, "choices": items,
                             "usage": self.usage()})

    def event(self, items: list[dict], **extra: Any) -> str:
        return _sse({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.server.model_name, "choices": items, **extra})

    def item(self, index: int, text: str | None, finish: str | None, first: bool = False) -> dict:
        if not self.chat:
            return {"text": text or "", "index": index, "logprobs": None, "finish_reason": finish}
        delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None and not finish else {})
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    async def events(self, include_usage: bool) -> AsyncIterator[str]:
        merged: asyncio.Queue = asyncio.Queue()

        async def pump(choice: Choice) -> None:
            async for text in choice.deltas():
                await merged.put((choice.index, text, None))
            await merged.put((choice.index, None, choice.finish))
        tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
        finished, status = 0, 200
        try:
            for c in self.choices if self.chat else []:
                yield self.event([self.item(c.index, None, None, first=True)])
            while finished < len(self.choices):
                left = self.timeout_s - (time.perf_counter() - self.start)
                try:
                    index, text, finish = await asyncio.wait_for(merged.get(), timeout=max(left, 0.001))
                    error = self.failure()
                except asyncio.TimeoutError:
                    error = self.too_slow()
                if error is not None:
                    status = error.status
                    yield _sse(error.body())
                    break
                finished += finish is not None
                self.first = self.first or (time.perf_counter() if finish is None else None)
                yield self.event([self.item(index, text, finish)])
            if include_usage and status == 200:
                yield self.event([], usage=self.usage())
            yield "data: [DONE]\n\n"
        except Exception as e:  # the last resort inside a stream (its status is sent already): one line, no traceback
            status = 500
            log.error("%s: unexpected %s", self.id, describe(e, 200))
            yield _sse(ApiError(500, "internal error; the server's log has the details", kind="server_error").body())
        finally:  # a client that went away cancels its jobs: their slots free at the next chunk
            for choice in self.choices:
                choice.job.cancel()
            for task in tasks:
                task.cancel()
            self.log(status)

    def usage(self) -> dict[str, int]:
        completion = sum(c.returned_tokens() for c in self.choices)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                "total_tokens": self.prompt_tokens + completion}

    def log(self, status: int) -> None:
        elapsed = time.perf_counter() - self.start
        tokens = sum(c.tokens for c in self.choices)
        ttft = f"{(self.first - self.start) * 1000:.0f} ms" if self.first else "-"
        log.info("%s %d: %d choice(s), %d prompt tokens, %d tokens, first token %s, %.0f tokens/s, %s", self.id, status,
                 len(self.choices), self.prompt_tokens, tokens, ttft, tokens / max(elapsed, 1e-9),
                 ",".join(sorted({c.finish or "cancelled" for c in self.choices})))


def api_key_from(flag: str | None) -> str | None:
    """--api_key, else $JAXGPT_API_KEY, else none (open, on the address it binds)."""
    return flag or os.environ.get("JAXGPT_API_KEY") or None
