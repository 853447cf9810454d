"""benchmarks/time_to_loss.run_to_loss: the evaluation gate is an explicit parameter — passed on to the
run as --eval_below, and a run whose first evaluation is already under the target is refused (the step
that first reached it was never evaluated). The training process is replaced by one that writes the
metrics a run would: this is about the bookkeeping, not about training."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from benchmarks import time_to_loss as ttl


def _fake_run(evals: list[tuple[int, float]], seen: list[list[str]]):
    def run(command, **kw):
        seen.append(command)
        out = Path(next(a for a in command if a.startswith("--out_dir=")).split("=", 1)[1])
        out.mkdir(parents=True)
        (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "val_loss": v, "time": 100.0 + s, "eval_s": 1.0})
                                                   + "\n" for s, v in evals))
        return subprocess.CompletedProcess(command, 0, "", "")
    return run


def test_the_gate_is_passed_on_and_a_first_evaluation_already_under_the_target_is_refused(monkeypatch, tmp_path):
    seen: list[list[str]] = []
    monkeypatch.setattr(ttl.subprocess, "run", _fake_run([(50, 2.1), (60, 1.8)], seen))
    result = ttl.run_to_loss("jaxgpt", ["--preset=cpu"], 1.9, tmp_path, {}, "a", eval_below=2.2)
    assert "--eval_below=2.2" in seen[-1] and "--stop_loss=1.9" in seen[-1]
    assert result["reached"] and result["steps"] == 60
    monkeypatch.setattr(ttl.subprocess, "run", _fake_run([(50, 1.85)], seen))
    with pytest.raises(RuntimeError, match="evaluation gate opened too late"):
        ttl.run_to_loss("jaxgpt", ["--preset=cpu"], 1.9, tmp_path, {}, "b", eval_below=2.2)
    # without a gate every step is evaluated: a first evaluation under the target is simply the answer
    result = ttl.run_to_loss("jaxgpt", ["--preset=cpu"], 1.9, tmp_path, {}, "c")
    assert not any(a.startswith("--eval_below") for a in seen[-1]) and result["steps"] == 50
