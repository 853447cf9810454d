"""The server on a network: every class of hostile or broken input gets an OpenAI-style JSON answer and
the server serves on. One scripts/serve.py process with short deadlines (tests/served.py), driven by
httpx and raw sockets; its log must hold no traceback at the end. Each class of issue 29 has a test:
malformed values (every JSON type in every field, invalid Unicode, deep nesting, bytes in headers),
work bounded by the limits, honest accounting (429, usage, finish reasons, the caps), connections
(idle, slow headers, slow bodies, a stalled stream reader, a client gone mid-request), exposure
(the non-loopback warning, JSON-only bodies), and a fuzz test over generated requests."""
from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxgpt import ByteTokenizer
from jaxgpt.serve.api import ApiError
from jaxgpt.tokenizer import CharTokenizer
from tests import served

KEY = "secret"
AUTH = {"Authorization": f"Bearer {KEY}"}
TIMEOUT_S, HEADER_S, BODY_S = 8, 2, 2


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = served.tiny_model(tmp_path_factory.mktemp("limits"))
    s = served.Served(work / "run", work, "--slots=2", "--max_queue=2", f"--api_key={KEY}", "--max_tokens=100000",
                      f"--timeout={TIMEOUT_S}", f"--header_timeout={HEADER_S}", f"--body_timeout={BODY_S}",
                      "--max_connections=16")
    s.work = work
    yield s
    code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]


def post(server, body, path: str = "/v1/completions", **kw):
    import httpx
    return httpx.post(f"{server.url}{path}", json=body, headers=AUTH, timeout=60, **kw)


def raw(server, data: bytes, rcvbuf: int | None = None) -> socket.socket:
    """A socket to the server that has sent `data` (and nothing more yet)."""
    s = socket.socket()
    if rcvbuf:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", server.port))
    s.sendall(data)
    return s


def answer(s: socket.socket, timeout: float = 30) -> tuple[int, bytes]:
    """Read a whole (Connection: close) response: its status and body."""
    s.settimeout(timeout)
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def request_bytes(body: bytes, headers: bytes = b"", path: bytes = b"/v1/completions", length: int | None = None) -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body) if length is None else length}\r\n".encode()
            + headers + b"\r\n" + body)


def assert_error(status: int, body: bytes, want: int) -> str:
    assert status == want, (status, body[:300])
    error = json.loads(body)["error"]
    assert error["type"] and "\n" not in error["message"], error
    return error["message"]


pytestmark = pytest.mark.slow  # a server subprocess: the full suite only

BAD_VALUES = {  # each value is the wrong JSON type, or out of range, for its field
    "prompt": [None, True, 1.5, {}, [], [True], [[]], [1, "a"], [-1], {"a": 1}],
    "max_tokens": [True, "5", 1.5, {}, [], 0, -1, 10**30],
    "temperature": [True, "0.5", {}, [], -0.1, 2.5, "NaN"],
    "top_p": [True, "1", {}, 0, 1.5],
    "top_k": [True, "5", 1.5, {}, 0],
    "n": [True, "2", 1.5, {}, 0],
    "stream": ["true", 1, 0, {}, []],
    "stop": [1, True, {}, [1], [""], ["a"] * 5, "x" * 65, [None]],
    "seed": [True, "1", 1.5, -1, 2**31, {}],
    "stream_options": ["yes", [], {"include_usage": "yes"}, {"other": 1}],
    "user": [1, {}, [], True],
    "logprobs": [3, True, "1"],
    "echo": [True, "false"],
    "logit_bias": [{"1": 5.0}, [], "x"],
    "presence_penalty": [0.5, "0"],
    "best_of": [2, True],
}
BAD_MESSAGES = [None, "hi", [], [{"role": "user"}], [{"role": 1, "content": "x"}], [{"role": "user", "content": {"a": 1}}],
                [{"role": "user", "content": "x", "extra": 1}], [{"role": "user", "content": None}], [["user", "x"]]]


def test_every_field_refuses_every_wrong_json_type_with_one_400_line(server):
    wrong = []
    for field, values in BAD_VALUES.items():
        for value in values:
            r = post(server, {"prompt": "x", "max_tokens": 2, field: value})
            if r.status_code != 400 or "error" not in r.json() or "\n" in r.json()["error"]["message"]:
                wrong.append((field, value, r.status_code, r.text[:200]))
    for messages in BAD_MESSAGES:
        r = post(server, {"messages": messages, "max_tokens": 2}, "/v1/chat/completions")
        if r.status_code != 400:
            wrong.append(("messages", messages, r.status_code, r.text[:200]))
    assert not wrong, wrong
    r = post(server, {"prompt": "x", "max_tokens": 2, "n": True})
    assert r.json()["error"]["param"] == "n", r.text
    assert post(server, {"prompt": "x", "max_tokens": 2, "temperature": 0, "logprobs": None, "echo": False}).status_code == 200


