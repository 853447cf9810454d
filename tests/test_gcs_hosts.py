"""Cloud TPU jobs on two hosts that share no disk (each process its own working directory), against
the local Cloud Storage emulator: a local out_dir is refused; on gs:// SIGKILL and preemption on
both hosts, and resuming a 2-host run on 1 host. A file of its own (tests/test_gcs.py has the
helpers) so that pytest-xdist runs it beside the single-host tests: both are long and mostly wait."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

from benchmarks.gcs_emulator import Emulator
from tests.test_gcs import committed, finish, host_dir, metrics, pytestmark, train, wait_for  # noqa: F401  (the same marks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_hosts(hosts: list[Path], gcs: Emulator, *args: str) -> list[subprocess.Popen]:
    coordinator = f"127.0.0.1:{_free_port()}"
    return [train(h, gcs, *args, f"--coordinator_address={coordinator}", "--num_processes=2", f"--process_id={i}",
                  devices=2) for i, h in enumerate(hosts)]


def test_two_hosts_without_a_shared_disk_refuse_a_local_out_dir(gcs, tmp_path):
    hosts = [host_dir(tmp_path, f"host{i}") for i in range(2)]
    procs = two_hosts(hosts, gcs, "--max_iters=4", "--out_dir=out/run")
    for p in procs:
        err = finish(p, 2)
        lines = [l for l in err.splitlines() if l.strip() and not l.startswith(("[Gloo]", "I1", "W1"))]
        assert len(lines) == 1 and "multi-host runs need a shared path" in lines[0], err[-2000:]
    assert not [p for h in hosts for p in (h / "out" / "run").rglob("*") if p.is_file()], "nothing is written"


def test_two_hosts_on_gcs_survive_sigkill_and_preemption_and_resume_on_two_and_on_one(gcs, bucket, tmp_path):
    """Two hosts with their own disks train on gs://: SIGKILL both after a checkpoint, resume on
    both, then SIGTERM reaches the hosts 0.1 s apart (preemption; JAX notices it up to ~0.6 s
    late, so the run is long enough to still be going): both stop at the same step, save it and
    exit 143. Resuming on both is bit-identical to an uninterrupted 2-host run; the last steps
    then run on one host with one device (another reduction order: within 1e-5)."""
    hosts = [host_dir(tmp_path, f"host{i}") for i in range(2)]
    same = ["--max_iters=120", "--eval_interval=40"]
    for p in two_hosts(hosts, gcs, *same, f"--out_dir={bucket}/straight"):
        finish(p)
    straight = [(s, loss) for s, loss, _ in metrics(gcs, f"{bucket}/straight")]
    run = f"{bucket}/two-hosts"
    procs = two_hosts(hosts, gcs, *same, f"--out_dir={run}")
    wait_for(lambda: committed(gcs, run, 40) and any(s >= 45 for s, *_ in metrics(gcs, run)), procs[0])
    for p in procs:
        p.send_signal(signal.SIGKILL)
        p.wait()
    killed_at = max(s for s, *_ in metrics(gcs, run))
    procs = two_hosts(hosts, gcs, *same, f"--out_dir={run}", "--resume")
    wait_for(lambda: any(s > killed_at for s, *_ in metrics(gcs, run)), procs[0])
    procs[0].send_signal(signal.SIGTERM)
    time.sleep(0.1)
    procs[1].send_signal(signal.SIGTERM)
    errs = [finish(p, 143) for p in procs]
    steps = {int(e.split(" at step ")[1].split(";")[0]) for e in errs}
    assert len(steps) == 1, f"the hosts stopped at different steps: {errs}"
    step = steps.pop()
    assert committed(gcs, run, step) and killed_at < step < 110, (killed_at, step)
    for p in two_hosts(hosts, gcs, f"--max_iters={step + 10}", "--eval_interval=40", f"--out_dir={run}", "--resume"):
        finish(p)
    got = [(s, loss) for s, loss, _ in metrics(gcs, run)]
    assert got == straight[:step + 10], "resume after SIGKILL and preemption is not bit-identical"
    finish(train(hosts[1], gcs, *same, f"--out_dir={run}", "--resume"))  # one host, one device
    got = [loss for _, loss, _ in metrics(gcs, run)]
    assert len(got) == 120 and got[:step + 10] == [loss for _, loss in straight[:step + 10]]
    assert max(abs(a - b) / b for a, (_, b) in zip(got, straight, strict=True)) <= 1e-5

