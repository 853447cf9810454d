"""The issue's table, as a user meets it from the command line: two runs in one folder, a truncated
data file, a model too big for the machine, and a restart script that runs the same
`train.py ... --resume=auto` after every kill — before and after the first checkpoint."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxgpt.lock import LOCK_FILE
from jaxgpt.rundir import read_metrics
from tests import launch, tiny

pytestmark = pytest.mark.slow  # subprocesses: the full suite only

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset=synth", *tiny.TRAIN, "--eval_interval=8", "--log_interval=1", "--max_iters=32", "--plot=false"]


@pytest.fixture()
def work(tmp_path) -> Path:
    return tiny.prepare(tmp_path)


def start(work: Path, *args: str) -> subprocess.Popen:
    return launch.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, *args], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(proc: subprocess.Popen, timeout: float = 300) -> str:
    _, err = proc.communicate(timeout=timeout)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), f"exit {proc.returncode}: {err[-3000:]}"
    return lines[0]


def test_a_second_run_in_the_same_folder_is_refused_and_the_first_finishes(work):
    first = start(work, "--out_dir=out/x", "--max_iters=400")
    end = time.time() + 120
    while not (work / "out" / "x" / LOCK_FILE).exists() and time.time() < end:
        time.sleep(0.05)
    second = start(work, "--out_dir=out/x", "--seed=2")
    line = one_error_line(second)
    assert f"pid {first.pid}" in line and "being written by another run" in line and "started 20" in line, line
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-2000:]
    rows = read_metrics(work / "out" / "x" / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 401)), "the refused run wrote into the folder"
    assert not (work / "out" / "x" / LOCK_FILE).exists()


def test_a_truncated_data_file_and_an_oversized_model_each_end_in_one_line(work):
    train = work / "data" / "synth" / "train.bin"
    good = train.read_bytes()
    train.write_bytes(good[:100])
    line = one_error_line(start(work, "--out_dir=out/t"))
    assert "train.bin holds 100 bytes but meta.json says" in line and "prepare the data again" in line, line
    train.write_bytes(good)
    t = time.time()
    line = one_error_line(start(work, "--out_dir=out/big", "--n_embd=16384", "--n_layer=48", "--n_head=16"))
    assert "the train state (parameters and optimizer state) needs" in line and "GiB per device" in line, line
    assert time.time() - t < 120 and not (work / "out" / "big" / "checkpoints").exists()


def test_the_same_resume_auto_command_after_every_kill_finishes_the_run_bit_identically(work):
    """A restart script's loop: killed before the first checkpoint (starts over), killed after one
    (continues from it, the stale lock of the killed run taken over), then runs to the end."""
    ref = start(work, "--out_dir=out/ref")
    assert ref.wait(timeout=600) == 0
    run = work / "out" / "auto"
    proc = start(work, "--out_dir=out/auto", "--resume=auto")
    while not any(r["step"] >= 3 for r in read_metrics(run / "metrics.jsonl")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # preempted before the first checkpoint (step 8)
    proc.wait()
    assert (run / LOCK_FILE).exists() and not (run / "checkpoints" / "8").exists()
    proc = start(work, "--out_dir=out/auto", "--resume=auto")
    # a local orbax step folder appears (renamed into place) only once complete
    while not (run / "checkpoints" / "16").is_dir() or not any(r["step"] >= 18 for r in read_metrics(run / "metrics.jsonl")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = start(work, "--out_dir=out/auto", "--resume=auto")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "resume=auto: continuing the run in out/auto" in out
    straight = [(r["step"], r["train_loss"]) for r in read_metrics(work / "out" / "ref" / "metrics.jsonl")]
    assert [(r["step"], r["train_loss"]) for r in read_metrics(run / "metrics.jsonl")] == straight
    assert json.loads((run / "config.json").read_text())["train"]["resume"] is True
