"""A small fault-injecting HTTP proxy for the Cloud Storage emulator (loopback only): each request is
forwarded, or answered with an error status, or its connection dropped, or stalled, at chosen rates.
The storage clients reach it through STORAGE_EMULATOR_HOST like the emulator itself."""
from __future__ import annotations

import http.client
import random
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, *, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.set()
        self.stop_stalls = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy.pick(self.command)
                if fault == "stall":  # hold the connection, answer nothing
                    proxy.stop_stalls.wait(proxy.stall_s)
                    self.close_connection = True
                    return
                if fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                    return
                if fault is not None:
                    payload = b'{"error": {"code": %d, "message": "injected fault"}}' % fault
                    self.send_response(fault)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=120)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP | {"host", "expect"}}
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in HOP_BY_HOP | {"content-length"}:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
                conn.close()

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def set(self, *, fail: float = 0.0, drop: float = 0.0, stall: float = 0.0, stall_s: float = 600.0,
            codes: tuple[int, ...] = (429, 500, 503), methods: tuple[str, ...] = ()) -> None:
        """Fault rates for the requests from now on (methods: only these, e.g. ('POST', 'PUT'))."""
        with self.lock:
            self.fail, self.drop, self.stall, self.stall_s, self.codes, self.methods = fail, drop, stall, stall_s, codes, methods

    def pick(self, method: str) -> str | int | None:
        with self.lock:
            self.counts["requests"] += 1
            if self.methods and method not in self.methods:
                return None
            r = self.rng.random()
            if r < self.stall:
                self.counts["stalled"] += 1
                return "stall"
            if r < self.stall + self.drop:
                self.counts["dropped"] += 1
                return "drop"
            if r < self.stall + self.drop + self.fail:
                code = self.rng.choice(self.codes)
                self.counts[f"status {code}"] += 1
                return code
            return None

    def close(self) -> None:
        self.stop_stalls.set()
        time.sleep(0.05)
        self.server.shutdown()
        self.server.server_close()
