"""scripts/bench.py --validate (the checklist a GPU/TPU user runs first) end to end on CPU with a
tiny model: every row is printed and passes, so that command cannot crash on a new host."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests import launch

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

ROOT = Path(__file__).resolve().parents[1]
# tiny, and a learning rate that lets it pass the 200-step loss check meant for the seed config
TINY = ["--n_layer=1", "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=16", "--learning_rate=1e-2",
        "--warmup_iters=10", "--dropout=0"]


def bench(*args: str) -> tuple[str, list[dict]]:
    proc = launch.run([sys.executable, str(ROOT / "scripts" / "bench.py"), *TINY, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith('{"section"')]
    return proc.stdout, rows


def test_validate_prints_every_row_and_passes():
    table, rows = bench("--validate", "--validate_parity=model")
    sections = {r["section"] for r in rows}
    assert {"parity", "bf16 train step", "training", "generate"} <= sections, sections
    assert "FAIL" not in table and all(r["value"] == r["value"] for r in rows if r["section"] != "bf16 train step")
    assert any(r["name"].startswith("val loss after 200 steps") for r in rows)


def test_the_data_section_measures_the_prepare_against_the_plain_pool_and_the_loader():
    table, rows = bench("--sections=data", "--data_mb=3", "--data_workers=1,2", "--data_txt_mb=2",
                        "--data_shard_tokens=300000")
    names = {r["name"]: r for r in rows}
    for w in (1, 2):
        assert names[f"prepare.py text, {w} worker(s): tokens/s"]["value"] > 0
        assert 0 < names[f"prepare.py text, {w} worker(s): peak PSS of the process tree"]["value"] < 1431
    assert names["prepare.py / plain process pool, 2 workers: wall-clock ratio"]["value"] > 0
    assert any(n.startswith("loader local shards, epoch order") for n in names), table
    assert any(n.startswith("resume after a SIGKILL") for n in names), table