@pytest.mark.parametrize("body", [
    b'{"prompt": "\\ud800"}', b'{"prompt": "x", "stop": "\\udfff"}', b'{"\\ud800": 1}', b'{"prompt": "\xff\xfe"}',
    b'{"prompt": ["a", "\\udc00"]}', b'[' * 100_000 + b']' * 100_000, b'{"prompt": ' * 5000 + b'1' + b'}' * 5000,
    b'', b'null', b'"x"', b'{"prompt": "x"} trailing'])
def test_invalid_unicode_deep_nesting_and_non_objects_are_400s(server, body):
    s = raw(server, request_bytes(body))
    assert_error(*answer(s), 400)


def test_a_chat_message_with_a_lone_surrogate_and_bytes_in_headers(server):
    body = b'{"messages": [{"role": "user", "content": "hi \\ud83d"}], "max_tokens": 2}'
    assert_error(*answer(raw(server, request_bytes(body, path=b"/v1/chat/completions"))), 400)
    # non-ASCII bytes in the Authorization header: 401 (not a 500 from comparing the strings)
    bad_key = request_bytes(b'{"prompt": "x", "max_tokens": 2}').replace(f"Bearer {KEY}".encode(), b"Bearer \xff\xfe\xc3")
    assert_error(*answer(raw(server, bad_key)), 401)
    # and in any other header, with the right key: served
    status, body = answer(raw(server, request_bytes(b'{"prompt": "x", "max_tokens": 2}', headers=b"X-Name: \xe9\xff\r\n")))
    assert status == 200 and json.loads(body)["choices"], body[:300]


