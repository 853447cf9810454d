"""A scripts/serve.py process on a tiny model, on a loopback port, for the server's tests."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(work: Path) -> Path:
    """A 2-layer, 32-wide byte-level model saved as a run folder work/run (block_size 32); returns work."""
    from flax import nnx

    from formats.io import save_jaxgpt
    from jaxgpt import GPT, ByteTokenizer, GPTConfig

    model = GPT(GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.0), rngs=nnx.Rngs(7))
    save_jaxgpt(model, work / "run", {"step": 1, "tokenizer": ByteTokenizer()})
    return work


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, checkpoint: Path, cwd: Path, *flags: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: a line per request would fill it and block the server
        # a real process (not tests/launch.py's fork): its memory is measured
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "serve.py"), f"--checkpoint={checkpoint}",
                                      f"--port={self.port}", *flags], cwd=cwd, stdout=subprocess.DEVNULL,
                                     stderr=self.log, text=True)
        import httpx
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code in (200, 401):
                    return
            except httpx.HTTPError:
                pass
            assert self.proc.poll() is None and time.time() < deadline, self.errors()[-3000:]
            time.sleep(0.1)

    def health(self, key: str | None = None) -> dict:
        import httpx
        return httpx.get(f"{self.url}/health", timeout=10, headers={"Authorization": f"Bearer {key}"} if key else {}).json()

    def rss_mib(self) -> float:
        line = next(ln for ln in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines() if ln.startswith("VmRSS:"))
        return int(line.split()[1]) / 1024

    def errors(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, self.errors()
