"""A process that has imported what the CLIs import, and forks a child per CLI the tests start
(tests/launch.py is its client): each child is a real process with its own pid, argv, working
directory, environment, signals and exit status, but skips the ~1.5 s of imports a fresh
interpreter pays. Nothing here starts JAX's backend or a thread, so forking is safe.

Protocol (one JSON object per line on stdin, one reply per line on stdout):
  {"op": "spawn", "argv": [...], "cwd": ..., "env": {...}, "stdout": path, "stderr": path} -> {"pid": N}
  {"op": "poll", "pid": N} -> {"code": None | exit code (negative: killed by that signal), "cpu_s": its CPU seconds}
"""
from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import threading

# what the scripts import (never a backend: that starts after the fork, with the child's XLA_FLAGS)
import jax  # noqa: E402,F401
import matplotlib  # noqa: E402

matplotlib.use("Agg")
for _name in ("absl.logging", "flax.nnx", "optax", "orbax.checkpoint", "torch", "jaxgpt.cli", "jaxgpt.train",
              "jaxgpt.sample", "jaxgpt.plan.aot", "formats.io", "formats.hf", "parity.checks"):
    try:
        importlib.import_module(_name)
    except ImportError:  # an environment without it (the compile tier's has no torch): the child imports what it needs
        pass
from jax._src import xla_bridge  # noqa: E402


def _child(req: dict) -> None:
    """Become the requested process: fds, cwd, environment, argv, then run it as __main__."""
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
        out = os.open(path, os.O_WRONLY | os.O_APPEND) if path else os.open(os.devnull, os.O_WRONLY)
        os.dup2(out, fd)
        os.close(out)
    os.close(null)
    os.chdir(req["cwd"])
    os.environ.clear()
    os.environ.update(req["env"])
    argv = req["argv"]
    if argv[0] == "-m":
        sys.argv, sys.path[0] = [argv[1], *argv[2:]], os.getcwd()
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    elif argv[0] == "-c":
        sys.argv, sys.path[0] = ["-c", *argv[2:]], ""
        exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv, sys.path[0] = list(argv), os.path.dirname(os.path.abspath(argv[0]))
        runpy.run_path(argv[0], run_name="__main__")


def _exit(req: dict) -> None:
    """Run the child and exit as the interpreter would (the exit code of SystemExit, a traceback and
    1, or death by SIGINT for an uncaught KeyboardInterrupt; then non-daemon threads joined, atexit
    handlers, flushed streams), but without tearing down the modules the zygote imported: that
    second of garbage collection is the same in every process and proves nothing."""
    code, interrupted = 0, False
    try:
        _child(req)
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        interrupted = True
    except BaseException:
        sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    if interrupted:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


def main() -> None:
    assert not xla_bridge._backends, "an import started a JAX backend: forking would share it"
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "poll":
            pid, status, usage = os.wait4(req["pid"], os.WNOHANG)
            code = None if pid == 0 else os.waitstatus_to_exitcode(status)
            reply.write(json.dumps({"code": code, "cpu_s": usage.ru_utime + usage.ru_stime if pid else 0.0}) + "\n")
            continue
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            reply.close()
            _exit(req)
        reply.write(json.dumps({"pid": pid}) + "\n")


if __name__ == "__main__":
    main()
