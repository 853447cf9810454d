"""Plans by the real compilers (jaxgpt.plan.aot, jaxgpt.plan.targets): targets by name, the planner on this
host's CPU, and — where the plugin is installed (.ci/aot's .venv-tpu and .venv-gpu) — the seed
config, the modern recipe, a GPT-2-wide model with FSDP on a multi-host slice and a model that
cannot fit, compiled by XLA:TPU and XLA:GPU for chips this host does not have."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError
from jaxgpt.plan import targets
from tests import launch

ROOT = Path(__file__).resolve().parents[1]
HAS_TPU = importlib.util.find_spec("libtpu") is not None
HAS_GPU = any(ep.name.startswith("xla_cuda") for ep in metadata.entry_points(group="jax_plugins"))
needs_tpu = pytest.mark.skipif(not HAS_TPU, reason="XLA:TPU is not installed here: pip install -e '.[tpu]' "
                                                   "(CI compiles this tier in its own .venv-tpu: .ci/aot)")
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="XLA:GPU is not installed here: pip install -e '.[gpu]' "
                                                   "(CI compiles this tier in its own .venv-gpu: .ci/aot)")
# GPT-2 124M's width, heads, context and vocabulary; two layers: the stacked layers are one scanned
# body, so more of them add bytes (the FSDP arithmetic below), not a different program.
GPT2_WIDE = ["--n_layer=2", "--n_head=12", "--n_embd=768", "--block_size=1024", "--vocab_size=50304", "--dropout=0"]


def plan(script: str, *args: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[dict, subprocess.CompletedProcess]:
    """Run `script --compile_only --json args` in a subprocess; (its JSON, the process)."""
    proc = launch.run([sys.executable, str(ROOT / "scripts" / f"{script}.py"), "--compile_only", "--json", *args],
                          capture_output=True, text=True, timeout=900, cwd=cwd, env={**os.environ, **(env or {})})
    assert proc.returncode in (0, 1), f"{script} {args} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    report = json.loads(proc.stdout)
    assert (proc.returncode == 0) == report["fits"], proc.stderr[-2000:]
    return report, proc


def clean(report: dict) -> None:
    for name, p in report["programs"].items():
        assert p["host_callbacks"] == [], f"{name} calls back into Python on the host: {p['host_callbacks']}"
        assert p["fits"] and p["per_device_bytes"]["total"] <= report["device_memory_bytes"], (name, p["per_device_bytes"])


# --- targets by name (no plugin needed) ---

def test_cloud_tpu_and_gpu_names_resolve_to_their_real_layouts():
    cases = {"v4-8": (4, 1, "v4:2x2x1"), "v4-32": (16, 4, "v4:2x2x4"), "v5e-8": (8, 1, "v5e:2x4"),
             "v5litepod-16": (16, 4, "v5e:4x4"), "v5e-256": (256, 64, "v5e:16x16"), "v5p-8": (4, 1, "v5:2x2x1"),
             "v5p-128": (64, 16, "v5:4x4x4"), "v6e-8": (8, 1, "v6e:2x4"), "h100": (1, 1, "1x1x1"),
             "h200x8": (8, 1, "1x1x8"), "h100x16": (16, 2, "1x2x8"), "b200x8": (8, 1, "1x1x8"), "rtx4090": (1, 1, "1x1x1"),
             "rtx3090x2": (2, 1, "1x1x2"), "l4x4": (4, 1, "1x1x4"), "a10g": (1, 1, "1x1x1"), "a100-40gbx8": (8, 1, "1x1x8"),
             "t4": (1, 1, "1x1x1")}
    got = {n: (t.devices, t.hosts, t.topology) for n in cases for t in [targets.parse(n)]}
    assert got == cases
    assert targets.parse("v5e-8").host_bounds == (2, 4, 1) and targets.parse("v5e-16").host_bounds == (2, 2, 1)
    assert targets.parse("v5p-128").wrap == (True, True, True) and targets.parse("v5e-128").wrap == (False, True, False)
    for bad in ("v5e-12", "v4-6", "h100x12", "tpu", "a100x0", "rtx5090", "t4x12"):
        with pytest.raises(UserError, match="--target"):
            targets.parse(bad)


def test_every_chip_has_memory_peak_and_bandwidth_and_perf_reads_them():
    from jaxgpt.plan.perf import device_peak_flops

    for chip in targets.CHIPS.values():  # from a T4 (8 TFLOP/s, 320 GB/s) to a B200
        assert 0 < chip.usable() <= chip.memory_bytes and chip.peak_flops > 5e12 and chip.bandwidth > 2e11, chip
    kinds = {"TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e", "NVIDIA H100 80GB HBM3": "h100", "NVIDIA H200": "h200",
             "NVIDIA A100-SXM4-40GB": "a100-40gb", "NVIDIA A100-SXM4-80GB": "a100", "NVIDIA GeForce RTX 4090": "rtx4090",
             "NVIDIA GeForce RTX 3090": "rtx3090", "NVIDIA L4": "l4", "NVIDIA A10G": "a10g", "Tesla T4": "t4"}
    assert {k: getattr(targets.chip_for_kind(k), "name", None) for k in kinds} == kinds

    class Device:
        device_kind, platform = "TPU v5 lite", "tpu"
    assert device_peak_flops(Device()) == (197e12, "v5e datasheet")  # type: ignore[arg-type]


def test_gpu_usable_memory_follows_jax_allocator_fraction(monkeypatch):
    h100 = targets.CHIPS["h100"]
    assert h100.usable() == int(0.75 * h100.memory_bytes)
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")
    assert h100.usable() == int(0.5 * h100.memory_bytes)


# --- the planner on this host (CPU) and the CLI's refusals ---

def test_the_plan_on_this_host_compiles_the_runs_three_programs():
    from jaxgpt.plan.aot import plan_training, render

    cfg = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0)
    report = plan_training(cfg, TrainConfig(batch_size=4, gradient_accumulation_steps=2, remat="dots", dtype="float32"))
    assert report["target"] == "local" and report["fits"] and set(report["programs"]) == {"train_step", "eval_step",
                                                                                           "generate_chunk"}
    train = report["programs"]["train_step"]
    assert (train["remat"], train["batch_size"], train["gradient_accumulation_steps"], train["tokens_per_step"]) == \
           ("dots", 4, 2, 4 * 2 * 32)
    clean(report)
    assert "train step: remat=dots" in render(report) and "fits: yes" in render(report)


def test_batch_auto_splits_the_global_batch_into_micro_batches_per_device():
    """The one search's candidates, in order: under each remat policy (auto: none, dots, full) the global
    batch split into the fewest micro-steps, each micro-batch a multiple of the devices."""
    from jaxgpt.step import train_candidates

    got = [(c.remat, c.batch_size, c.gradient_accumulation_steps)
           for c in train_candidates(TrainConfig(batch_size=32, remat="auto"), "tpu", 8, batch_auto=True)]
    assert got == [(r, b, 32 // b) for r in ("none", "dots", "full") for b in (32, 16, 8)]
    assert [(c.remat, c.batch_size) for c in train_candidates(TrainConfig(batch_size=64, remat="dots"), "tpu", 8)] == \
           [("dots", 64)]
    with pytest.raises(UserError, match="cannot be split over 8 devices"):
        train_candidates(TrainConfig(batch_size=4), "tpu", 8, batch_auto=True)


@pytest.mark.slow
def test_target_flags_are_refused_with_one_line(tmp_path):
    def run(*args: str) -> subprocess.CompletedProcess:
        return launch.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                              text=True, timeout=120, cwd=tmp_path)
    cases = [(["--target=v5e-8"], "add --compile_only"), (["--target=v9-8", "--compile_only"], "unknown --target"),
             (["--json"], "add --compile_only")]
    if not HAS_TPU:
        cases.append((["--target=v5e-8", "--compile_only"], "pip install -e \".[tpu]\""))
    for args, message in cases:
        proc = run(*args)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], \
            (args, proc.stderr[-1500:])
    for args in (["--target=v5e-8"], ["--json"]):  # serve.py's plan flags are the same (jaxgpt.cli.add_plan_flags)
        proc = launch.run([sys.executable, str(ROOT / "scripts" / "serve.py"), "--checkpoint=absent", *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "add --compile_only" in lines[0], (args, proc.stderr[-1500:])
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists(), "a plan wrote something"


@pytest.mark.slow
def test_streaming_without_a_host_callback_prints_the_same_text(tmp_path):
    """GPU/TPU stream a chunk at a time (platform.streams_by_callback); the text is the CPU's."""
    from flax import nnx

    from formats.io import save_safetensors
    from jaxgpt import GPT

    save_safetensors(GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32), rngs=nnx.Rngs(0)), tmp_path / "m.safetensors", {})
    code = ("import sys, runpy; from jaxgpt import platform\n"
            "if sys.argv.pop(1) == 'chunks': platform.streams_by_callback = lambda p: False\n"
            f"sys.argv[0] = {str(ROOT / 'scripts' / 'generate.py')!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')")
    outs = [launch.run([sys.executable, "-c", code, how, "--checkpoint=m.safetensors", "--prompt=ab", "--max_new_tokens=40"],
                           capture_output=True, text=True, timeout=300, cwd=tmp_path) for how in ("callback", "chunks")]
    assert all(o.returncode == 0 for o in outs), outs[1].stderr[-2000:]
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout) > 2


