"""Property-based tests (hypothesis): the sampler's filters, the batch sampler's determinism, the
evaluation windows, and every reader fed truncated, bit-flipped, grown or oversized files — each
case loads or ends in one UserError, never another exception, a hang or an allocation past memory."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from formats.io import load_any, save_pt, save_safetensors
from jaxgpt import GPT, GPTConfig, UserError
from jaxgpt.data import prepare_text
from jaxgpt.loader import BatchSampler, eval_windows, num_windows, read_meta
from jaxgpt.sample import filter_probs

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FEW = settings(FUZZ, max_examples=12)  # ~1 s an example: a file written and loaded each time
slow = pytest.mark.slow  # the readers' fuzzing builds a model per example: the full suite only


@settings(max_examples=30, deadline=None)  # each new length compiles the filter again
@given(st.lists(st.floats(-30, 30), min_size=2, max_size=40), st.floats(0.05, 3.0), st.integers(1, 40),
       st.floats(0.01, 1.0))
@example([0.0, 2.220446049250313e-16], 1.0, 2, 0.5)  # logits apart, float32 probabilities tied
def test_filters_keep_a_valid_distribution_over_the_allowed_tokens(logits, temperature, top_k, top_p):
    x = jnp.asarray([logits], jnp.float32)
    k = min(top_k, len(logits))
    p = np.asarray(filter_probs(x, temperature, k, top_p))[0]
    kept = np.flatnonzero(p > 0)  # the filtered weights; pick() draws from their normalised cumulative sum
    assert len(kept) >= 1 and p.sum() > 0 and (p >= 0).all() and np.isfinite(p).all()
    scaled = np.asarray(x[0] / temperature)  # float32, as the filter sees them
    kth = np.sort(scaled)[-k]
    assert (scaled[kept] >= kth).all(), "a token below the k-th largest logit survived top-k"
    # top-p ranks probabilities: logits that differ can round to the same float32 probability, and
    # either of the tied tokens is then "the most likely" one
    unfiltered = np.asarray(filter_probs(x, temperature, k, 1.0))[0]
    assert unfiltered[kept].max() == unfiltered.max(), "the most likely token was filtered out"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fuzz") / "data" / "synth"
    text = ("the king and the queen of my lord " * 400).encode()
    prepare_text(text, folder, "synthetic")
    return folder


@FUZZ
@given(st.integers(0, 2**31 - 1), st.integers(0, 10**6), st.integers(2, 8), st.integers(2, 32), st.integers(1, 3))
def test_batches_depend_only_on_seed_split_and_step_and_rows_partition_them(corpus, seed, step, batch, block, accum):
    path = corpus / "train.bin"
    full = BatchSampler(path, block, batch, seed=seed, accum=accum).get(step)
    again = BatchSampler(path, block, batch, seed=seed, accum=accum).get(step)
    assert all(np.array_equal(a, b) for a, b in zip(full, again, strict=True))
    cut = batch // 2
    parts = [BatchSampler(path, block, batch, seed=seed, accum=accum, rows=rows).get(step)
             for rows in (slice(0, cut), slice(cut, batch))]
    assert np.array_equal(np.concatenate([parts[0][0], parts[1][0]], axis=1), full[0])


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 400), st.integers(1, 64))
def test_evaluation_windows_score_every_token_but_the_first_exactly_once(n, block):
    tokens = np.arange(n) % 251
    x, y, mask = eval_windows(tokens, block)
    assert x.shape[0] == num_windows(n, block) and int(mask.sum()) == n - 1
    assert sorted(y[mask].tolist()) == sorted(tokens[1:].tolist())
    assert np.array_equal(x[mask][1:], y[mask][:-1]) or block == 1  # inputs are the previous token inside windows


CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, bytes]:
    """One good file per format, as bytes."""
    d = tmp_path_factory.mktemp("good")
    model = GPT(CFG, rngs=nnx.Rngs(0))
    save_pt(model, d / "m.pt", {"step": 1})
    save_safetensors(model, d / "m.safetensors", {"step": 1})
    from formats.hf import write_hf
    (d / "hf").mkdir()
    write_hf(model, d / "hf", None)
    return {"pt": (d / "m.pt").read_bytes(), "safetensors": (d / "m.safetensors").read_bytes(),
            "config.json": (d / "hf" / "config.json").read_bytes(), "tokenizer.json": (d / "hf" / "tokenizer.json").read_bytes(),
            "hf_weights": (d / "hf" / "model.safetensors").read_bytes(), "tokenizer_config": (d / "hf" / "tokenizer_config.json").read_bytes()}


def damage(data: bytes, how: str, where: float, byte: int) -> bytes:
    i = min(len(data) - 1, int(where * len(data)))
    if how == "truncate":
        return data[:i]
    if how == "flip":
        return data[:i] + bytes([data[i] ^ (1 << (byte % 8))]) + data[i + 1:]
    if how == "grow":
        return data + bytes([byte]) * (1 + byte * 97)
    return data[:i] + bytes([byte]) * 16 + data[i + 16:]  # overwrite


HOW = st.sampled_from(["truncate", "flip", "grow", "overwrite"])


def loads_or_refuses(path: Path) -> None:
    try:
        load_any(path)
    except UserError as e:
        assert "\n" not in str(e).strip() and str(e), repr(e)


@slow
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
@FUZZ
@given(HOW, st.floats(0, 1), st.integers(0, 255))
def test_damaged_checkpoint_files_load_or_end_in_one_error(files, tmp_path, fmt, how, where, byte):
    path = tmp_path / f"x.{fmt}"
    path.write_bytes(damage(files[fmt], how, where, byte))
    loads_or_refuses(path)


@slow
@FUZZ
@given(st.sampled_from(["config.json", "tokenizer.json", "hf_weights", "tokenizer_config"]), HOW, st.floats(0, 1),
       st.integers(0, 255))
def test_damaged_hugging_face_folders_load_or_end_in_one_error(files, tmp_path, which, how, where, byte):
    folder = tmp_path / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    names = {"config.json": "config.json", "tokenizer.json": "tokenizer.json", "hf_weights": "model.safetensors",
             "tokenizer_config": "tokenizer_config.json"}
    for key, name in names.items():
        data = files[key]
        (folder / name).write_bytes(damage(data, how, where, byte) if key == which else data)
    loads_or_refuses(folder)


@slow
@FUZZ
@given(st.sampled_from(["n_embd", "n_layer", "vocab_size", "n_positions", "n_head"]), st.integers(2**20, 2**62))
@example("n_layer", 2**20)  # small enough to fit in memory: once listed 12 million missing names, in ~40 s
def test_a_config_claiming_a_huge_model_is_refused_before_allocation(files, tmp_path, field, value):
    folder = tmp_path / "hf"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    config = json.loads(files["config.json"])
    config[field] = value
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").write_bytes(files["hf_weights"])
    (folder / "tokenizer.json").write_bytes(files["tokenizer.json"])
    with pytest.raises(UserError) as refused:
        load_any(folder)
    assert len(str(refused.value)) < 1000, f"not one clear line: {len(str(refused.value))} characters"


@slow
@FEW
@given(st.sampled_from(["n_embd", "n_layer", "vocab_size", "block_size"]), st.integers(2**20, 2**62))
def test_a_safetensors_header_claiming_a_huge_model_is_refused_before_allocation(files, tmp_path, field, value):
    from safetensors.numpy import load_file, save_file

    src = tmp_path / "good.safetensors"
    src.write_bytes(files["safetensors"])
    args = {**CFG.to_dict(), field: value}
    path = tmp_path / "huge.safetensors"
    save_file(load_file(str(src)), str(path), metadata={"model_args": json.dumps(args)})
    with pytest.raises(UserError):
        load_any(path)


@slow
@FUZZ
@given(HOW, st.floats(0, 1), st.integers(0, 255))
def test_damaged_meta_json_is_one_error_line(corpus, tmp_path, how, where, byte):
    folder = tmp_path / "synth"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(corpus, folder)
    (folder / "meta.json").write_bytes(damage((corpus / "meta.json").read_bytes(), how, where, byte))
    try:
        from jaxgpt.loader import check_dataset
        check_dataset(folder, read_meta(folder))
    except UserError as e:
        assert "\n" not in str(e).strip()
