"""What every script shares: user mistakes become one stderr line and exit 2."""
from __future__ import annotations

import argparse
import atexit
import ctypes
import functools
import gc
import json
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jaxgpt.errors import Interrupted, UserError

log = logging.getLogger("jaxgpt")

# glibc malloc settings for CPU training processes (mallopt parameter, value); see tune_host_allocator
GLIBC_MALLOPT = {"M_ARENA_MAX": (-8, 1), "M_MMAP_MAX": (-4, 0), "M_TRIM_THRESHOLD": (-1, -1)}
_host_allocator: list[str] = []  # what tune_host_allocator changed in this process


def _show_notices() -> None:
    """jaxgpt's library code reports degradations (an unsupported compiler option, a cache that
    cannot be written) through the `jaxgpt` logger; scripts show each as one stderr line."""
    logger = logging.getLogger("jaxgpt")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("notice: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False


def _quiet_background_failures() -> None:
    """A checkpoint write that failed leaves orbax tasks whose exception nobody retrieves and tensorstore
    callbacks aimed at orbax's closed event loop; each would print a traceback at exit. The failure
    itself is reported in one line (Checkpointer.save/wait)."""
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    def benign(exc: BaseException | None) -> bool:
        return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"

    thread_hook, unraisable_hook = threading.excepthook, sys.unraisablehook
    threading.excepthook = lambda args: None if benign(args.exc_value) else thread_hook(args)
    sys.unraisablehook = lambda args: None if benign(args.exc_value) else unraisable_hook(args)


@functools.cache
def _freeze_heap_at_exit() -> None:
    """At exit, freeze the heap so the interpreter's shutdown skips full collections of JAX's large heap
    (~0.4 s a process: BENCHMARKS.md, "seventh lap"); registered first, so it runs after the run's own exit
    handlers."""
    atexit.register(gc.freeze)


def _freeze_imported_heap() -> None:
    """Move what the script imported (most of the heap, alive to the end) out of the collector's generations,
    so the run's full collections walk only what it made (BENCHMARKS.md, "twelfth lap")."""
    gc.freeze()


def run(main: Callable[[list[str]], int | None], argv: list[str] | None = None) -> None:
    """Call main(argv); a UserError prints `error: ...` (traceback only with --debug) and exits 2."""
    _freeze_heap_at_exit()
    _freeze_imported_heap()
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    # orbax logs routine notices as absl warnings, and a failed background write as an absl error with its
    # traceback, which jaxgpt reports itself in one line: keep the terminal for our output (--debug shows all)
    import absl.logging
    absl.logging.set_verbosity(absl.logging.INFO if debug else absl.logging.FATAL)
    _show_notices()
    if not debug:
        _quiet_background_failures()
    from jaxgpt.paths import configure_gcs
    argv = [a for a in argv if a != "--debug"]
    try:
        configure_gcs()  # STORAGE_EMULATOR_HOST -> every Cloud Storage client; quiet clients
        code = main(argv)
    except UserError as e:
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # the last line of defence: the device's memory or the storage, after all
        from jaxgpt.paths import describe, is_transient
        if debug:
            raise
        if "RESOURCE_EXHAUSTED" in str(e):
            from jaxgpt.platform import advice
            print(f"error: the device ran out of memory ({describe(e, 200)}); {advice()}", file=sys.stderr)
        elif is_transient(e):
            print(f"error: the storage did not answer ({describe(e, 200)}); committed checkpoints are kept: run "
                  f"the same command with --resume=auto once it answers", file=sys.stderr)
        else:
            raise
        sys.exit(2)
    sys.exit(code or 0)


def add_compile_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile_cache", default="", metavar="PATH|off",
                        help="JAX's persistent compilation cache: a folder, or off (default: ~/.cache/jaxgpt/xla, "
                             "under $XDG_CACHE_HOME when set)")


def add_plan_flags(parser: Any, compile_only_help: str) -> None:
    """--target, --compile_only and --json (train.py and serve.py): the script's programs compiled for an
    accelerator (jaxgpt.plan.aot) and reported instead of run. `parser`: a parser or an argument group."""
    parser.add_argument("--target", help="plan for this accelerator instead of this host's devices: a Cloud TPU type "
                                         "(v4-8, v5e-8 = v5litepod-8, v5e-16, v5p-8, v6e-8, ...) or GPUs (h100, h100x8, "
                                         "h200x8, a100x8, b200x8, h100x16 = 2 hosts); needs --compile_only")
    parser.add_argument("--compile_only", action="store_true", help=compile_only_help)
    parser.add_argument("--json", action="store_true", help="with --compile_only: the plan as one JSON object on stdout")


