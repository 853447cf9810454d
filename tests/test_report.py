"""Parity for users' own checkpoints: python -m parity --checkpoint, the public check_checkpoint,
convert.py --verify, and their exit codes (0 pass, 1 a failing row or NaN/Inf, 2 unreadable)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import parity
import torchref
from jaxgpt import GPTConfig
from jaxgpt.data import prepare_text
from parity.rows import synthetic_corpus
from tests import launch, tiny

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

ROOT = Path(__file__).resolve().parents[1]
CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, bias=True, dropout=0.0)


def run(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return launch.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A 6-step jaxgpt run, a ckpt.pt saved by torchref's model, its .safetensors, a text file."""
    w = tmp_path_factory.mktemp("report")
    prepare_text(synthetic_corpus(10_000).astype(np.uint8).tobytes(), w / "data" / "synth", "synthetic")
    proc = run(str(ROOT / "scripts" / "train.py"), "--dataset=synth", *tiny.TRAIN, "--max_iters=6",
               "--eval_interval=3", "--plot=false", "--out_dir=run", cwd=w)
    assert proc.returncode == 0, proc.stderr[-2000:]
    torch.manual_seed(0)
    sd = torchref.GPT(CFG).state_dict()
    torch.save({"model": sd, "model_args": CFG.to_dict(), "iter_num": 3}, w / "ckpt.pt")
    assert run(str(ROOT / "scripts" / "convert.py"), "ckpt.pt", "model.safetensors", cwd=w).returncode == 0
    (w / "text.txt").write_text("the king and the queen of my lord\n")
    bad = {k: v.clone() for k, v in sd.items()}
    bad["transformer.h.0.mlp.c_fc.weight"][3, 5] = float("nan")
    torch.save({"model": bad, "model_args": CFG.to_dict()}, w / "nan.pt")
    (w / "garbage.pt").write_bytes(b"\x00not a checkpoint")
    return w


@pytest.mark.parametrize("checkpoint", ["run", "ckpt.pt", "model.safetensors"])
def test_own_checkpoints_pass_every_row_and_json_holds_them(work, checkpoint):
    proc = run("-m", "parity", "--checkpoint", checkpoint, "--text", "text.txt", "--json", cwd=work)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    names = [c["check"] for c in report["checks"]]
    assert report["passed"] and all(c["passed"] for c in report["checks"])
    assert names.count("logits jax vs torch") == 2  # random tokens and the text
    assert any(n.startswith("greedy decoding") for n in names) and any(n.startswith("sampled decoding") for n in names)
    assert "roundtrip jax -> torch -> jax" in names
    greedy = next(c for c in report["checks"] if c["check"].startswith("greedy"))
    assert f"{CFG.block_size + 32} tokens" in greedy["case"], "decoding runs past block_size"
    assert report["versions"]["jax"] and report["versions"]["torch"] and report["device"].startswith("cpu")


def test_a_nan_weight_fails_with_one_line_naming_the_tensor(work):
    proc = run("-m", "parity", "--checkpoint", "nan.pt", cwd=work)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stdout + proc.stderr
    assert "h.attn" not in lines[0] and "h.mlp.c_fc.kernel holds 1 non-finite value" in lines[0], lines[0]


def test_an_unreadable_checkpoint_exits_2_with_one_line(work):
    for path in ("garbage.pt", "missing.pt"):
        proc = run("-m", "parity", "--checkpoint", path, cwd=work)
        lines = [l for l in proc.stderr.splitlines() if l.strip()]
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and not proc.stdout, proc.stderr


def test_loosening_the_tolerance_is_said(work):
    report = parity.check_checkpoint(work / "ckpt.pt", tolerance=1e-3, tokens=20)
    assert report.passed and "loosened from 1e-05 to 0.001" in report.table()
    assert {r.tolerance for r in report.results if r.check.startswith("logits")} == {1e-3}


def test_check_checkpoint_is_callable_from_a_users_pytest(work):
    report = parity.check_checkpoint(work / "run", tokens=20)
    assert report.passed, report.table()
    assert [r.check for r in report.results][0] == "logits jax vs torch"


def test_convert_verify_passes_and_a_corrupted_conversion_is_removed(work, tmp_path):
    good = run(str(ROOT / "scripts" / "convert.py"), "ckpt.pt", str(tmp_path / "good.safetensors"), "--verify", cwd=work)
    assert good.returncode == 0 and (tmp_path / "good.safetensors").is_file(), good.stderr[-2000:]
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(  # every writer damages one weight on its way out
        "import formats.io as f\n"
        "def damaging(save):\n"
        "    def write(model, path, info):\n"
        "        kernel = model.h.mlp.c_fc.kernel\n"
        "        kernel[...] = kernel[...] + 1e-3\n"
        "        return save(model, path, info)\n"
        "    return write\n"
        "f.SAVERS = {kind: damaging(save) for kind, save in f.SAVERS.items()}\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(hook), "HOME": str(tmp_path)}
    for dst in ("bad.safetensors", "bad_run"):
        proc = run(str(ROOT / "scripts" / "convert.py"), "ckpt.pt", str(tmp_path / dst), "--verify", cwd=work, env=env)
        assert proc.returncode == 1 and "does not reproduce" in proc.stderr, proc.stdout[-2000:] + proc.stderr[-2000:]
        assert not (tmp_path / dst).exists(), f"{dst} was left behind"
    assert (tmp_path / "good.safetensors").is_file()


def test_logits_rows_measure_per_unit_of_logit_scale():
    """fp32 rounding grows with the logits: 1.5e-5 apart at +-20 is a few ulps and passes; the same
    gap at scale 1 is beyond the tolerance; below scale 1 the measure is plain max|diff|."""
    from parity.rows import logits_diff
    from parity.tolerances import LOGITS_TOL

    big = np.array([[20.0, -7.0, 3.0]])
    assert logits_diff(big + [[1.5e-5, 0, 0]], big) == pytest.approx(1.5e-5 / 20)
    assert 1.5e-5 / 20 < LOGITS_TOL < 1.5e-5
    small = np.array([[1.0, -0.5, 0.2]])
    assert logits_diff(small + [[1.5e-5, 0, 0]], small) == pytest.approx(1.5e-5)
    tiny = small / 10
    assert logits_diff(tiny + [[0, 2e-6, 0]], tiny) == pytest.approx(2e-6)
