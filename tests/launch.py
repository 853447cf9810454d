"""`run` and `Popen` as in `subprocess`, for the tests' `[sys.executable, script | -m module | -c code,
...]` commands: the process is forked from tests/zygote.py, which has already imported what the CLIs
import. The child is a real process (own pid, cwd, environment, signals, exit status, and stdout /
stderr in files), so what a test checks is unchanged; it starts and exits in ~0.1 s instead of ~1.9 s. Any other
command, stdin, bytes output, or an environment that changes a variable read at start-up (JAX_*,
PYTHON*, LD_*, ...: _STARTUP; jaxgpt reads its own JAXGPT_* variables when it uses them) takes the real
subprocess, as does every command with JAXGPT_TEST_NO_ZYGOTE set."""
from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

_ZYGOTE = Path(__file__).with_name("zygote.py")
_server: subprocess.Popen | None = None
_base_env: dict[str, str] = {}  # the zygote's environment (its JAX_* variables were read at import)
_dir = tempfile.mkdtemp(prefix="jaxgpt-launch-")  # the zygote's log and the children's output, removed at exit
_log = os.path.join(_dir, "zygote.log")
atexit.register(shutil.rmtree, _dir, ignore_errors=True)
child_cpu_s = 0.0  # CPU seconds of the forked children that have ended (their parent is the zygote, not us)


def _start() -> subprocess.Popen:
    global _server, _base_env
    if _server is None or _server.poll() is not None:
        _base_env = dict(os.environ)
        with open(_log, "w") as log:
            _server = subprocess.Popen([sys.executable, str(_ZYGOTE)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                       stderr=log, text=True, bufsize=1, cwd=Path(__file__).parents[1])
        atexit.register(_server.kill)
    return _server


def _request(msg: dict) -> dict:
    server = _start()
    assert server.stdin and server.stdout
    server.stdin.write(json.dumps(msg) + "\n")
    line = server.stdout.readline()
    if not line:
        raise RuntimeError(f"tests/zygote.py ended (exit {server.wait()}): {Path(_log).read_text()[-2000:]}")
    return json.loads(line)


def _forkable(args: Any, env: dict | None, kwargs: dict) -> bool:
    """A python command, output to PIPE/DEVNULL/inherited, no other options, and the zygote's JAX_*."""
    if "JAXGPT_TEST_NO_ZYGOTE" in os.environ or kwargs.keys() - {"stdout", "stderr"}:
        return False
    if not (isinstance(args, list) and len(args) >= 2 and args[0] == sys.executable):
        return False
    if any(kwargs.get(k) not in (None, subprocess.PIPE, subprocess.DEVNULL) for k in ("stdout", "stderr")):
        return False
    _start()
    return _at_start(os.environ if env is None else env) == _at_start(_base_env)


# variables read when the interpreter starts or a library is imported: a child that changes one is a real process
_STARTUP = ("JAX_", "PYTHON", "LD_", "MALLOC_", "OMP_", "MKL_", "TENSORSTORE_", "COVERAGE_", "GLIBC_")


def _at_start(env: Any) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith(_STARTUP)}


class _Tail:
    """A child's output file read like a pipe: readline() and read() wait for more until it exits."""

    def __init__(self, path: str, proc: Forked) -> None:
        self._f, self._proc = open(path, encoding="utf-8", errors="replace"), proc

    def readline(self) -> str:
        line = self._f.readline()
        while not line.endswith("\n"):
            if self._proc.poll() is not None:
                return line + self._f.readline()
            time.sleep(0.02)
            line += self._f.readline()
        return line

    def read(self) -> str:
        self._proc.wait()
        return self._f.read()

    def close(self) -> None:
        self._f.close()


