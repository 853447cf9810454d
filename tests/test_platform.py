"""Per-platform choices: no process-wide side effects, auto dtype/remat, CPU-only compiler
options that degrade to a notice, and the memory preflight."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError, platform
from jaxgpt.data import prepare_text
from jaxgpt.train import train
from parity.checks import synthetic_corpus

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only
ROOT = Path(__file__).resolve().parents[1]
MODEL = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0)


def _python(code: str, *args: str, cwd: Path = ROOT, timeout: int = 120) -> subprocess.CompletedProcess:
    """`python -c code args` in a fresh interpreter (what it imports and changes stays there); it must succeed."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def test_importing_every_jaxgpt_module_leaves_the_environment_unchanged():
    code = ("import os, pkgutil, importlib, json; before = dict(os.environ); import jaxgpt\n"
            "for m in pkgutil.iter_modules(jaxgpt.__path__): importlib.import_module('jaxgpt.' + m.name)\n"
            "import jax; jax.devices()\n"
            "after = dict(os.environ); print(json.dumps({k: [before.get(k), after.get(k)] for k in set(before) | set(after)"
            " if before.get(k) != after.get(k)}))")
    proc = _python(code)
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {}, "importing jaxgpt changed os.environ"


def test_a_cli_freezes_its_heap_before_main_and_at_exit_and_importing_jaxgpt_does_not():
    """The interpreter's shutdown collections cost every CLI process ~0.4 s, and full collections during a
    run walked the whole imported heap (jaxgpt.cli); the CLIs freeze it, importing the library never does."""
    code = ("import atexit, gc; seen = []; register = atexit.register\n"
            "atexit.register = lambda f, *a, **k: (seen.append(f), register(f, *a, **k))[1]\n"
            "import jaxgpt.cli, jaxgpt.train; imported = gc.freeze in seen or gc.get_freeze_count() > 0\n"
            "frozen = []\n"
            "try:\n    jaxgpt.cli.run(lambda argv: frozen.append(gc.get_freeze_count() > 0), [])\n"
            "except SystemExit as e:\n    print(imported, frozen, seen.count(gc.freeze), e.code)")
    proc = _python(code)
    assert proc.stdout.split() == ["False", "[True]", "1", "0"]


def test_auto_resolves_per_platform_and_explicit_flags_win():
    assert [platform.resolve_dtype("auto", p) for p in ("cpu", "gpu", "tpu")] == ["float32", "bfloat16", "bfloat16"]
    assert platform.resolve_dtype("float32", "tpu") == "float32" and platform.resolve_dtype("bfloat16", "cpu") == "bfloat16"
    assert platform.remat_candidates("auto", "gpu") == platform.remat_candidates("auto", "tpu") == ("none", "dots", "full")
    assert platform.remat_candidates("auto", "cpu") == ("none", "dots", "full")
    assert platform.remat_candidates("dots", "gpu") == ("dots",)
    assert [platform.eval_batch_limit(p) for p in ("cpu", "gpu", "tpu")] == [32, 256, 256]


def test_whole_split_batches_are_capped_per_platform_and_by_memory():
    from jaxgpt.config import GPTConfig
    from jaxgpt.evaluate import batch_size_for

    cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128)
    assert batch_size_for(cfg, 1742) == platform.eval_batch_limit() == 32  # this suite runs on CPU
    assert batch_size_for(cfg, 1742, limit=256) == 256 and batch_size_for(cfg, 10) == 10
    assert batch_size_for(cfg, 1742, devices=3) == 33  # a multiple of the devices


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("plat")
    prepare_text(synthetic_corpus(20_000).astype(np.uint8).tobytes(), root / "synth", "synthetic")
    return root


def _tc(data_dir, out_dir, **kw):
    return TrainConfig(**{**dict(dataset="synth", data_dir=str(data_dir), out_dir=str(out_dir), batch_size=8,
                                 max_iters=2, eval_iters=1, progress=False, plot=False), **kw})


@pytest.fixture(scope="module")
def needs(data_dir, tmp_path_factory) -> dict[str, int]:
    """Per-device bytes of the compiled step for each policy (XLA's memory analysis)."""
    root = tmp_path_factory.mktemp("needs")
    return {r: json.loads((Path(train(MODEL, _tc(data_dir, root / r, remat=r))["out_dir"]) / "config.json").read_text())
            ["memory"]["step_bytes_per_device"] for r in ("none", "dots", "full")}