def check_plan_flags(args: argparse.Namespace) -> None:
    """--target and --json only go with --compile_only: one error line saying what to add."""
    if args.target and not args.compile_only:
        raise UserError(f"--target={args.target} plans a run for other chips: add --compile_only (run the same command "
                        f"without --target and --compile_only on the {args.target} itself)")
    if args.json and not args.compile_only:
        raise UserError("--json prints the --compile_only plan; add --compile_only")


def apply_compile_cache(setting: str) -> None:
    use_compile_cache(setting)


def read_text_file(path: str, flag: str) -> str:
    """A UTF-8 text file a flag names (--text, --prompt_file), or one error line naming the flag."""
    from pathlib import Path

    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise UserError(f"cannot read {flag} {path} ({reason}); pass an existing UTF-8 file") from None


def progress_lines(quiet: bool) -> Callable[[str], None]:
    """Progress as flushed stderr lines; none when quiet (--json: stdout is the answer)."""
    return (lambda m: None) if quiet else (lambda m: print(m, file=sys.stderr, flush=True))


def print_plan(report: dict[str, Any], as_json: bool, extra: str = "") -> int:
    """A plan (jaxgpt.plan.aot) as JSON or as its table (+ `extra`), then one `error:` line when it does
    not fit; returns the exit code (0 fits, 1 does not)."""
    from jaxgpt.plan.aot import finite, render, shortfall

    print(json.dumps(finite(report)) if as_json else render(report) + extra, flush=True)
    if not report["fits"]:
        print(f"error: {shortfall(report)}", file=sys.stderr)
        return 1
    return 0


# --- process-level settings: only the CLIs (and tests, benchmarks) apply them; importing jaxgpt never does ---
def _runs_on_cpu() -> bool:
    """Whether JAX will pick the CPU backend, decided without starting it: JAX_PLATFORMS says so,
    or no accelerator plugin (CUDA/ROCm/TPU) is installed."""
    from importlib import metadata, util

    chosen = os.environ.get("JAX_PLATFORMS", "").split(",")[0].strip().lower()
    if chosen:
        return chosen == "cpu"
    return not (list(metadata.entry_points(group="jax_plugins")) or util.find_spec("libtpu"))


def tune_host_allocator() -> str:
    """For CPU training processes, before JAX starts (the CLIs call it; importing jaxgpt never does): glibc
    keeps freed memory (one arena, no mmap, no trimming), so a step's large temporaries are not page-faulted
    back in every step (BENCHMARKS.md, "Why storing activations was slower"). Linux/glibc on CPU only; returns
    what it changed ('' when nothing)."""
    if _host_allocator or not sys.platform.startswith("linux") or not _runs_on_cpu():
        return "".join(_host_allocator)
    try:
        libc = ctypes.CDLL("libc.so.6")
        _ = libc.gnu_get_libc_version  # glibc only (musl has no mallopt parameters like these)
    except (OSError, AttributeError):
        return ""
    done = [f"{name}={value}" for name, (param, value) in GLIBC_MALLOPT.items() if libc.mallopt(param, value) == 1]
    _host_allocator.append("glibc malloc " + ", ".join(done) if done else "")
    return _host_allocator[0]


def host_allocator() -> str:
    """What tune_host_allocator changed in this process ('' when it did not run or changed nothing)."""
    return "".join(_host_allocator)


def default_compile_cache() -> Path:
    """Where the CLIs keep JAX's persistent compilation cache: the user's cache directory."""
    from jaxgpt import paths
    return paths.cache_home() / "xla"


def use_compile_cache(setting: str | None) -> Path | None:
    """Turn on JAX's persistent compilation cache for this process (the CLIs call this; importing
    jaxgpt never does). setting: a folder, '' or None for default_compile_cache(), or 'off'.
    Every program is cached, however fast it compiled, so warm starts skip XLA entirely. A
    folder that cannot be written, or an unreadable entry, costs one notice, not the run."""
    import jax

    if setting == "off":
        return None
    path = Path(setting) if setting else default_compile_cache()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        log.warning("compilation cache %s cannot be written (%s); compiling without it", path, e.strerror or e)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    _quiet_cache_warnings(path)
    return path


def _quiet_cache_warnings(path: Path) -> None:
    """JAX warns (two lines with a source excerpt) per unreadable cache entry and recompiles it;
    report the first as one notice and drop the rest."""
    show = warnings.showwarning
    seen: list[Any] = []

    def showwarning(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        if "persistent compilation cache" not in str(message):
            return show(message, category, filename, lineno, file, line)
        if not seen:
            seen.append(message)
            log.warning("compilation cache %s has unreadable entries; recompiling them (%s)", path,
                        str(message).split(": ", 1)[-1][:120])

    warnings.showwarning = showwarning
