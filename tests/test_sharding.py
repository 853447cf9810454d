"""Multi-device and multi-process training on CPU: each case runs tests/mesh_worker.py in a
fresh process that sees N host devices (XLA reads the device count before jax starts)."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import launch, tiny

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

WORKER = Path(__file__).with_name("mesh_worker.py")
RTOL = 1e-5


def run_worker(*args: str, timeout: int = 240) -> dict:
    proc = launch.run([sys.executable, str(WORKER), *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("shard")
    return str(tiny.prepare(root) / "data")


@pytest.fixture(scope="module")
def single(data_dir, tmp_path_factory) -> list[float]:
    """8 steps on one device: the reference trajectory."""
    return run_worker("--devices", "1", "--max_iters", "8", "--data_dir", data_dir,
                      "--out_dir", str(tmp_path_factory.mktemp("one") / "run"))["losses"]


def assert_close(got: list[float], want: list[float]) -> None:
    rel = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    assert len(got) == len(want) and rel <= RTOL, f"losses differ by {rel:.2e} relative:\n{got}\n{want}"


@pytest.mark.parametrize("mesh", [("8", "1"), ("2", "4"), ("1", "8")], ids=["data8", "data2-fsdp4", "fsdp8"])
def test_losses_agree_across_meshes(data_dir, tmp_path, single, mesh):
    out = run_worker("--devices", "8", "--mesh_data", mesh[0], "--mesh_fsdp", mesh[1], "--max_iters", "8",
                     "--data_dir", data_dir, "--out_dir", str(tmp_path / "run"))
    assert out["devices"] == 8
    assert_close(out["losses"], single)


def test_parameters_and_optimizer_state_are_really_sharded():
    code = textwrap.dedent("""
        import os; os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
        import jax
        from jaxgpt import GPTConfig, TrainConfig
        from jaxgpt.sharding import make_mesh
        from jaxgpt.step import init_state
        cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)
        _, _, state = init_state(cfg, TrainConfig(), make_mesh(2, 4))
        kernel = state.params["h"]["mlp"]["c_fc"]["kernel"][...]
        mu = state.opt_state[1][0].mu["h"]["mlp"]["c_fc"]["kernel"][...]
        print(kernel.shape, kernel.addressable_shards[0].data.shape, kernel.sharding.spec)
        print(mu.addressable_shards[0].data.shape, state.params["wte"]["embedding"][...].addressable_shards[0].data.shape)
    """)
    proc = launch.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0] == "(2, 32, 128) (2, 8, 128) P(None, 'fsdp')", lines  # 32 / fsdp 4
    assert lines[1] == "(2, 8, 128) (64, 32)", lines  # Adam moment sharded too; wte (256, 32) -> rows / 4


@pytest.mark.parametrize("save, restore", [(("8", "2", "4"), ("1", "0", "1")), (("1", "0", "1"), ("8", "0", "4"))],
                         ids=["8dev-to-1dev", "1dev-to-8dev"])
def test_checkpoint_moves_between_topologies(data_dir, tmp_path, single, save, restore):
    run = str(tmp_path / "run")
    first = run_worker("--devices", save[0], "--mesh_data", save[1], "--mesh_fsdp", save[2], "--max_iters", "4",
                       "--data_dir", data_dir, "--out_dir", run, "--dump_params", str(tmp_path / "p.npz"))
    second = run_worker("--devices", restore[0], "--mesh_data", restore[1], "--mesh_fsdp", restore[2],
                        "--max_iters", "8", "--resume", "--load_params", str(tmp_path / "p.npz"),
                        "--data_dir", data_dir, "--out_dir", run)
    assert second["restored_step"] == 4 and second["restore_max_diff"] == 0.0
    assert_close(first["losses"] + second["losses"], single)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_on_localhost_match_one_process(data_dir, tmp_path, single):
    """jax.distributed over a loopback coordinator, 4 CPU devices per process, gloo collectives."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [launch.Popen([sys.executable, str(WORKER), "--devices", "4", "--max_iters", "8", "--data_dir", data_dir,
                               "--out_dir", str(tmp_path / "run"), "--coordinator", coordinator,
                               "--num_processes", "2", "--process_id", str(i)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert sorted(r["process"] for r in results) == [0, 1] and all(r["devices"] == 8 for r in results)
    for r in results:
        assert_close(r["losses"], single)
    metrics = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 8, "only process 0 writes metrics, once per step"