# --- XLA:TPU ---

@pytest.mark.aot
@needs_tpu
def test_seed_config_fits_a_v5e_8_with_every_program_compiled_by_xla_tpu(tmp_path):
    report, _ = plan("train", "--target=v5e-8", cwd=tmp_path)
    assert (report["platform"], report["devices"], report["hosts"], report["device_kind"]) == ("tpu", 8, 1, "TPU v5 lite")
    train = report["programs"]["train_step"]
    assert (train["dtype"], train["remat"], train["mesh"], train["per_device_batch"]) == ("bfloat16", "none",
                                                                                          {"data": 8, "fsdp": 1}, 8)
    assert train["flops_source"] == "compiler" and report["step_time_lower_bound_s"] > 0
    # the compiler's FLOPs are the formula's within 25 % (attention masks, softmax, the optimizer on top)
    assert 1.0 <= train["flops_per_step"] / train["model_flops_per_step"] < 1.25, train
    clean(report)


@pytest.mark.aot
@needs_tpu
def test_modern_recipe_step_with_muon_compiles_for_a_v5e_8(tmp_path):
    report, _ = plan("train", "--target=v5e-8", "--recipe=modern", cwd=tmp_path)
    train = report["programs"]["train_step"]
    assert report["model"]["qk_norm"] and train["dtype"] == "bfloat16" and train["flops_source"] == "compiler"
    clean(report)


@pytest.mark.aot
@needs_tpu
def test_gpt2_wide_model_with_fsdp_on_a_multi_host_v5e_16(tmp_path):
    report, _ = plan("train", "--target=v5e-16", "--mesh_fsdp=16", "--batch_size=16", *GPT2_WIDE, cwd=tmp_path)
    assert (report["devices"], report["hosts"]) == (16, 4)
    train = report["programs"]["train_step"]
    assert train["mesh"] == {"data": 1, "fsdp": 16}
    params = 2 * 12 * 768 ** 2 + 50304 * 768 + 1024 * 768
    # float32 parameters and two Adam moments, sharded 16 ways: arguments per chip are a 16th of 12 bytes a parameter
    assert train["per_device_bytes"]["arguments"] < 12 * params / 16 * 1.2, train["per_device_bytes"]
    clean(report)


@pytest.mark.aot
@needs_tpu
def test_xla_tpu_refuses_an_oversized_model_in_one_line_and_fsdp_makes_room(tmp_path):
    big = ["--n_layer=8", "--n_head=32", "--n_embd=4096", "--block_size=128", "--dropout=0", "--remat=full",
           "--batch_size=8"]  # 1.6B parameters: 19.4 GB of float32 weights and Adam moments per chip, unsharded
    report, proc = plan("train", "--target=v5e-8", *big, cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert not report["fits"] and lines[-1].startswith("error: the train step") and "v5e-8" in lines[-1], proc.stderr[-2000:]
    report, _ = plan("train", "--target=v5e-8", *big, "--mesh_fsdp=8", cwd=tmp_path)
    assert report["fits"] and report["programs"]["train_step"]["mesh"] == {"data": 1, "fsdp": 8}


@pytest.mark.aot
@needs_tpu
def test_the_tpu_table_states_the_compilers_own_usable_memory(monkeypatch):
    """targets.CHIPS' usable bytes are what XLA:TPU itself allows one program (its out-of-memory
    message names the available HBM): a program of 64 GiB is refused on each generation."""
    import re

    import jax
    import jax.numpy as jnp
    from jax.sharding import SingleDeviceSharding

    jax.config.update("jax_platforms", "cpu")
    for key, value in targets.plugin_env(targets.parse("v5e-4")).items():
        monkeypatch.setenv(key, value)
    for name in ("v4-8", "v5e-4", "v5p-8", "v6e-4"):
        t = targets.parse(name)
        device = targets.devices(t)[0]
        x = jax.ShapeDtypeStruct((1 << 17, 1 << 17), jnp.float32, sharding=SingleDeviceSharding(device))
        with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as e:
            jax.jit(lambda a: a * 2).lower(x).compile()
        available = float(re.search(r"available HBM \(([\d.]+)G\)", str(e.value)).group(1))
        assert abs(t.chip.usable() / 2**30 - available) < 0.01, (name, t.chip.usable() / 2**30, available)


# --- XLA:GPU ---

@pytest.mark.aot
@needs_gpu
def test_seed_config_fits_h100x8_and_the_plan_names_each_programs_attention(tmp_path):
    report, _ = plan("train", "--target=h100x8", cwd=tmp_path)
    assert (report["platform"], report["devices"], report["device_kind"]) == ("gpu", 8, "NVIDIA H100 80GB HBM3")
    attention = {name: p["attention"] for name, p in report["programs"].items()}
    # dropout 0.2 spells training's attention out; evaluation (no dropout, bf16) takes cuDNN's fused kernel
    assert attention == {"train_step": "xla", "eval_step": "cudnn", "generate_chunk": "xla"}, attention
    clean(report)
    report, _ = plan("train", "--target=h100", "--dropout=0", cwd=tmp_path)
    assert report["programs"]["train_step"]["attention"] == "cudnn"
    clean(report)


@pytest.mark.aot
@needs_gpu
def test_modern_recipe_step_with_muon_compiles_for_h100_and_two_hosts_of_eight(tmp_path):
    report, _ = plan("train", "--target=h100", "--recipe=modern", cwd=tmp_path)
    assert report["model"]["pos_embedding"] == "rope" and report["programs"]["train_step"]["dtype"] == "bfloat16"
    clean(report)
    report, _ = plan("train", "--target=h100x16", "--mesh_fsdp=8", cwd=tmp_path)
    assert (report["devices"], report["hosts"], report["programs"]["train_step"]["mesh"]) == (16, 2, {"data": 2, "fsdp": 8})
    clean(report)


@pytest.mark.aot
@needs_gpu
def test_batch_auto_and_remat_auto_fit_a_small_allocator_and_a_big_model_is_refused(tmp_path):
    env = {"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.012"}  # ~0.96 GiB of an H100 for jaxgpt
    report, proc = plan("train", "--target=h100", "--dropout=0", "--batch_size=auto", cwd=tmp_path, env=env)
    train = report["programs"]["train_step"]
    assert report["fits"] and train["batch_size"] * train["gradient_accumulation_steps"] == 64, train
    assert train["batch_size"] < 64 or train["remat"] != "none", "the seed step (1.4 GiB at batch 64) cannot fit as is"
    big = ["--n_layer=8", "--n_head=32", "--n_embd=4096", "--block_size=128", "--dropout=0", "--batch_size=8"]
    report, proc = plan("train", "--target=h100x8", *big, cwd=tmp_path, env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.15"})
    line = proc.stderr.strip().splitlines()[-1]
    assert not report["fits"] and line.startswith("error: the train step (remat=") and "short" in line, proc.stderr[-2000:]
    report, _ = plan("train", "--target=h100x8", *big, "--mesh_fsdp=8", cwd=tmp_path, env={"XLA_PYTHON_CLIENT_MEM_FRACTION": "0.15"})
    assert report["fits"]


@pytest.mark.aot
@needs_gpu
def test_serve_plan_compiles_every_decode_width_over_the_kv_cache(tmp_path):
    from flax import nnx

    from formats.io import save_safetensors
    from jaxgpt import GPT

    cfg = GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128)
    save_safetensors(GPT(cfg, rngs=nnx.Rngs(0)), tmp_path / "m.safetensors", {})
    report, _ = plan("serve", "--checkpoint=m.safetensors", "--target=h100", "--slots=4", cwd=tmp_path)
    assert set(report["programs"]) == {"decode_1", "decode_2", "decode_4", "prefill"}
    assert report["kv_cache_bytes"] == 2 * 2 * 4 * 128 * 128 * 4  # k and v, layers, slots, positions, width, float32
    clean(report)


@pytest.mark.aot
@needs_gpu
@pytest.mark.parametrize("target, kind, capability", [("rtx4090", "NVIDIA GeForce RTX 4090", "8.9"),
                                                      ("a10g", "NVIDIA A10G", "8.6"), ("t4", "Tesla T4", "7.5")])
def test_the_gpus_people_own_compile_for_their_compute_capability(target, kind, capability, tmp_path):
    """XLA:GPU compiles the run's programs for each generation of the GPUs people own (Ada, Ampere, Turing),
    against the chip's usable memory and datasheet peak."""
    report, _ = plan("train", f"--target={target}", "--n_layer=2", "--n_head=4", "--n_embd=128", "--block_size=128",
                     "--batch_size=8", cwd=tmp_path)
    chip = targets.CHIPS[target]
    assert (report["device_kind"], report["device_memory_bytes"], report["peak_flops_per_device"]) == \
           (kind, chip.usable(), chip.peak_flops)
    assert f"{chip.gpu[-1][0]}.{chip.gpu[-1][1]}" == capability
    bf16 = capability >= "8.0"  # Turing has no bf16 tensor cores and no cuDNN flash attention: float32, XLA's kernel
    assert report["programs"]["train_step"]["dtype"] == ("bfloat16" if bf16 else "float32")
    assert report["programs"]["eval_step"]["attention"] == ("cudnn" if bf16 else "xla")
    clean(report)