def test_bodies_that_are_not_declared_json_are_refused(server):
    import httpx
    for kind, content in [("application/x-www-form-urlencoded", b"prompt=x"), ("text/plain", b'{"prompt": "x"}'),
                          (None, b'{"prompt": "x"}'), ("multipart/form-data; boundary=x", b"--x--")]:
        headers = {**AUTH, **({"Content-Type": kind} if kind else {})}
        r = httpx.post(f"{server.url}/v1/completions", content=content, headers=headers, timeout=30)
        assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], (kind, r.text)
    assert post(server, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_prompt_the_tokenizer_cannot_encode_is_a_400():
    from jaxgpt.serve.server import Limits, Server
    chars = CharTokenizer({"a": 0, "b": 1}, {0: "a", 1: "b"})
    s = Server(SimpleNamespace(vocab=2, block=8), chars, "m", None, Limits(max_prompt_tokens=8, max_tokens=8))
    assert s.encode(["abba"])[0].tolist() == [0, 1, 1, 0]
    with pytest.raises(ApiError) as e:
        s.encode(["abz"])
    assert e.value.status == 400 and "cannot be encoded" in str(e.value) and "'z'" in str(e.value)
    with pytest.raises(ApiError, match="exceeds this server's limit of 8"):
        s.encode(["a" * 9])


def test_the_last_resort_handler_answers_a_json_500_and_logs_one_line(caplog):
    from starlette.requests import Request

    from jaxgpt.serve.server import Limits, Server

    async def broken(request: Request):
        raise RuntimeError("a bug\nwith a second line")
    s = Server(SimpleNamespace(vocab=2, block=8), None, "m", None, Limits(max_prompt_tokens=8, max_tokens=8))
    scope = {"type": "http", "method": "GET", "path": "/x", "headers": [], "query_string": b"", "scheme": "http",
             "server": ("t", 80), "root_path": ""}
    with caplog.at_level(logging.ERROR, logger="jaxgpt.serve"):
        response = asyncio.run(s.guarded(broken)(Request(scope)))
    assert response.status_code == 500 and json.loads(response.body)["error"]["type"] == "server_error"
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["GET /x: unexpected RuntimeError: a bug"], lines


def test_an_engine_failure_is_a_503_not_a_200_with_an_error_reason():
    from starlette.requests import Request

    from jaxgpt.serve.api import CompletionRequest
    from jaxgpt.serve.server import Limits, Server

    class Failing:  # the engine's thread died: every job hears "error"
        vocab, block = 256, 32

        def submit(self, jobs):
            for job in jobs:
                job.emit([], "error")

        def stats(self):
            return {"status": "error: RuntimeError: device lost"}
    s = Server(Failing(), ByteTokenizer(), "m", None, Limits(max_prompt_tokens=8, max_tokens=16))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": [], "query_string": b""}
    request = CompletionRequest(prompt="x")

    async def run():
        return await s.generate(Request(scope), request, s.encode(request.prompts()), chat=False)
    with pytest.raises(ApiError) as e:
        asyncio.run(run())
    assert e.value.status == 503 and "device lost" in str(e.value)


def test_a_full_queue_admits_all_of_a_request_or_nothing(server):
    import httpx
    with httpx.stream("POST", f"{server.url}/v1/completions", headers=AUTH, timeout=60,
                      json={"prompt": "x", "max_tokens": 100_000, "stream": True, "n": 2}) as busy:
        lines = busy.iter_lines()  # kept: a dropped iterator closes the stream
        next(lines)
        assert server.health(KEY)["slots_in_use"] == 2
        r = post(server, {"prompt": "x", "max_tokens": 4, "n": 3})  # 3 sequences, room for 2 in the queue
        assert r.status_code == 429 and r.json()["error"]["type"] == "rate_limit_exceeded", r.text
        assert server.health(KEY)["queue"] == 0, "a refused request left sequences in the queue"
        r = post(server, {"prompt": ["x", "y", "z"], "max_tokens": 4, "n": 2})  # 6 > 2 slots + 2 queued: never fits
        assert r.status_code == 400 and "at most 4 at once" in r.json()["error"]["message"], r.text
    deadline = time.time() + 20
    while server.health(KEY)["slots_in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert post(server, {"prompt": "x", "max_tokens": 4, "n": 2}).status_code == 200


def test_usage_counts_what_was_returned_and_finish_reasons_are_stop_or_length(server):
    whole = post(server, {"prompt": "KING", "max_tokens": 30, "temperature": 0}).json()
    text = whole["choices"][0]["text"]
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"]["completion_tokens"] == 30
    stop = text[12:14]
    cut = post(server, {"prompt": "KING", "max_tokens": 30, "temperature": 0, "stop": stop}).json()
    returned = text[:text.index(stop)]
    assert cut["choices"][0] == {"text": returned, "index": 0, "logprobs": None, "finish_reason": "stop"}, cut
    assert cut["usage"]["completion_tokens"] == len(returned.encode()), cut["usage"]
    chat = post(server, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}, "/v1/chat/completions").json()
    assert chat["choices"][0]["finish_reason"] in ("stop", "length") and chat["usage"]["completion_tokens"] <= 5


def test_the_prompt_cap_follows_block_size_unless_set(server):
    r = post(server, {"prompt": "x" * 33, "max_tokens": 2})
    assert r.status_code == 400 and "limit of 32" in r.json()["error"]["message"], r.text
    assert post(server, {"prompt": "x" * 32, "max_tokens": 2}).status_code == 200


def test_the_worst_allowed_stop_request_returns_the_plain_text(server):
    """Four 64-character stop strings that keep almost matching the greedy text and never complete: the
    same text as without them (their work per character is bounded: tests/test_textstream.py counts it)."""
    base = {"prompt": "KING", "max_tokens": 400, "temperature": 0}
    text = post(server, base).json()["choices"][0]["text"]
    stops = [(text * 2)[i:i + 63] + "\x00" for i in (0, 7, 19, 33)]
    r = post(server, {**base, "stop": stops})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == text


def test_a_client_gone_mid_upload_or_too_slow_with_its_body_costs_nothing(server):
    s = raw(server, request_bytes(b'{"prompt": "', length=1000))
    s.close()  # disconnected mid-upload
    slow = raw(server, request_bytes(b'{"prompt": "x", ', length=40))
    status, body = answer(slow, timeout=BODY_S + 20)
    assert "did not arrive within" in assert_error(status, body, 408)
    assert server.health(KEY)["status"] == "ok"


def test_idle_and_slow_header_connections_are_closed_at_the_header_deadline(server):
    idle = raw(server, b"")
    partial = raw(server, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")
    dribble = raw(server, b"POST /v1/completions HTTP/1.1\r\n")
    start, closed = time.perf_counter(), None
    try:
        while time.perf_counter() - start < HEADER_S + 10:
            dribble.sendall(b"X")  # a header a byte at a time: never finished
            time.sleep(0.2)
    except OSError:
        closed = time.perf_counter() - start
    assert closed is not None and closed < HEADER_S + 5, "a connection dribbling its headers was never closed"
    for s in (idle, partial):
        s.settimeout(HEADER_S + 10)
        assert s.recv(100) == b"", "an idle connection was left open past the header deadline"
    assert post(server, {"prompt": "x", "max_tokens": 2}).status_code == 200


def test_a_stream_whose_reader_stopped_reading_is_cancelled_at_the_request_timeout(server):
    body = json.dumps({"prompt": "x", "max_tokens": 100_000, "stream": True, "n": 2}).encode()
    stalled = raw(server, request_bytes(body), rcvbuf=2048)  # and never read
    time.sleep(1)
    assert server.health(KEY)["slots_in_use"] == 2
    deadline = time.time() + TIMEOUT_S + 10
    while server.health(KEY)["slots_in_use"] and time.time() < deadline:
        time.sleep(0.2)
    assert server.health(KEY)["slots_in_use"] == 0, "a stalled reader held its slots past the request timeout"
    stalled.close()


def test_a_stream_send_that_blocks_past_the_deadline_closes_the_stream(caplog):
    """When the socket's buffers do fill (a slow network, a paused reader), uvicorn's send waits for
    them to drain: the deadline on every send ends the stream there, and closing the generator runs
    its cleanup (which cancels the request's jobs). Loopback buffers absorb megabytes, so this is
    shown with a send that never returns."""
    from jaxgpt.serve.http import TimedStream

    cleaned = []

    async def events():
        try:
            for i in range(1000):
                yield f"data: {i}\n\n"
        finally:
            cleaned.append(True)

    async def send(message):
        if message["type"] == "http.response.body" and message["body"]:
            await asyncio.Event().wait()  # the reader stopped: this send never completes

    async def run():
        stream = TimedStream(events(), time.perf_counter() + 0.5, "cmpl-test")
        start = time.perf_counter()
        await stream.stream_response(send)
        return time.perf_counter() - start
    with caplog.at_level(logging.WARNING, logger="jaxgpt.serve"):
        took = asyncio.run(run())
    assert 0.4 < took < 5 and cleaned == [True], (took, cleaned)
    assert any("stopped reading" in r.getMessage() for r in caplog.records)


def test_a_non_streamed_client_that_disconnects_frees_its_slots(server):
    import httpx
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", headers=AUTH, timeout=1.5,
                   json={"prompt": "x", "max_tokens": 100_000, "n": 2})
    deadline = time.time() + 5
    while server.health(KEY)["slots_in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health(KEY)["slots_in_use"] == 0
    assert " 499: 2 choice(s)" in server.errors(), "the disconnect was not noticed (logged as 499)"


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=6)
FIELDS = [*BAD_VALUES, "model", "max_completion_tokens", "suffix", "frequency_penalty", "top_logprobs", "messages"]
VALUE = st.one_of(JSON, st.integers(1, 8), st.floats(0, 2), st.sampled_from(["KING", "\n", "", "é"]))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), VALUE, max_size=6), chat=st.booleans())
def test_fuzz_every_answer_is_json_2xx_or_4xx_and_the_server_serves_on(server, body, chat):
    body = {"max_tokens": 3, **body}  # mostly short: the fuzz is about parsing
    r = post(server, body, "/v1/chat/completions" if chat else "/v1/completions")
    assert 200 <= r.status_code < 500, (r.status_code, body, r.text[:300])
    if r.headers["content-type"].startswith("text/event-stream"):
        assert r.text.rstrip().endswith("data: [DONE]") or '"error"' in r.text, r.text[-300:]
    else:
        assert ("choices" in r.json()) == (r.status_code == 200), r.text[:300]


