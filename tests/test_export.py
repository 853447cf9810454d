"""The accelerator programs, exported on this CPU host for cuda and tpu with jax.export: a
CPU-only construct, an op the target cannot lower or a host callback in a step fails here
instead of in a user's GPU or TPU job."""
from __future__ import annotations

import dataclasses

import pytest
from jax._src.cudnn import fused_attention_stablehlo

from jaxgpt import GPTConfig, TrainConfig
from jaxgpt.plan import export as ex
from jaxgpt.platform import resolve_attention

pytestmark = pytest.mark.slow  # subprocesses / emulators / transformers: the full suite only

SEED = GPTConfig()  # the seed config: 6 x 384, block 256, dropout 0.2
TC = TrainConfig(batch_size=64)
PLATFORMS = ("cuda", "tpu")


def _assert_clean(exported, what: str) -> None:
    calls = ex.custom_calls(exported)
    assert not calls & set(ex.HOST_CALLBACKS), f"{what} calls back into Python on the host: {calls}"


@pytest.fixture(scope="module")
def mesh():
    return ex.abstract_mesh(2, 4)  # data x fsdp over 8 devices that this host does not have


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("remat", ["none", "full"])
def test_train_step_exports_for_accelerators_on_a_data_fsdp_mesh(mesh, platform, dtype, remat):
    exported = ex.export_train_step(SEED, dataclasses.replace(TC, dtype=dtype), (platform,), mesh, remat)
    assert exported.platforms == (platform,) and exported.nr_devices == 8
    _assert_clean(exported, f"train step ({platform}, {dtype}, remat={remat})")
    text = exported.mlir_module()
    assert '"fsdp"' in text and '"data"' in text, "the mesh axes did not reach the exported program"
    assert ("bf16" in text) == (dtype == "bfloat16"), f"{dtype} compute not visible in the program"


@pytest.mark.parametrize("platform", PLATFORMS)
def test_eval_and_decode_steps_export_for_accelerators(mesh, platform):
    tc = dataclasses.replace(TC, dtype="bfloat16")
    _assert_clean(ex.export_eval_step(SEED, tc, (platform,), mesh), f"eval step ({platform})")
    for mode in ("cache", "mixed"):  # inside the context; the crossing chunk (cached + windowed steps)
        _assert_clean(ex.export_decode_step(SEED, 4, (platform,), "bfloat16", mode=mode), f"decode {mode} ({platform})")


def test_attention_path_per_config_in_the_cuda_programs(monkeypatch):
    """cuDNN flash attention where it applies (bf16, no attention dropout); the seed config's
    dropout 0.2 makes training spell attention out (jax.nn.dot_product_attention has no
    dropout); its dropout-free evaluation uses cuDNN again. JAX asks the local cuDNN library for
    its version while tracing; this host has none, so the test supplies 9.10."""
    monkeypatch.setattr(fused_attention_stablehlo, "check_cudnn_version", lambda: 91000)
    bf16 = dataclasses.replace(TC, dtype="bfloat16", batch_size=8)
    assert resolve_attention(SEED, "bfloat16", "gpu") == "cudnn"
    assert resolve_attention(SEED, "float32", "gpu") == "xla" and resolve_attention(SEED, "bfloat16", "tpu") == "xla"
    paths = {}
    for name, cfg in {"seed (dropout 0.2)": SEED, "dropout 0": dataclasses.replace(SEED, dropout=0.0)}.items():
        train = ex.export_train_step(cfg, bf16, ("cuda",), None, "none", attention="cudnn")
        evaluation = ex.export_eval_step(cfg, bf16, ("cuda",), None, attention="cudnn")
        paths[name] = (bool(ex.custom_calls(train) & set(ex.CUDNN_ATTENTION)),
                       bool(ex.custom_calls(evaluation) & set(ex.CUDNN_ATTENTION)))
    assert paths == {"seed (dropout 0.2)": (False, True), "dropout 0": (True, True)}, paths


MODERN = dataclasses.replace(SEED, dropout=0.0, pos_embedding="rope", norm="rmsnorm", qk_norm=True, activation="relu2",
                             tie_embeddings=False, zero_init_proj=True, logit_softcap=15.0)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_modern_recipe_exports_for_accelerators(mesh, platform):
    """The modern recipe's train step (NorMuon beside AdamW, bf16 compute) on the data x fsdp mesh, and
    its decode chunks: cached, crossing block_size, and the rolling RoPE cache ('cache' past it)."""
    tc = dataclasses.replace(TC, dtype="bfloat16", optimizer="muon", muon_beta2=0.95)
    exported = ex.export_train_step(MODERN, tc, (platform,), mesh, "none")
    assert exported.nr_devices == 8 and "bf16" in exported.mlir_module()
    _assert_clean(exported, f"modern train step ({platform})")
    for mode in ("cache", "mixed", "window"):
        _assert_clean(ex.export_decode_step(MODERN, 4, (platform,), "bfloat16", mode=mode), f"modern decode {mode}")
