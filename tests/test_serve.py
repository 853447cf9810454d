"""scripts/serve.py, started as a subprocess on a tiny model (loopback only) and driven by the official
openai client: completions, streaming, n > 1, stop, seeds, models; a bounded load test where every
request equals its solo run; disconnects, a full queue, bad inputs, SIGTERM. The text pipeline (UTF-8
and stop-string holdback) is tested in test_textstream.py; the hardening in test_serve_limits.py."""
from __future__ import annotations

import asyncio
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from tests import launch, served

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return served.tiny_model(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(model_dir):
    s = served.Served(model_dir / "run", model_dir, "--slots=4", "--api_key=secret", "--model_name=tiny",
               "--max_tokens=4096", "--max_prompt_tokens=64")
    yield s
    code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI
    return OpenAI(base_url=f"{server.url}/v1", api_key="secret", max_retries=0)


pytestmark = pytest.mark.slow  # a server subprocess: the full suite only


def test_the_openai_client_gets_completions_streams_choices_stops_and_seeds(client, model_dir):
    assert [m.id for m in client.models.list()] == ["tiny"]
    r = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0.9, seed=5)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 40
    assert r.usage.prompt_tokens == 6 and r.usage.total_tokens == 46
    again = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0.9, seed=5)
    assert again.choices[0].text == r.choices[0].text, "the same seed gave another text"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="ROMEO:", max_tokens=40, temperature=0.9, seed=5, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    three = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=9, n=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    for c in three.choices:  # choice i samples as a request with seed + i
        solo = client.completions.create(model="tiny", prompt="ROMEO:", max_tokens=20, temperature=1.0, seed=9 + c.index)
        assert solo.choices[0].text == c.text
    greedy = client.completions.create(model="tiny", prompt="KING", max_tokens=60, temperature=0)
    text = greedy.choices[0].text
    stop = text[20:23]
    stopped = client.completions.create(model="tiny", prompt="KING", max_tokens=60, temperature=0, stop=[stop, "\x00\x01"])
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].text == text[:text.index(stop)]
    gen = launch.run([sys.executable, str(ROOT / "scripts" / "generate.py"), f"--checkpoint={model_dir / 'run'}",
                          "--prompt=KING", "--max_new_tokens=60", "--temperature=0"], cwd=model_dir, capture_output=True,
                         timeout=300)
    assert gen.returncode == 0 and gen.stdout.decode("utf-8", "replace").rstrip("\n") == "KING" + text, gen.stderr[-2000:]


def test_64_requests_16_at_a_time_each_equal_their_solo_run_without_leaking(server, client):
    rng = np.random.default_rng(0)
    requests = [dict(prompt="".join(chr(c) for c in rng.integers(97, 123, rng.integers(1, 40))),
                     max_tokens=int(rng.integers(4, 48)), temperature=float(rng.choice([0.0, 0.7, 1.0, 1.3])),
                     top_p=float(rng.choice([1.0, 0.9])), seed=int(rng.integers(0, 1000)),
                     extra_body={"top_k": int(rng.choice([0, 5, 50])) or None}) for _ in range(64)]
    ask = lambda kw: client.completions.create(model="tiny", **kw).choices[0].text  # noqa: E731
    solo = [ask(kw) for kw in requests]
    rss0 = server.rss_mib()
    with ThreadPoolExecutor(16) as pool:
        loaded = list(pool.map(ask, requests))
    with ThreadPoolExecutor(16) as pool:  # once more: memory must not grow with the requests served
        list(pool.map(ask, requests))
    rss1 = server.rss_mib()
    assert loaded == solo, [i for i, (a, b) in enumerate(zip(loaded, solo, strict=True)) if a != b]
    health = server.health("secret")
    assert health["slots_in_use"] == 0 and health["queue"] == 0, health
    assert rss1 - rss0 < 0.1 * rss0 + 20, f"resident memory grew from {rss0:.0f} to {rss1:.0f} MiB"


def test_a_disconnected_stream_frees_its_slot(server):
    import httpx
    with httpx.stream("POST", f"{server.url}/v1/completions", headers={"Authorization": "Bearer secret"},
                      json={"prompt": "x", "max_tokens": 4000, "stream": True}, timeout=60) as r:
        lines = r.iter_lines()
        assert any(line.startswith("data: ") for line in (next(lines) for _ in range(3)))
        assert server.health("secret")["slots_in_use"] == 1
    deadline = time.time() + 20
    while server.health("secret")["slots_in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health("secret")["slots_in_use"] == 0


@pytest.mark.parametrize("how, status, message", [
    (dict(content=b"{not json", headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    (dict(json={"prompt": "x", "temperature": 5}), 400, "temperature"),
    (dict(json={"prompt": "x", "n": 0}), 400, "n: Input should be greater than or equal to 1"),
    (dict(json={"prompt": "x", "logprobs": 3}), 400, "logprobs is not supported"),
    (dict(json={"prompt": "x", "frobnicate": 1}), 400, "unsupported parameter"),
    (dict(json={"prompt": ""}, key="wrong"), 401, "API key"),
    (dict(json={"prompt": "x" * 2_000_000}), 413, "body"),
    (dict(json={"prompt": "x", "max_tokens": 10**9}), 400, "max_tokens"),
])
def test_bad_requests_get_an_openai_error_and_the_server_lives_on(server, how, status, message):
    import httpx
    key = how.pop("key", "secret")
    headers = {"Authorization": f"Bearer {key}", **how.pop("headers", {})}
    r = httpx.post(f"{server.url}/v1/completions", headers=headers, timeout=30, **how)
    assert r.status_code == status and message in r.json()["error"]["message"], r.text
    assert server.health("secret")["status"] == "ok"


def test_a_full_queue_answers_429_and_sigterm_exits_cleanly(model_dir):
    import httpx
    s = served.Served(model_dir / "run", model_dir, "--slots=1", "--max_queue=1", "--max_tokens=300")
    try:
        async def burst() -> list[int]:
            async with httpx.AsyncClient() as c:
                async def one() -> int:
                    r = await c.post(f"{s.url}/v1/completions", json={"prompt": "x", "max_tokens": 300}, timeout=120)
                    return r.status_code
                return await asyncio.gather(*(one() for _ in range(4)))
        codes = asyncio.run(burst())
        assert 429 in codes and 200 in codes, codes
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "x", "max_tokens": 5}, timeout=60)
        assert r.status_code == 200 and r.json()["object"] == "text_completion"
    finally:
        code, err = s.stop()
    assert code == 0 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if " 200: " in line]
    assert lines and "first token" in lines[0] and "tokens/s" in lines[0], err[-2000:]