def test_after_the_fuzz_a_normal_request_gets_the_right_text_and_the_log_has_no_traceback(server):
    gen = subprocess.run([sys.executable, str(served.ROOT / "scripts" / "generate.py"), f"--checkpoint={server.work / 'run'}",
                          "--prompt=KING", "--max_new_tokens=20", "--temperature=0"], cwd=server.work, capture_output=True,
                         timeout=300)
    r = post(server, {"prompt": "KING", "max_tokens": 20, "temperature": 0})
    assert gen.returncode == 0 and "KING" + r.json()["choices"][0]["text"] == gen.stdout.decode("utf-8", "replace").rstrip("\n")
    assert "Traceback" not in server.errors(), server.errors()[-3000:]


def test_a_server_on_a_network_address_without_a_key_warns_and_its_caps_follow_block_size(tmp_path):
    """serve.py's start-up for --host=0.0.0.0 without a key, with uvicorn's run() stubbed in that process: the
    warning and the caps are printed, and nothing listens on any interface."""
    work = served.tiny_model(tmp_path)
    argv = ["serve.py", f"--checkpoint={work / 'run'}", "--host=0.0.0.0", f"--port={served.free_port()}"]
    code = ("import runpy, sys, uvicorn\n"
            "uvicorn.Server.run = lambda self: print('not listening on', self.config.host, file=sys.stderr)\n"
            f"sys.argv = {argv!r}\n"
            f"runpy.run_path({str(served.ROOT / 'scripts' / 'serve.py')!r}, run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=work, timeout=300,
                          env={**os.environ, "JAXGPT_API_KEY": ""})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "warning: 0.0.0.0 is reachable from other machines and no API key is set" in proc.stderr, proc.stderr[-2000:]
    assert "prompts up to 32 tokens, max_tokens up to 32" in proc.stderr, proc.stderr[-2000:]
    assert "not listening on 0.0.0.0" in proc.stderr
