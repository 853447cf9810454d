"""Cloud TPU jobs, tested offline: run folders and data on gs:// against a local Cloud Storage
emulator (only STORAGE_EMULATOR_HOST is set; the CLIs do the rest), SIGKILL and SIGTERM with
--resume, storage faults; two hosts: tests/test_gcs_hosts.py (the fixtures `gcs` and `bucket` are in conftest.py)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.gcs_emulator import Emulator, available
from jaxgpt.cli import default_compile_cache
from tests import launch, tiny
from tests.fault_proxy import FaultProxy

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=f"the Cloud Storage emulator needs it: {available()}")]
ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset=synth", *tiny.TRAIN, "--eval_interval=4", "--log_interval=1", "--keep_checkpoints=2"]


def host_dir(root: Path, name: str) -> Path:
    """A 'host': its own working directory with its own local copy of the data."""
    d = root / name
    return tiny.prepare(d)


def env_for(gcs: Emulator, devices: int = 1) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORSTORE", "GOOGLE_"))}
    env.update(STORAGE_EMULATOR_HOST=gcs.url,
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}")
    return env


def train(cwd: Path, gcs: Emulator, *args: str, devices: int = 1) -> subprocess.Popen:
    return launch.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, *args], cwd=cwd,
                            env=env_for(gcs, devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, code: int = 0, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == code, f"exit {proc.returncode}, wanted {code}:\n{err[-3000:]}"
    assert "Traceback" not in err, err[-3000:]
    return err


def metrics(gcs: Emulator, url: str) -> list[tuple]:
    data = gcs.read(f"{url}/metrics.jsonl") or b""
    rows = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in rows]


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        assert proc.poll() is None, f"ended early: {proc.stderr.read()[-2000:]}"
        time.sleep(0.05)
    raise AssertionError("timed out")


def committed(gcs: Emulator, url: str, step: int) -> bool:
    return gcs.read(f"{url}/checkpoints/{step}/commit_success.txt") is not None


def test_a_run_on_gcs_writes_resumes_after_sigkill_and_sigterm_and_is_used_from_gcs(gcs, bucket, tmp_path):
    host = host_dir(tmp_path, "host")
    uninterrupted = train(host, gcs, "--max_iters=16", "--out_dir=out/reference")  # beside the run on gs://
    run = f"{bucket}/single"
    proc = train(host, gcs, "--max_iters=16", f"--out_dir={run}")
    wait_for(lambda: committed(gcs, run, 4) and any(s >= 6 for s, *_ in metrics(gcs, run)), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc = train(host, gcs, "--max_iters=16", f"--out_dir={run}", "--resume")
    wait_for(lambda: any(s >= 10 for s, *_ in metrics(gcs, run)), proc)
    proc.send_signal(signal.SIGTERM)
    err = finish(proc, 143)
    assert "checkpoint saved in gs://jaxgpt-test/single/checkpoints/" in err
    finish(train(host, gcs, "--max_iters=16", f"--out_dir={run}", "--resume"))
    finish(uninterrupted)
    reference = [tuple(json.loads(l)[k] if k != "val_loss" else json.loads(l).get(k) for k in ("step", "train_loss", "val_loss"))
                 for l in (host / "out" / "reference" / "metrics.jsonl").read_text().splitlines()]
    assert metrics(gcs, run) == reference, "the interrupted run on gs:// differs from the uninterrupted one"
    assert {"config.json", "loss.png", "metrics.jsonl"} <= set(gcs.names(run))
    assert not list(host.glob("gs*")), "a local folder named after the bucket was created"
    env = env_for(gcs)
    out = launch.run([sys.executable, str(ROOT / "scripts" / "generate.py"), f"--checkpoint={run}", "--prompt=the",
                          "--max_new_tokens=20", "--temperature=0"], cwd=host, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("the") and out.stderr.startswith("# gs://"), out.stderr[-2000:]
    assert len([l for l in out.stderr.splitlines() if l.strip()]) == 1, f"noise on stderr: {out.stderr}"
    conv = launch.run([sys.executable, str(ROOT / "scripts" / "convert.py"), run, f"{bucket}/single.safetensors",
                           "--verify"], cwd=host, env=env, capture_output=True, text=True, timeout=300)
    assert conv.returncode == 0, conv.stderr[-2000:]
    check = launch.run([sys.executable, "-m", "parity", f"--checkpoint={bucket}/single.safetensors", "--tokens=20",
                            "--json"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert check.returncode == 0 and json.loads(check.stdout)["passed"], check.stderr[-2000:]


def test_data_on_gcs_is_prepared_there_fetched_per_shard_once_and_checked_by_hash(gcs, bucket, tmp_path):
    """prepare.py text uploads each finished shard to the bucket; a run on gs:// data fetches a shard the
    first time it reads it (ranged reads into its cache), checks it against meta.json once, notices a
    damaged cached copy and fetches it again; the same losses either way."""
    host = tmp_path / "host"
    host.mkdir()
    gcs.write(f"{bucket}/raw/corpus.txt", tiny.corpus())  # the input in the bucket too, found by a glob
    env = {**env_for(gcs), "XDG_CACHE_HOME": str(tmp_path / "cache")}  # data cache only; compiled programs:
    compiled = f"--compile_cache={default_compile_cache()}"  # the session's
    prep = launch.run([sys.executable, str(ROOT / "scripts" / "prepare.py"), "text", "--input", f"{bucket}/raw/*.txt",
                       "--name", "synth", f"--data_dir={bucket}/data", "--shard_tokens=4000", "--progress=false"],
                      cwd=host, env=env, capture_output=True, text=True, timeout=300)
    assert prep.returncode == 0, prep.stderr[-2000:]
    meta = json.loads(gcs.read(f"{bucket}/data/synth/meta.json"))
    names = [s["name"] for s in meta["shards"]["train"]]
    assert len(names) == 5 and set(names) <= set(gcs.names(f"{bucket}/data/synth"))
    # one shard read through the loader: only that shard comes to this host
    probe = ("from jaxgpt import paths; paths.configure_gcs(); from jaxgpt.loader import open_dataset; "
             f"s = open_dataset('{bucket}/data', 'synth').stream('train'); print(s.read(9000, 10).tolist())")
    one = launch.run([sys.executable, "-c", probe], cwd=host, env=env, capture_output=True, text=True, timeout=120)
    assert one.returncode == 0, one.stderr[-2000:]
    cache = tmp_path / "cache" / "jaxgpt" / "data"
    assert sorted(p.name for p in cache.glob("*/synth/*.bin")) == ["train_000002.bin"]
    assert json.loads(one.stdout) == list(tiny.corpus()[2000 + 9000:2000 + 9010])  # after the val split's 2,000
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, compiled, "--max_iters=4", f"--data_dir={bucket}/data"]
    for run in ("a", "b"):
        proc = launch.run([*cmd, f"--out_dir=out/{run}"], cwd=host, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        [cached] = list(cache.glob("*/synth/train_000000.bin"))
        if run == "a":  # damage the cached copy: the next run must notice and fetch it again
            cached.write_bytes(b"\0" * cached.stat().st_size)
    import hashlib
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == meta["files"]["train_000000.bin"]
    a, b = ((host / "out" / r / "metrics.jsonl").read_text() for r in ("a", "b"))
    assert [json.loads(l)["train_loss"] for l in a.splitlines()] == [json.loads(l)["train_loss"] for l in b.splitlines()]


def test_a_prepare_killed_while_uploading_to_a_bucket_continues_from_the_bucket_to_the_same_objects(gcs, bucket, tmp_path):
    """The ledger lives in the bucket: a prepare SIGKILLed after some shards were uploaded, run again (from another
    working folder, as on another machine), uploads the rest, and every object equals an uninterrupted run's."""
    from benchmarks.data import make_corpus
    files = [str(f) for f in make_corpus(tmp_path / "corpus", 6, formats=("jsonl", "txt"))]
    env = env_for(gcs)

    def cmd(name: str) -> list[str]:
        return [sys.executable, str(ROOT / "scripts" / "prepare.py"), "text", "--input", *files, "--name", name,
                f"--data_dir={bucket}/prep", "--shard_tokens=400000", "--workers=1", "--progress=false"]
    whole = subprocess.run(cmd("whole"), env=env, capture_output=True, text=True, timeout=300)
    assert whole.returncode == 0, whole.stderr[-2000:]
    proc = subprocess.Popen(cmd("killed"), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
    wait_for(lambda: sum(n.startswith("train_") for n in gcs.names(f"{bucket}/prep/killed")) >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not gcs.read(f"{bucket}/prep/killed/meta.json")
    again = subprocess.run(cmd("killed"), env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path / "corpus")
    assert again.returncode == 0, again.stderr[-2000:]
    names = [n for n in gcs.names(f"{bucket}/prep/whole") if n.endswith(".bin")]
    assert len(names) > 6 and names == [n for n in gcs.names(f"{bucket}/prep/killed") if n.endswith(".bin")]
    for name in names:
        assert gcs.read(f"{bucket}/prep/whole/{name}") == gcs.read(f"{bucket}/prep/killed/{name}"), name


def test_storage_faults_are_retried_stalls_time_out_and_a_failed_save_keeps_the_last_checkpoint(gcs, bucket, tmp_path):
    """Through fault-injecting proxies in front of the emulator (loopback): (1) 6 % of requests answered
    429/500/503 or dropped (~25 faults of every kind over the ~430 requests of an 8-step run; each costs a
    client back-off of 1-2 s, so 15 % spent a minute waiting): the run completes, losses as without faults; (2) an endpoint that accepts
    connections but never answers: --resume ends in one line, within the timeouts, instead of hanging;
    (3) writes refused for good mid-run: one line naming the intact checkpoint, and --resume=auto
    continues from it once the storage answers again. The three are runs of their own, each behind its own
    proxy: (1) runs beside (2) and then (3), since (1) and (2) spend most of their time waiting (back-offs,
    timeouts); (2) is awaited before (3) starts, so the time it is held to is its own."""
    host = host_dir(tmp_path, "host")
    flaky, stalled, refusing = (FaultProxy(gcs.url, seed=3) for _ in range(3))

    def start(proxy: FaultProxy, run: str, *args: str) -> subprocess.Popen:
        env = {**env_for(gcs), "STORAGE_EMULATOR_HOST": proxy.url, "JAXGPT_GCS_TIMEOUT": "3"}
        return launch.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, f"--out_dir={bucket}/{run}", *args],
                            cwd=host, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        flaky.set(fail=0.045, drop=0.015)
        faulty = start(flaky, "faulty", "--max_iters=8")
        stalled.set(stall=1.0)
        t = time.time()
        gave_up = start(stalled, "stalled", "--max_iters=12", "--resume")
        finish(train(host, gcs, "--max_iters=8", "--out_dir=out/clean"))
        clean = [(r["step"], r["train_loss"]) for r in map(json.loads, (host / "out/clean/metrics.jsonl").read_text().splitlines())]

        err = finish(gave_up, 2, timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: cannot reach gs://jaxgpt-test/stalled"), err[-2000:]
        assert time.time() - t < 120, f"gave up only after {time.time() - t:.0f} s"

        proc = start(refusing, "refused", "--max_iters=16", "--resume=auto")
        wait_for(lambda: any(s >= 10 for s, *_ in metrics(gcs, f"{bucket}/refused")), proc)
        refusing.set(fail=1.0, codes=(403,), methods=("POST", "PUT"))
        err = finish(proc, 2, timeout=300)
        lines = [line for line in err.splitlines() if line.strip()]
        # the first write refused may be the checkpoint's or the metrics' (timing): either way one line saying what is intact
        assert len(lines) == 1 and lines[0].startswith("error: ") and "is intact" in lines[0], err[-2000:]
        refusing.set()
        out = finish(start(refusing, "refused", "--max_iters=16", "--resume=auto"), timeout=300)
        assert committed(gcs, f"{bucket}/refused", 16), out[-2000:]
        assert [s for s, *_ in metrics(gcs, f"{bucket}/refused")] == list(range(1, 17)), out[-2000:]

        finish(faulty, timeout=600)
        faults = {k: v for k, v in flaky.counts.items() if k != "requests"}
        kinds = {"status 429", "status 500", "status 503", "dropped"}
        assert sum(faults.values()) >= 10 and kinds <= faults.keys(), flaky.counts
        assert [(s, loss) for s, loss, _ in metrics(gcs, f"{bucket}/faulty")] == clean and committed(gcs, f"{bucket}/faulty", 8)
    finally:
        for proxy in (flaky, stalled, refusing):
            proxy.close()
