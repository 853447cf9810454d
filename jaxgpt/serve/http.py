"""The server's connections (uvicorn under Starlette): what keeps one client from holding the server.

uvicorn bounds the connections open at once and closes idle keep-alive connections, but waits forever
for a request's headers; `http_config` adds that deadline. TimedStream puts the request's deadline on
every send of a stream, so a reader that stops reading cannot hold its slots either.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.responses import StreamingResponse

log = logging.getLogger("jaxgpt.serve")


class _Stalled(Exception):
    """The client stopped reading a stream past the request's deadline."""


class TimedStream(StreamingResponse):
    """A stream with a deadline on every send: a client that stops reading (the socket's buffers
    fill and uvicorn waits for them to drain) cannot hold its slots past the request timeout."""

    def __init__(self, content: AsyncIterator[str], deadline: float, name: str):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.deadline, self.name = deadline, name

    async def stream_response(self, send: Any) -> None:
        async def timed(message: Any) -> None:
            try:
                await asyncio.wait_for(send(message), max(self.deadline - time.perf_counter(), 0.001))
            except asyncio.TimeoutError:
                raise _Stalled from None
        try:
            await super().stream_response(timed)
        except _Stalled:
            log.warning("%s: the client stopped reading; stream closed at the request timeout", self.name)
            await self.body_iterator.aclose()  # type: ignore[attr-defined]  # its finally cancels the jobs


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    import ipaddress
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def http_config(app: Starlette, host: str, port: int, max_connections: int, header_timeout_s: float,
                grace_s: float) -> Any:
    """uvicorn's settings for a server on a network: at most `max_connections` at once (more get 503),
    idle keep-alive connections closed after 5 s, and a deadline for each request's headers, which
    uvicorn lacks (a connection that sends nothing, or its headers a byte at a time, is closed after
    `header_timeout_s`); the body's deadline is Limits.body_timeout_s."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._deadline()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._deadline()

        header_timer: asyncio.TimerHandle | None = None

        def _deadline(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            self.header_timer = self.loop.call_later(header_timeout_s, self._expire)

        def _expire(self) -> None:
            if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
                self.transport.close()  # no request is in progress: the next one's headers are late

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

    return uvicorn.Config(app, host=host, port=port, http=Protocol, log_level="warning", access_log=False,
                          limit_concurrency=max_connections, timeout_keep_alive=5,
                          timeout_graceful_shutdown=grace_s)  # type: ignore[arg-type]
