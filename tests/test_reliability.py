"""Crash safety: SIGKILL at arbitrary moments, damaged checkpoints, SIGINT/SIGTERM, disk checks,
and loaders that never write outside the path the user named."""
from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import torchref
from formats.io import load_any
from jaxgpt import GPTConfig, TrainConfig, UserError
from jaxgpt.rundir import read_metrics
from jaxgpt.train import train
from tests import launch, tiny

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset=synth", *tiny.TRAIN, "--eval_interval=4", "--log_interval=1", "--max_iters=24", "--plot=false",
         "--keep_checkpoints=2"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("rel")
    return tiny.prepare(w)


def start(work: Path, out: str, *extra: str) -> subprocess.Popen:
    return launch.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, f"--out_dir={out}", *extra],
                            cwd=work, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def losses(path: Path) -> list[tuple]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in read_metrics(path)]


def wait_for_step(path: Path, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if any(r["step"] >= step for r in read_metrics(path)):
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before step {step}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.fixture(scope="module")
def reference(work) -> list[tuple]:
    proc = start(work, "out/ref")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    return losses(work / "out" / "ref" / "metrics.jsonl")


def test_sigkill_at_three_points_then_resume_is_bit_identical(work, reference):
    out = work / "out" / "killed"
    kills = []
    # mid-interval, the moment an evaluation (and its async checkpoint write) lands, and late
    for i, kill_at in enumerate((6, 12, 19)):
        proc = start(work, "out/killed", *(["--resume"] if i else []))
        wait_for_step(out / "metrics.jsonl", kill_at, proc)
        while i == 0 and not (out / "checkpoints" / "4").is_dir():  # --resume needs one committed checkpoint
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills.append(max(r["step"] for r in read_metrics(out / "metrics.jsonl")))
    proc = start(work, "out/killed", "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert len(kills) == 3
    assert losses(out / "metrics.jsonl") == reference, f"killed at {kills}"


def test_damaged_checkpoint_is_reported_and_skipped(work, reference):
    out = work / "out" / "damaged"
    proc = start(work, "out/damaged", "--max_iters=12")
    assert proc.wait(timeout=300) == 0
    # cut every array file of the newest checkpoint (step 12) in half
    for f in (out / "checkpoints" / "12").rglob("*"):
        if f.is_file() and f.stat().st_size > 64 and "params" in str(f):
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    proc = start(work, "out/damaged", "--resume")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "checkpoint step 12 is unreadable" in err
    assert list((out / "checkpoints").glob("unreadable-12-*")), "the damaged step is kept aside, not deleted"
    assert losses(out / "metrics.jsonl") == reference


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_sigterm_and_sigint_save_a_checkpoint_and_exit(work, sig, code):
    name = f"out/sig{code}"
    out = work / name
    proc = start(work, name, "--max_iters=100000", "--eval_interval=1000")
    wait_for_step(out / "metrics.jsonl", 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = max(r["step"] for r in read_metrics(out / "metrics.jsonl"))
    assert "checkpoint saved in" in err and f"at step {last}" in err
    assert (out / "checkpoints" / str(last)).is_dir()
    proc = start(work, name, "--resume", f"--max_iters={last + 3}")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-4:] == [last, last + 1, last + 2, last + 3]


def test_too_little_disk_space_is_refused_before_training(work, monkeypatch):
    usage = shutil.disk_usage(work)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1 << 20))
    tc = TrainConfig(dataset="synth", data_dir=str(work / "data"), out_dir=str(work / "out" / "full"), max_iters=2,
                     progress=False)
    with pytest.raises(UserError, match="MiB free"):
        train(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), tc)
    assert not (work / "out" / "full" / "checkpoints").exists()


def test_names_inside_a_checkpoint_never_become_write_paths(tmp_path):
    """A nanoGPT ckpt naming dataset '../../escape' is read without touching other paths, and
    convert writes exactly the destination it was given."""
    cfg = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)
    sd = torchref.GPT(cfg).state_dict()
    src = tmp_path / "in" / "ckpt.pt"
    src.parent.mkdir()
    torch.save({"model": sd, "model_args": cfg.to_dict(), "config": {"dataset": "../../escape", "out_dir": "/"}}, src)
    load_any(src)
    before = {p for p in tmp_path.parent.rglob("*")}
    proc = launch.run([sys.executable, str(ROOT / "scripts" / "convert.py"), str(src), str(tmp_path / "o.safetensors")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    created = {p for p in tmp_path.parent.rglob("*")} - before
    assert created == {tmp_path / "o.safetensors"}, created
