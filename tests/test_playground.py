"""The playground page (GET / on scripts/serve.py) in a real browser: headless Chromium driven by
selenium loads it, types a prompt, generates with a seed at temperature 0 through the page's own
stream, and the text it shows must equal generate.py's for the same prompt; Stop ends a long
generation and frees its slot. Set JAXGPT_PLAYGROUND_SCREENSHOT=docs/playground.png to keep the
screenshot (the README's). Skips, saying why, where Chromium or its driver is not installed."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests import served

pytestmark = pytest.mark.slow  # a server subprocess and a browser: the full suite only


def _browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("headless Chromium is not installed (apt-get install chromium chromium-driver): the playground's "
                    "browser test did not run")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (pip install -e '.[dev]'): the playground's browser test did not run")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1100,720",
                 "--disable-gpu", "--no-first-run"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(driver), options=options)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    work = served.tiny_model(tmp_path_factory.mktemp("playground"))
    browser = _browser()
    server = served.Served(work / "run", work, "--slots=2", "--api_key=secret", "--max_tokens=10000000",
                           "--model_name=tiny-shakespeare")
    try:
        browser.get(f"{server.url}/")
        yield browser, server, work
    finally:
        browser.quit()
        code, err = server.stop()
        assert code == 0 and "Traceback" not in err, err[-3000:]


def _fill(browser, **values: str) -> None:
    from selenium.webdriver.common.by import By
    for name, value in values.items():
        box = browser.find_element(By.ID, name)
        box.clear()
        box.send_keys(value)


def _status(browser, pattern: str, timeout: float = 120) -> str:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        WebDriverWait(browser, timeout).until(lambda b: re.search(pattern, b.find_element(By.ID, "status").text))
    except TimeoutException:
        raise AssertionError(f"the page's status did not match {pattern!r} in {timeout:.0f} s: it shows "
                             f"{browser.find_element(By.ID, 'status').text!r}") from None
    return browser.find_element(By.ID, "status").text


def test_the_page_generates_what_generate_py_does_and_shows_tokens_per_second(page, tmp_path):
    from selenium.webdriver.common.by import By
    browser, server, work = page
    assert browser.title == "jaxgpt playground"
    _fill(browser, prompt="KING RICHARD:", temperature="0", seed="7", max_tokens="60", api_key="secret")
    browser.find_element(By.ID, "generate").click()
    status = _status(browser, r"^done")
    assert re.search(r"done · length · 60 tokens in [\d.]+ s · \d+ tokens/s", status), status
    shown = browser.find_element(By.ID, "output").get_property("textContent")
    gen = subprocess.run([sys.executable, str(served.ROOT / "scripts" / "generate.py"), f"--checkpoint={work / 'run'}",
                          "--prompt=KING RICHARD:", "--max_new_tokens=60", "--temperature=0", "--seed=7"], cwd=work,
                         capture_output=True, timeout=300)
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert shown.rstrip("\n") == gen.stdout.decode("utf-8", "replace").rstrip("\n")
    assert browser.find_element(By.ID, "model").text == "tiny-shakespeare"
    shot = tmp_path / "playground.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("JAXGPT_PLAYGROUND_SCREENSHOT"):
        shutil.copy(shot, os.environ["JAXGPT_PLAYGROUND_SCREENSHOT"])


def test_stop_ends_a_long_generation_and_a_wrong_key_is_shown(page):
    from selenium.webdriver.common.by import By
    browser, server, _ = page
    # ten million tokens: minutes even at a tiny model's tens of thousands a second, so Stop lands mid-stream;
    # the page draws once a frame, so it stays responsive while the text grows
    _fill(browser, prompt="x", temperature="1", seed="7", max_tokens="10000000", api_key="secret")
    browser.find_element(By.ID, "generate").click()
    _status(browser, r"generating")
    shown = "return document.getElementById('output').textContent.length"
    deadline = time.time() + 60
    while browser.execute_script(shown) < 12_000 and time.time() < deadline:  # a few of the page's blocks
        time.sleep(0.1)
    assert server.health("secret")["slots_in_use"] == 1
    browser.find_element(By.ID, "stop").click()
    assert _status(browser, r"^stopped") == "stopped"
    blocks = browser.execute_script("return [...document.querySelectorAll('#output > .block')]"
                                    ".map((b) => [b.textContent, b.firstChild.className])")
    assert len(blocks) >= 3, f"{len(blocks)} blocks: the page must draw a long stream in blocks"
    assert blocks[0][0].startswith("x") and blocks[0][1] == "prompt", blocks[0][0][:40]
    for text, _ in blocks[:-1]:  # each block holds about a screenful and ends at a newline
        assert len(text) >= 4000 and text.endswith("\n"), (len(text), text[-20:])
    deadline = time.time() + 20
    while server.health("secret")["slots_in_use"] and time.time() < deadline:
        time.sleep(0.1)
    assert server.health("secret")["slots_in_use"] == 0, "Stop did not free the slot"
    _fill(browser, max_tokens="5", api_key="wrong")
    browser.find_element(By.ID, "generate").click()
    assert "401: invalid or missing API key" in _status(browser, r"401")


def test_no_ui_turns_the_page_off_and_the_page_needs_no_key_and_no_external_asset():
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from jaxgpt.serve.server import Limits, Server
    limits = Limits(max_prompt_tokens=8, max_tokens=8)
    on = TestClient(Server(SimpleNamespace(), None, "m", "secret", limits).app()).get("/")
    assert on.status_code == 200 and on.headers["content-type"].startswith("text/html")
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", on.text), "the page must not load anything from elsewhere"
    off = TestClient(Server(SimpleNamespace(), None, "m", "secret", limits, ui=False).app()).get("/")
    assert off.status_code == 404 and "--no_ui" in off.json()["error"]["message"]
