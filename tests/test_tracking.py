"""Tracking and evaluation: TensorBoard curves read back with tensorboard's own reader (across a
SIGTERM and --resume), W&B offline runs (history, the run id kept on resume, a missing package),
and scripts/eval.py's bits per byte (by hand, across formats, against transformers' loss)."""
from __future__ import annotations

import glob
import json
import math
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from jaxgpt.rundir import read_metrics
from tests import launch, tiny

pytestmark = pytest.mark.slow  # subprocesses: the full suite only

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--dataset=synth", *tiny.TRAIN, "--eval_interval=8", "--log_interval=1", "--max_iters=24", "--plot=false"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("track")
    return tiny.prepare(w)


def run(work: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return launch.Popen([sys.executable, str(ROOT / "scripts" / "train.py"), *FLAGS, *args], cwd=work,
                            env={**os.environ, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def interrupted_then_resumed(work: Path, out: str, *args: str, env: dict | None = None) -> None:
    proc = run(work, f"--out_dir={out}", *args, env=env)
    while not any(r["step"] >= 12 for r in read_metrics(work / out / "metrics.jsonl")):
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 143, err[-2000:]
    proc = run(work, f"--out_dir={out}", "--resume", *args, env=env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def test_tensorboard_curves_continue_across_sigterm_and_resume_without_duplicates(work):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    interrupted_then_resumed(work, "out/tb", "--tensorboard")
    events = EventAccumulator(str(work / "out" / "tb" / "tb"), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    want = {"train/loss", "val/loss", "train/learning_rate", "perf/tokens_per_sec", "perf/mfu", "perf/step_time_ms",
            "train/grad_norm", "train/param_norm", "val/loss_whole_split", "val/bits_per_byte"}
    assert want <= tags, want - tags
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == list(range(1, 25)), f"train/loss logged at {steps}"
    assert [e.step for e in events.Scalars("val/loss")] == [8, 16, 24]
    rows = {r["step"]: r for r in read_metrics(work / "out" / "tb" / "metrics.jsonl")}
    assert all(abs(e.value - rows[e.step]["train_loss"]) < 1e-6 for e in events.Scalars("train/loss"))
    assert 0 < events.Scalars("perf/mfu")[0].value < 1
    hparams = glob.glob(str(work / "out" / "tb" / "tb" / "**" / "events.out.tfevents.*"), recursive=True)
    assert any(b"hparams" in Path(f).read_bytes() and b"model.n_embd" in Path(f).read_bytes() for f in hparams)


def _wandb_history(run_dir: Path) -> list[dict]:
    """The history records of an offline W&B run (its .wandb file: LevelDB-style log records of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    pos, block, buf, out = 7, 32768, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf, pos = buf + data[pos:pos + length], pos + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            if record.HasField("history"):
                out.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
            buf = b""
    return out


def test_wandb_offline_holds_the_history_and_resume_keeps_the_run_id(work):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    interrupted_then_resumed(work, "out/wb", "--wandb_log", "--wandb_project=jaxgpt-test", "--wandb_run_name=tiny", env=env)
    saved = json.loads((work / "out" / "wb" / "wandb_run.json").read_text())
    runs = sorted((work / "out" / "wb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(saved["id"]) for r in runs), (saved, runs)
    history = [h for r in runs for h in _wandb_history(r)]
    steps = sorted({h["_step"] for h in history if "train/loss" in h})
    assert steps == list(range(1, 25)), steps
    assert {"train/loss", "val/loss", "perf/tokens_per_sec", "train/grad_norm"} <= set().union(*history)


def test_wandb_missing_is_one_line_naming_the_install(work, tmp_path):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import sys\nclass NoWandb:\n    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'wandb' or name.startswith('wandb.'):\n            raise ImportError('no wandb')\n"
        "sys.meta_path.insert(0, NoWandb())\n")
    proc = run(work, "--out_dir=out/nowb", "--wandb_log", env={"PYTHONPATH": str(hook)})
    _, err = proc.communicate(timeout=300)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "pip install wandb" in lines[0], err[-2000:]


def evaluate(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return launch.run([sys.executable, str(ROOT / "scripts" / "eval.py"), *args, "--progress=false"], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_eval_bits_per_byte_by_hand_and_the_same_in_every_format(work, tmp_path):
    import jax
    from flax import nnx

    from formats.io import save_hf, save_jaxgpt, save_pt, save_safetensors
    from jaxgpt import GPT, ByteTokenizer, GPTConfig

    model = GPT(GPTConfig(block_size=8, n_layer=1, n_head=2, n_embd=16, dropout=0.0), rngs=nnx.Rngs(3))
    model.eval()
    text = "héllo, wörld — a tiny text to score.\n"
    ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
    by_hand = 0.0  # every token after the first, in windows of 8 predicted from inside its window
    for start in range(0, len(ids) - 1, 8):
        window = ids[start:start + 9]
        logits = np.asarray(model(jax.numpy.asarray(window[None, :-1])))[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        by_hand -= sum(logp[i, window[i + 1]] for i in range(len(window) - 1))
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    info = {"step": 5, "tokenizer": ByteTokenizer()}
    save_jaxgpt(model, tmp_path / "run", info)
    save_pt(model, tmp_path / "m.pt", info)
    save_safetensors(model, tmp_path / "m.safetensors", info)
    save_hf(model, tmp_path / "hf", info)
    results = []
    for ckpt in ("run", "m.pt", "m.safetensors", "hf"):
        proc = evaluate(ckpt, "--text=t.txt", "--json", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results.append(json.loads(proc.stdout))
    r = results[0]
    assert r["tokens"] == len(ids) - 1 and r["bytes"] == len(text.encode()) - 1
    assert abs(r["bits_per_byte"] - by_hand / math.log(2) / r["bytes"]) < 1e-5
    assert abs(r["perplexity"] / math.exp(by_hand / r["tokens"]) - 1) < 1e-5
    assert max(abs(x["bits_per_byte"] - r["bits_per_byte"]) for x in results) < 1e-5, results


def test_eval_on_a_hugging_face_bpe_model_converts_its_loss_by_the_token_byte_ratio(tmp_path):
    import torch

    from parity.hf_checks import make_hf_model, missing

    if missing():
        pytest.skip(f"needs transformers: {missing()}")
    hf = make_hf_model(tmp_path / "hf")
    text = "the king and the queen of my lord, what is thee? " * 20
    (tmp_path / "t.txt").write_text(text)
    proc = evaluate(str(tmp_path / "hf"), "--text=t.txt", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(proc.stdout)
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(tmp_path / "hf" / "tokenizer.json")).encode(text).ids
    block = r["block_size"]
    total = 0.0
    with torch.no_grad():  # transformers' own loss, on the same windows
        for start in range(0, len(ids) - 1, block):
            window = torch.tensor([ids[start:start + block + 1]])
            out = hf(window[:, :-1], labels=window[:, :-1].clone())
            logits = out.logits[0]
            total += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
    per_token = total / (len(ids) - 1)
    assert abs(r["loss"] - per_token) < 1e-4 * per_token
    assert abs(r["bits_per_byte"] - per_token * r["tokens"] / r["bytes"] / math.log(2)) < 1e-6


@pytest.mark.parametrize("args, message", [
    (["nope"], "does not exist"),
    (["RUN", "--text=missing.txt"], "cannot read --text"),
    (["RUN", "--text=t.txt", "--dataset=synth"], "give one or the other"),
    (["RUN", "--batch_size=-1"], "--batch_size"),
    (["RUN", "--split=test"], "invalid choice"),
])
def test_eval_bad_inputs_get_one_line_and_exit_2(work, args, message):
    out = work / "out" / "tb"
    if not out.exists():
        pytest.skip("needs the TensorBoard test's run folder (same module, runs first)")
    (work / "t.txt").write_text("hello")
    proc = evaluate(*[a.replace("RUN", str(out)) for a in args], cwd=work)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