class Forked:
    """subprocess.Popen for a forked child: pid, poll, wait, communicate, send_signal, kill, and
    stdout / stderr readable when asked for with subprocess.PIPE."""

    def __init__(self, args: list[str], *, cwd: Any = None, env: dict | None = None, stdout: Any = None,
                 stderr: Any = None) -> None:
        self.args, self.returncode = args, None
        self._dir = tempfile.mkdtemp(dir=_dir)
        paths = {}
        for name, how in (("stdout", stdout), ("stderr", stderr)):
            if how not in (None, subprocess.PIPE, subprocess.DEVNULL):
                raise ValueError(f"launch.Forked: {name} must be PIPE, DEVNULL or None")
            paths[name] = os.path.join(self._dir, name) if how in (None, subprocess.PIPE) else ""
            if paths[name]:
                Path(paths[name]).touch()  # the child appends; the test may open it before the child starts
        self.pid = _request({"op": "spawn", "argv": args[1:], "cwd": str(cwd or os.getcwd()),
                             "env": dict(os.environ if env is None else env), **paths})["pid"]
        self._paths = paths
        self.stdout = _Tail(paths["stdout"], self) if stdout == subprocess.PIPE else None
        self.stderr = _Tail(paths["stderr"], self) if stderr == subprocess.PIPE else None
        self._echo = {n: p for n, p in paths.items() if p and {"stdout": stdout, "stderr": stderr}[n] is None}

    def poll(self) -> int | None:
        global child_cpu_s
        if self.returncode is None:
            reply = _request({"op": "poll", "pid": self.pid})
            self.returncode = reply["code"]
            if self.returncode is not None:
                child_cpu_s += reply["cpu_s"]
                for name, path in self._echo.items():  # not captured: the test's own output, as a subprocess's would be
                    getattr(sys, name).write(Path(path).read_text(errors="replace"))
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        end = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if end is not None and time.monotonic() > end:
                raise subprocess.TimeoutExpired(self.args, timeout)
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]

    def communicate(self, timeout: float | None = None) -> tuple[str | None, str | None]:
        self.wait(timeout)
        out = tuple(Path(self._paths[n]).read_text(errors="replace") if getattr(self, n) else None
                    for n in ("stdout", "stderr"))
        for tail in (self.stdout, self.stderr):
            if tail is not None:
                tail.close()
        shutil.rmtree(self._dir, ignore_errors=True)  # all read: nothing else needs the files
        return out  # type: ignore[return-value]

    def send_signal(self, signum: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, signum)

    def terminate(self) -> None:
        self.send_signal(15)

    def kill(self) -> None:
        self.send_signal(9)


def Popen(args: Any, **kwargs: Any) -> Any:  # noqa: N802  (subprocess's name)
    """subprocess.Popen, forked from the zygote when it can be (see the module's docstring)."""
    others = {k: v for k, v in kwargs.items() if k not in ("cwd", "env", "text")}
    if kwargs.get("text") and _forkable(args, kwargs.get("env"), others):
        return Forked(args, cwd=kwargs.get("cwd"), env=kwargs.get("env"), **others)
    return subprocess.Popen(args, **kwargs)


def run(args: Any, *, cwd: Any = None, env: dict | None = None, capture_output: bool = False, text: bool = False,
        timeout: float | None = None, **kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run, forked from the zygote when it can be (see the module's docstring)."""
    if not (text and not kwargs and _forkable(args, env, {})):  # bytes, or other options: the real subprocess
        return subprocess.run(args, cwd=cwd, env=env, capture_output=capture_output, text=text, timeout=timeout, **kwargs)
    pipe = subprocess.PIPE if capture_output else None
    proc = Forked(args, cwd=cwd, env=env, stdout=pipe, stderr=pipe)
    try:
        out, err = proc.communicate(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)  # type: ignore[arg-type]


ROOT = Path(__file__).resolve().parents[1]


def cli(script: str, *args: str, cwd: Path, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    """scripts/<script>.py with these arguments, its output captured; with `check`, a non-zero exit
    fails the test with the end of its stderr."""
    proc = run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], cwd=cwd, capture_output=True, text=True,
               timeout=600, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc
