"""Shared fixtures: tiny configs so compile time stays small on a 2-core CPU."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig
from jaxgpt.cli import use_compile_cache

# Every test process, and every CLI, worker and subprocess it starts (they inherit XLA_FLAGS), compiles
# XLA:CPU programs for compile speed, not run speed: the suite is mostly compiling tiny programs once each.
# All three change how XLA:CPU turns the HLO program into machine code, not the program:
# - LLVM at -O0 instead of -O3: a third of the compile time, steps slower (the CPU preset's at half
#   speed); the suite took 0.73x the CPU of -O3 (-O1: 0.87x; BENCHMARKS.md, "The test suite at -O0");
# - the older loop emitters for fusions instead of the MLIR fusion emitters, and each program's LLVM
#   module compiled whole instead of split into parts for threads (a worker per core leaves none spare):
#   a tiny CLI training run, 5.8 s of CPU -> 3.6 s -> 3.5 s, its losses equal to the last bit or one ulp
#   apart; the suite 6 min 27 s -> 5 min 17 s (BENCHMARKS.md, "The test suite, 2026-12-06, second pass").
# Any of them already in XLA_FLAGS means the compile settings are chosen there, and none is added:
# XLA_FLAGS=--xla_backend_optimization_level=3 runs the suite compiled as users' runs are.
_SUITE_XLA = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false",
              "--xla_cpu_parallel_codegen_split_count=1")
if not any(f.split("=")[0][2:] in os.environ.get("XLA_FLAGS", "") for f in _SUITE_XLA):
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *_SUITE_XLA]).strip()
# PyTorch runs its CPU ops on one thread in every test process (and the CLIs and notebook kernels they
# start): the suite runs a pytest-xdist worker per core, and a second OpenMP thread per worker only
# spins on a core that the other worker is using. Measured with one other busy process on a 2-core VM,
# the recipe's Muon parity row took 11.2 s with PyTorch's default threads, 6.3 s with one (alone: 6.0 s,
# 5.9 s). XLA's own thread pool does not suffer so (a JAX-only 300 steps: 4.8 s alone, 5.5 s beside it).
# OMP_NUM_THREADS already set wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The CLIs keep JAX's compilation cache under $XDG_CACHE_HOME; give the test session its own (the
# CLI subprocesses and pytest-xdist workers inherit it), so tests neither read nor fill the user's
# cache, and every session's CLIs start cold, as a user's first run does.
_OWN_CACHE = "JAXGPT_TEST_CACHE" not in os.environ  # this process makes it (not an xdist worker, which inherits it)
if _OWN_CACHE:
    os.environ["JAXGPT_TEST_CACHE"] = tempfile.mkdtemp(prefix="jaxgpt-test-cache-")
os.environ["XDG_CACHE_HOME"] = os.environ["JAXGPT_TEST_CACHE"]
# The test processes themselves keep theirs between sessions (in .pytest_cache, bounded): the quick
# tier is mostly compiling tiny programs, and a rerun after changing one function recompiles only
# what that change touched (README, Testing: 2.7 min cold, 1 min warm). Its keys are the programs
# themselves, so a stale entry is never used, only evicted: at the session's end, oldest first, down to
# _PROGRAMS_BUDGET. Not JAX's own bound (jax_compilation_cache_max_size): it lists and stats the whole
# folder on every write, and the suite writes ~1,800 programs: measured, 150 tiny programs took 24 s
# to compile into an empty folder and 94 s into one holding 1,500.
_PROGRAMS = Path(os.environ.get("JAXGPT_TEST_PROGRAMS", Path(__file__).parents[1] / ".pytest_cache" / "jaxgpt-programs"))
_PROGRAMS_BUDGET = 512 * 2**20
_programs = use_compile_cache(str(_PROGRAMS)) or use_compile_cache(None)  # an unwritable checkout: the session's

# Property tests draw the same examples every run (a suite's result and time must not depend on the
# draw: a random config once cost one run 3 minutes); `--hypothesis-profile=explore` draws new ones.
try:
    from hypothesis import settings
except ImportError:  # the compile tier's virtualenvs (.ci/aot) install no property-test tools
    pass
else:
    settings.register_profile("repeatable", derandomize=True)
    settings.register_profile("explore", derandomize=False)
    settings.load_profile("repeatable")


def _prune(folder: Path, budget: int) -> None:
    """Delete the oldest files until the folder holds at most `budget` bytes (one listing per session)."""
    entries = []
    for f in folder.iterdir():
        try:
            st = f.stat()
        except OSError:  # removed meanwhile
            continue
        entries.append((st.st_mtime, st.st_size, f))
    total = sum(size for _, size, _ in entries)
    for _, size, f in sorted(entries, key=lambda e: e[0]):
        if total <= budget:
            break
        f.unlink(missing_ok=True)
        total -= size


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _OWN_CACHE:  # the controller (xdist workers inherit its variables): once per session
        if _programs is not None and _programs.is_dir():
            _prune(_programs, _PROGRAMS_BUDGET)
        shutil.rmtree(os.environ["JAXGPT_TEST_CACHE"], ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):  # type: ignore[no-untyped-def]
    """With JAXGPT_TEST_CPU_REPORT=file: one JSON line per test with its worker, start (epoch s), wall and
    CPU seconds (this process, its subprocesses, and its CLIs forked from the zygote) -- where the suite's
    time goes, and when each worker sat idle."""
    report = os.environ.get("JAXGPT_TEST_CPU_REPORT")
    if not report:
        yield
        return
    import json
    import resource
    import time

    from tests import launch

    def cpu() -> tuple[float, float]:
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime + launch.child_cpu_s
    start, wall, (own, kids) = time.time(), time.perf_counter(), cpu()
    yield
    own2, kids2 = cpu()
    with open(report, "a") as f:
        f.write(json.dumps({"test": item.nodeid, "worker": os.environ.get("PYTEST_XDIST_WORKER", "main"),
                            "start": round(start, 2), "wall_s": round(time.perf_counter() - wall, 2),
                            "cpu_s": round(own2 - own, 2), "children_cpu_s": round(kids2 - kids, 2)}) + "\n")


def pytest_report_header() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def v(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"
    return "versions: " + ", ".join(f"{n} {v(n)}" for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
                                                             "torch", "transformers", "tokenizers"))


TINY = GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


@pytest.fixture(scope="session")
def tiny_cfg() -> GPTConfig:
    return TINY


@pytest.fixture(scope="module")
def gcs():
    """A Cloud Storage emulator for a test file (benchmarks/gcs_emulator.py; the file skips when it is missing)."""
    from benchmarks.gcs_emulator import Emulator

    emulator = Emulator()
    yield emulator
    emulator.stop()


@pytest.fixture(scope="module")
def bucket(gcs) -> str:
    return gcs.create_bucket("jaxgpt-test")


@pytest.fixture()
def tiny_model() -> GPT:
    model = GPT(TINY, rngs=nnx.Rngs(0))
    model.eval()
    return model


# pytest-xdist hands whole files to its workers in collection order: the longest files first, so
# that no worker starts a long file when the others are finishing (longest-first scheduling). Seconds per
# file on 2 cores, measured with JAXGPT_TEST_CPU_REPORT (2026-12-06; parity ~100, gcs ~60, ... convert ~4);
# a file not listed runs after these, in collection order.
_HEAVY_FIRST = ["test_parity", "test_gcs", "test_gpt2_rehearsal", "test_data_scale", "test_sharding", "test_gcs_hosts", "test_notebook", "test_serve_limits",
                "test_platform", "test_train", "test_bench", "test_cli", "test_hf", "test_quickstart", "test_report",
                "test_tracking", "test_reliability", "test_serve", "test_unattended_cli", "test_playground", "test_sample",
                "test_model", "test_export", "test_corpus", "test_fuzz", "test_aot", "test_optim", "test_convert"]


def _module(item: pytest.Item) -> str:
    return item.module.__name__.rsplit(".", 1)[-1] if item.module else ""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(_HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(_module(item), len(rank)))
