"""Jobs nobody watches: one writer per run folder, data checked before use, sizes checked before
allocation, --resume=auto (in-process here; the CLI and Cloud Storage cases are in test_unattended_cli.py)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError, paths
from jaxgpt.loader import check_dataset, read_meta
from jaxgpt.lock import LOCK_FILE, RunLock
from jaxgpt.rundir import resolve_resume
from tests import tiny


def _write_lock(folder: Path, **record) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    base = {"host": socket.gethostname(), "pid": os.getpid(), "started": "2026-11-29 10:00:00", "renewed": time.time()}
    (folder / LOCK_FILE).write_text(json.dumps({**base, **record}))


def test_only_real_storage_faults_are_retried_not_digits_in_a_url_or_an_objects_name():
    """A 403 whose URL held 429 in its port (the emulator's :44291) or an object named step-500 was
    retried as if the server had answered 429/500, with a notice per attempt."""
    assert paths.is_transient(OSError("503 Service Unavailable"))
    assert paths.is_transient(OSError("Too Many Requests: 429"))
    assert paths.is_transient(TimeoutError("read"))
    assert not paths.is_transient(OSError("Forbidden: http://127.0.0.1:44291/upload/storage/v1/b/x/o?name=run%2Floss.png"))
    assert not paths.is_transient(OSError("Forbidden: gs://bucket/step-500/loss.png"))
    assert not paths.is_transient(FileNotFoundError("gs://bucket/503/ckpt"))


def test_a_second_writer_is_refused_naming_the_holder(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _write_lock(tmp_path / "run", pid=holder.pid, proc_start=None)
        with pytest.raises(UserError, match=rf"being written by another run \(host {socket.gethostname()}, pid "
                                            rf"{holder.pid}, started 2026-11-29 10:00:00\)"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_dead_process_does_not_block_its_restart(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    _write_lock(tmp_path / "run", pid=int(dead.stdout))
    lock = RunLock(tmp_path / "run")
    with lock:
        assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists(), "the lock outlived its run"


def test_another_hosts_lock_is_stale_only_once_its_lease_lapsed(tmp_path):
    _write_lock(tmp_path / "run", host="tpu-worker-7", pid=1, renewed=time.time() - 10)
    with pytest.raises(UserError, match="host tpu-worker-7"):
        RunLock(tmp_path / "run", lease_s=60).acquire()
    _write_lock(tmp_path / "run", host="tpu-worker-7", pid=1, renewed=time.time() - 61)
    with RunLock(tmp_path / "run", lease_s=60):
        pass


@pytest.fixture()
def data(tmp_path) -> Path:
    return tiny.prepare(tmp_path) / "data" / "synth"


def test_a_truncated_data_file_is_refused_with_the_remedy(data):
    check_dataset(data, read_meta(data))
    (data / "train.bin").write_bytes((data / "train.bin").read_bytes()[:100])
    with pytest.raises(UserError, match=r"train.bin holds 100 bytes but meta.json says 18,000 tokens.*prepare the data again"):
        check_dataset(data, read_meta(data))


def test_a_changed_data_file_is_caught_by_its_hash_and_a_good_one_is_hashed_once(data, monkeypatch):
    calls = []
    real = paths.sha256
    monkeypatch.setattr(paths, "sha256", lambda p: calls.append(p) or real(p))
    check_dataset(data, read_meta(data))
    check_dataset(data, read_meta(data))
    assert len(calls) == 2, f"hashed {len(calls)} times for 2 files checked twice"  # the verdict is cached
    raw = bytearray((data / "val.bin").read_bytes())
    raw[17] ^= 1  # one flipped bit, same size
    (data / "val.bin").write_bytes(bytes(raw))
    with pytest.raises(UserError, match="val.bin does not match the sha256 in its meta.json"):
        check_dataset(data, read_meta(data))


def test_a_model_whose_state_cannot_fit_is_refused_before_anything_is_allocated(data, tmp_path):
    from jaxgpt.train import train

    huge = GPTConfig(block_size=64, n_layer=48, n_head=16, n_embd=16384, dropout=0.0)
    tc = TrainConfig(dataset="synth", data_dir=str(data.parent), out_dir=str(tmp_path / "out"), batch_size=2, max_iters=2)
    t = time.perf_counter()
    with pytest.raises(UserError, match=r"the train state \(parameters and optimizer state\) needs [0-9.]+ GiB per device "
                                        r"but available host memory is [0-9.]+ GiB .*--mesh_fsdp"):
        train(huge, tc)
    assert time.perf_counter() - t < 60
    assert not (tmp_path / "out" / "checkpoints").exists() and not (tmp_path / "out" / LOCK_FILE).exists()


def test_resume_auto_starts_fresh_without_a_checkpoint_but_not_over_another_runs_config(tmp_path):
    cfg, tc = GPTConfig(n_layer=1, n_head=2, n_embd=32), TrainConfig(out_dir=str(tmp_path / "run"))
    assert resolve_resume(tmp_path / "run", "auto", cfg, tc) is False  # nothing there: a new run
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(json.dumps({"model": cfg.to_dict(), "train": tc.to_dict()}))
    assert resolve_resume(tmp_path / "run", "auto", cfg, TrainConfig(out_dir=tc.out_dir, max_iters=9)) is False
    with pytest.raises(UserError, match=r"holds another run's config.json \(it differs in model.n_embd, train.seed\)"):
        resolve_resume(tmp_path / "run", "auto", GPTConfig(n_layer=1, n_head=2, n_embd=64),
                       TrainConfig(out_dir=tc.out_dir, seed=2))
    assert resolve_resume(tmp_path / "run", True) is True and resolve_resume(tmp_path / "run", False) is False
