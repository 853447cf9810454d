"""README's "GPT-2 124M, the whole way", rehearsed at CPU size: the same commands (prepare a jsonl corpus into a
bucket with a BPE tokenizer, the plan, `--preset=gpt2` with a tiny width and --resume=auto, eval with HellaSwag)
against the Cloud Storage emulator, on a corpus and tokenizer the test makes."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from benchmarks.gcs_emulator import available
from tests import launch
from tests.test_hellaswag import RAW

pytestmark = [pytest.mark.slow, pytest.mark.skipif(available() is not None, reason=f"the Cloud Storage emulator needs it: {available()}")]
ROOT = Path(__file__).resolve().parents[1]
TINY_WIDTH = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=64", "--vocab_size=512"]  # the preset, shrunk


def run(script: str, *args: str, cwd: Path, env: dict) -> str:
    proc = launch.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), *args], cwd=cwd, env=env,
                      capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, f"{script} {args}: {proc.stderr[-3000:]}"
    return proc.stdout


def test_the_gpt2_walkthrough_at_cpu_size_through_a_bucket(gcs, bucket, tmp_path):
    from parity.hf_checks import corpus_text, train_bpe

    (tmp_path / "tok").mkdir()
    train_bpe(tmp_path / "tok")  # a byte-level BPE tokenizer.json, as GPT-2's is made
    docs = [{"text": corpus_text(2000, seed)} for seed in range(100)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "hellaswag_val.jsonl").write_text("".join(json.dumps(d) + "\n" for d in RAW))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TENSORSTORE", "GOOGLE_"))}
    env["STORAGE_EMULATOR_HOST"] = gcs.url
    data = f"--data_dir={bucket}/data"
    run("prepare", "text", "--input", "corpus.jsonl", "--name", "fineweb-edu-10B", "--tokenizer=tok", data,
        "--val_tokens=3000", "--progress=false", cwd=tmp_path, env=env)
    out = f"--out_dir={bucket}/runs/gpt2"  # (the plan, step 3, is what batch_size=auto compiles first: not run twice)
    flags = ["--preset=gpt2", *TINY_WIDTH, data, out, "--max_iters=4", "--warmup_iters=1", "--eval_interval=2",
             "--val_tokens=2000", "--resume=auto", "--progress=false", "--plot=false"]
    first = run("train", *flags, cwd=tmp_path, env=env)
    config = json.loads(gcs.read(f"{bucket}/runs/gpt2/config.json"))
    tc = config["train"]
    assert f"batch_size=auto: {tc['batch_size']} x {tc['gradient_accumulation_steps']} micro-steps" in first, first[-2000:]
    assert tc["batch_size"] * tc["gradient_accumulation_steps"] == 512, "the preset's 512 sequences a step, split"
    assert (tc["learning_rate"], tc["data_order"], config["model"]["n_embd"]) == (6e-4, "epoch", 32)
    again = run("train", *flags, "--max_iters=6", cwd=tmp_path, env=env)  # the same command later: it continues
    assert "continuing the run" in again, again[-2000:]
    rows = [json.loads(line) for line in gcs.read(f"{bucket}/runs/gpt2/metrics.jsonl").decode().splitlines()]
    assert [r["step"] for r in rows if "val_loss" in r][-1] == 6
    scores = json.loads(run("eval", f"{bucket}/runs/gpt2", "--hellaswag=hellaswag_val.jsonl", data,
                            "--dataset=fineweb-edu-10B", "--max_tokens=2000", "--json", "--progress=false",
                            cwd=tmp_path, env=env))
    assert scores["hellaswag"]["examples"] == 5 and 0 <= scores["hellaswag"]["acc"] <= 1 and scores["tokens"] == 1999
