"""The README's Quick start command 1, run as a new user would on a fresh machine: a copy of
the repository, a new virtual environment, no network. CI affords neither a fresh download of
JAX nor 2000 steps, so (the closest equivalent): pip resolves the dependencies from the test
environment's site-packages instead of the registry (PIP_NO_INDEX, HTTP(S) through a dead proxy)
and the run is cut to 60 steps."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from jaxgpt.cli import default_compile_cache
from jaxgpt.data import SHAKESPEARE_SHA256
from tests.test_repo import quick_start

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

ROOT = Path(__file__).resolve().parents[1]
SHORTER = "--preset=cpu --max_iters=60 --eval_interval=30 --eval_iters=5"


def _copy_checkout(dst: Path) -> None:
    """The files a fresh clone has: what git tracks, and new files it does not ignore (never the
    virtualenvs, data, runs or caches: CI's compile tier puts 7 GB of .venv-gpu / .venv-tpu beside the
    suite, and copying them was most of this test's time), tests/ left out."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("the quick-start test copies what git tracks: run it in a git checkout (with git installed)")
    for name in listed:
        src = ROOT / name
        if name and not name.startswith("tests/") and src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)


def _dependencies(dst: Path) -> Path:
    """This environment's site-packages without jaxgpt itself (its editable finder would shadow
    the fresh checkout's): a folder of links to put on PYTHONPATH."""
    dst.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not entry.name.startswith(("__editable__", "jaxgpt")):
            (dst / entry.name).symlink_to(entry)
    return dst


def test_quick_start_command_1_trains_plots_and_samples_offline(tmp_path):
    command = quick_start((ROOT / "README.md").read_text())[0]
    assert "--preset=cpu" in command and "pip install -e ." in command
    repo = tmp_path / "jaxgpt"
    _copy_checkout(repo)
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path / "home"), "XDG_CACHE_HOME": str(tmp_path / "cache"),
           "PYTHONPATH": str(_dependencies(tmp_path / "deps")),  # the dependencies, instead of the registry
           "PIP_NO_INDEX": "1", "PIP_NO_BUILD_ISOLATION": "0", "PIP_FIND_LINKS": "", "PIP_CONSTRAINT": "",
           "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}
    # XLA's compiled programs are the one thing shared with the test session (its compilation
    # cache, and the suite's XLA:CPU compile settings from conftest.py): they change no output, and
    # compiling them cold at XLA's defaults cost this test ~4 s of its ~31 s of CPU.
    env["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
    (tmp_path / "cache" / "jaxgpt").mkdir(parents=True)
    (tmp_path / "cache" / "jaxgpt" / "xla").symlink_to(default_compile_cache(), target_is_directory=True)
    python_dir = str(Path(sys.executable).parent)
    env["PATH"] = ":".join(p for p in env["PATH"].split(":") if p != python_dir)  # not the test venv's python
    proc = subprocess.run(["bash", "-c", command.replace("--preset=cpu", SHORTER)], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (tmp_path / "elsewhere").mkdir()
    where = subprocess.run([str(repo / ".venv" / "bin" / "python"), "-c", "import jaxgpt; print(jaxgpt.__file__)"],
                           cwd=tmp_path / "elsewhere", env=env, capture_output=True, text=True, timeout=120).stdout
    assert where.startswith(str(repo)), f"jaxgpt imported from {where!r}, not the fresh checkout"
    assert "prepared data/shakespeare from the Tiny Shakespeare bundled with jaxgpt" in proc.stdout
    meta = json.loads((repo / "data" / "shakespeare" / "meta.json").read_text())
    assert meta["sha256"] == SHAKESPEARE_SHA256 and meta["source"].startswith("bundled:")
    train = (repo / "data" / "shakespeare" / "train.bin").read_bytes()
    assert len(train) == 1_003_854 and hashlib.sha256(train).hexdigest() != SHAKESPEARE_SHA256  # the 90 % split
    sample = proc.stdout.split("KING RICHARD III:", 1)
    assert len(sample) == 2 and len(sample[1].encode()) >= 400, proc.stdout[-1500:]
    png = (repo / "out" / "shakespeare" / "loss.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