def test_auto_remat_on_an_accelerator_takes_the_first_policy_that_fits(data_dir, tmp_path, monkeypatch, needs):
    assert needs["none"] > needs["full"], needs
    monkeypatch.setattr(platform, "remat_candidates", lambda requested, here: platform.REMAT_BY_MEMORY)
    for limit, want in [(needs["none"] * 2, "none"), (int(needs["full"] / platform.MEMORY_MARGIN) + 1, "full")]:
        if want == "full" and needs["dots"] <= limit * platform.MEMORY_MARGIN:
            want = "dots"
        monkeypatch.setattr(platform, "memory_limit", lambda device=None, limit=limit: (limit, "test limit"))
        summary = train(MODEL, _tc(data_dir, tmp_path / f"auto-{limit}"))
        assert summary["platform"]["remat"] == want, (limit, needs, summary["platform"])


def test_a_step_that_cannot_fit_stops_before_training_with_the_remedies(data_dir, tmp_path, monkeypatch, needs):
    monkeypatch.setattr(platform, "memory_limit", lambda device=None: (needs["full"] // 2, "test limit"))
    out = tmp_path / "too-big"
    with pytest.raises(UserError) as e:
        train(MODEL, _tc(data_dir, out, remat="auto"))
    msg = str(e.value)
    assert "iB per device but test limit is" in msg and "--batch_size=4 --gradient_accumulation_steps=2" in msg
    assert "--mesh_fsdp=2" in msg
    assert not out.exists(), "nothing is written when the step cannot fit"


FAULTS = """
import resource, sys, numpy as np
from jaxgpt import cli
if sys.argv[1] == "tuned":
    assert cli.tune_host_allocator().startswith("glibc malloc")
from jaxgpt import GPTConfig, TrainConfig
from jaxgpt.step import compile_train_step, init_state
cli.use_compile_cache(None)  # the test session's cache: the second process skips XLA
cfg = GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
tc = TrainConfig(batch_size=12, remat="none")
_, _, state = init_state(cfg, tc)
x = np.zeros((1, 12, 64), np.int32)
step = compile_train_step(cfg, tc, state, x, x, 0)[0]
for _ in range(8):
    state, m = step(state, x, x, 0)
m["loss"].block_until_ready()
per_step = []  # three windows, the quietest counts: a busy host (CI compiles beside the suite) adds stray faults
for _window in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        state, m = step(state, x, x, 0)
    m["loss"].block_until_ready()
    per_step.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
print(min(per_step))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the host allocator tuning is glibc (Linux) only")
def test_tuned_host_allocator_stops_the_step_from_faulting_its_buffers_back_in():
    """The CPU preset without remat has 42 MiB of temporaries, one buffer per step: glibc mmaps
    and unmaps it every step (page faults = its size / 4 KiB) unless tune_host_allocator ran. Each
    process reports its quietest of three 10-step windows (measured here: untuned ~13,100 in every
    window, tuned 0-0.1; one CI run under the compile tier's load once saw 1,858 in a single 20-step window)."""
    faults = {}
    for mode in ("untuned", "tuned"):
        proc = _python(FAULTS, mode, timeout=300)
        faults[mode] = float(proc.stdout.strip().splitlines()[-1])
    assert faults["untuned"] > 5000 and faults["tuned"] < 0.1 * faults["untuned"], faults


def test_bf16_matmuls_are_auto_only_on_a_cpu_with_amx_and_never_by_default(tmp_path, monkeypatch):
    from jaxgpt.presets import base_values
    amx, avx = tmp_path / "amx", tmp_path / "avx"
    amx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16 amx_tile\n\n")
    avx.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16\n\n")
    assert platform.cpu_has_amx_bf16(str(amx)) and not platform.cpu_has_amx_bf16(str(avx))
    assert not platform.cpu_has_amx_bf16(str(tmp_path / "absent"))
    for has_amx in (True, False):
        monkeypatch.setattr(platform, "cpu_has_amx_bf16", lambda has_amx=has_amx: has_amx)
        assert platform.resolve_matmul("auto", "float32", "cpu") == ("bfloat16" if has_amx else "float32")
        assert platform.resolve_matmul("auto", "float32", "gpu") == platform.resolve_matmul("auto", "float32", "tpu") == "float32"
        assert platform.resolve_matmul("bfloat16", "bfloat16", "cpu") == "float32"  # bf16 compute: nothing to round
        assert platform.resolve_matmul("bfloat16", "float32", "gpu") == "bfloat16"
        assert platform.resolve_matmul("float32", "float32", "cpu") == "float32"
    # nanoGPT's recipe multiplies in float32 on every CPU; the modern recipe asks for auto
    assert TrainConfig().matmul_precision == "float32" and "matmul_precision" not in base_values("cpu", "nanogpt")
    assert base_values("cpu", "modern")["matmul_precision"] == "auto"
    with pytest.raises(UserError, match="--matmul_precision must be one of"):
        TrainConfig(matmul_precision="bf16")


def test_batch_split_is_two_only_on_cpu_and_never_by_default():
    """--batch_split=0 (the modern recipe's): 2 on CPU when the rows divide evenly, 1 on an accelerator;
    an explicit split must divide a device's rows (one error line)."""
    from jaxgpt.presets import base_values

    assert platform.resolve_batch_split(0, "cpu", 24) == 2 and platform.resolve_batch_split(0, "cpu", 7) == 1
    assert platform.resolve_batch_split(0, "gpu", 64) == platform.resolve_batch_split(0, "tpu", 64) == 1
    assert platform.resolve_batch_split(3, "gpu", 24) == 3 and platform.resolve_batch_split(1, "cpu", 24) == 1
    with pytest.raises(UserError, match="--batch_split=5 must divide the 24 rows"):
        platform.resolve_batch_split(5, "cpu", 24)
    assert "batch_split" not in base_values("cpu", "nanogpt") and TrainConfig().batch_split == 1
    assert base_values("cpu", "modern")["batch_split"] == base_values("gpu", "modern")["batch_split"] == 0


def test_fast_attention_is_explicit_only_on_cpu_and_never_by_default():
    """--attention: auto keeps the kernels nanoGPT's numbers were proved with; fast (the modern recipe)
    spells the softmax out on CPU only; cudnn where cuDNN cannot run is one error line."""
    from flax import nnx

    from jaxgpt.presets import base_values
    from jaxgpt.step import init_state

    cfg = GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)
    assert platform.resolve_attention(cfg, "float32", "cpu") == platform.resolve_attention(cfg, "float32", "cpu", "auto") == "xla"
    assert platform.resolve_attention(cfg, "float32", "cpu", "fast") == "explicit"
    assert platform.resolve_attention(cfg, "bfloat16", "gpu", "fast") == platform.resolve_attention(cfg, "bfloat16", "gpu") == "cudnn"
    assert platform.resolve_attention(cfg, "bfloat16", "tpu", "fast") == "xla"
    assert platform.resolve_attention(cfg, "float32", "gpu", "explicit") == "explicit"
    with pytest.raises(UserError, match="--attention=cudnn needs a GPU"):
        platform.resolve_attention(cfg, "float32", "cpu", "cudnn")
    with pytest.raises(UserError, match="--attention must be one of"):
        TrainConfig(attention="flash")
    # nanoGPT's recipe keeps XLA's fused op; the modern recipe asks for fast, and the model takes the path
    assert TrainConfig().attention == "auto" and "attention" not in base_values("cpu", "nanogpt")
    assert base_values("cpu", "modern")["attention"] == base_values("gpu", "modern")["attention"] == "fast"
    for requested, kernel in (("fast", "explicit"), ("auto", "xla")):  # what a run on this CPU builds
        graphdef, _, state = init_state(cfg, TrainConfig(attention=requested))
        assert nnx.merge(graphdef, state.params).h.attn.attention == kernel


def test_auto_dtype_is_bf16_on_tpus_and_ampere_or_newer_gpus_and_float32_elsewhere():
    cases = {("cpu", "cpu"): "float32", ("tpu", "TPU v5 lite"): "bfloat16", ("gpu", "NVIDIA H100 80GB HBM3"): "bfloat16",
             ("gpu", "NVIDIA GeForce RTX 4090"): "bfloat16", ("gpu", "Tesla T4"): "float32",
             ("gpu", "Tesla V100-SXM2-16GB"): "float32"}
    assert {k: platform.resolve_dtype("auto", *k) for k in cases} == cases
    assert platform.resolve_dtype("bfloat16", "gpu", "Tesla T4") == "bfloat16"  # asked for: given
