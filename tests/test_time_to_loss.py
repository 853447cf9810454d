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


def _parsed(flags: list[str]) -> tuple:
    from jaxgpt.config import GPTConfig, TrainConfig, build, make_parser
    from jaxgpt.presets import base_values

    args = make_parser("t", GPTConfig, TrainConfig, presets=True).parse_args(["--preset=cpu", "--recipe=modern", *flags])
    base = base_values(args.preset, args.recipe)
    return build(GPTConfig, args, base), build(TrainConfig, args, base)


def test_each_leave_one_out_row_sets_exactly_one_part_of_the_recipe_back_and_every_part_has_a_row():
    import dataclasses

    from jaxgpt.config import GPTConfig, TrainConfig
    from jaxgpt.presets import PRESETS, RECIPE_FOR_PRESET, RECIPES

    recipe_model, recipe_train = _parsed([])
    nanogpt = {**dataclasses.asdict(GPTConfig()), **dataclasses.asdict(TrainConfig()), **PRESETS["cpu"]}
    recipe = {**RECIPES["modern"], **RECIPE_FOR_PRESET["modern", "cpu"]}
    undone = set()
    for name, flags in ttl.LEAVE_ONE_OUT.items():
        model, train = _parsed(flags)
        changed = {k for obj, ref in ((model, recipe_model), (train, recipe_train))
                   for k, v in dataclasses.asdict(obj).items() if v != getattr(ref, k)}
        assert len(changed) == len(flags), f"{name}: {flags} changed {changed}"
        for k in changed:
            assert getattr(model if hasattr(model, k) else train, k) == nanogpt[k], f"{name}: {k} is not nanoGPT's"
        undone |= changed
    # every model switch of the recipe and its optimizer is left out by some row (learning rates and momenta
    # are settings of an optimizer, not parts of their own; the CPU preset's depth is one), and no row sets
    # back what the recipe does not set
    parts = {k for k in recipe if k in GPTConfig.__dataclass_fields__} | {"optimizer"}
    assert parts <= undone, f"parts of the recipe without a row: {parts - undone}"
    assert undone <= set(recipe), f"rows changing what the recipe does not set: {undone - set(recipe)}"


def test_ratios_are_per_round_and_a_round_where_the_base_never_reached_the_loss_is_left_out():
    def run(reached: bool, seconds: float) -> dict:
        return {"reached": reached, "seconds": seconds if reached else None, "steps": 100 if reached else None,
                "final_val_loss": 1.8 if reached else 1.9}
    runs = {"base": [run(True, 100.0), run(False, 0), run(True, 80.0)],
            "fast": [run(True, 20.0), run(True, 25.0), run(True, 20.0)]}
    ratio = next(f for f in ttl._figures("t", runs, 1.85, "base") if f.name == "fast / base seconds")
    assert (ratio.low, ratio.high) == (0.2, 0.25) and "2 of 3 rounds" in ratio.note and "never reached" in ratio.note
