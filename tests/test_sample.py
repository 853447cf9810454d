import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt import GPT, GPTConfig, UserError, sample
from jaxgpt.sample import filter_probs, generate, generate_chunks, pick
from torchref.sample import filter_probs as torch_filter_probs

CFG = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)


@pytest.fixture(scope="module")
def model():
    m = GPT(CFG, rngs=nnx.Rngs(0))
    m.eval()
    return m


def test_top_k_and_top_p_keep_the_right_tokens():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]], np.float32))
    assert (np.asarray(filter_probs(logits, 1.0, 2, 1.0)) > 0).tolist() == [[True, True, False, False]]
    assert (np.asarray(filter_probs(logits, 1.0, None, 0.7)) > 0).tolist() == [[True, True, False, False]]
    assert (np.asarray(filter_probs(logits, 1.0, None, 0.75)) > 0).tolist() == [[True, True, False, False]]
    assert (np.asarray(filter_probs(logits, 1.0, None, 0.76)) > 0).tolist() == [[True, True, True, False]]
    assert (np.asarray(filter_probs(logits, 1.0, None, 0.1)) > 0).tolist() == [[True, False, False, False]]
    np.testing.assert_allclose(np.asarray(filter_probs(logits, 1.0, None, 1.0)), np.exp(logits), rtol=1e-6)


def test_inverse_cdf_draw_and_greedy():
    logits = np.log(np.array([[0.5, 0.25, 0.15, 0.1]] * 4, np.float32))
    u = np.array([0.0, 0.49, 0.51, 0.999], np.float32)
    assert np.asarray(pick(logits, u, 1.0, None, 1.0)).tolist() == [0, 0, 1, 3]
    assert np.asarray(pick(logits, u, 0.0, None, 1.0)).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.5, None, 1.0), (1.0, 7, 1.0), (1.5, None, 0.6), (0.9, 40, 0.9)])
def test_filtering_matches_torchref(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(size=(4, 256)).astype(np.float32) * 3
    a = np.asarray(filter_probs(logits, temperature, top_k, top_p))
    b = torch_filter_probs(torch.from_numpy(logits), temperature, top_k, top_p).numpy()
    assert ((a > 0) == (b > 0)).all()
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_generation_is_seeded_and_batched(model):
    prompt = np.array([[1, 2, 3]] * 3)
    a = generate(model, prompt, 20, key=jax.random.key(1))
    assert a.shape == (3, 23) and (a[:, :3] == prompt).all()
    np.testing.assert_array_equal(a, generate(model, prompt, 20, key=jax.random.key(1)))
    assert not np.array_equal(a, generate(model, prompt, 20, key=jax.random.key(2)))
    assert len({tuple(r) for r in a}) > 1, "samples of one batch should differ"


def test_streaming_callback_sees_every_token_in_order(model):
    seen = []
    out = generate(model, np.array([[5, 6]]), 30, key=jax.random.key(0), on_token=lambda t: seen.append(int(t[0])))
    assert seen == out[0, 2:].tolist()


def test_compiled_once_per_prompt_bucket(model):
    generate(model, np.array([[1, 2, 3, 4]]), 12, key=jax.random.key(0))
    before = (sample._start._cache_size(), sample.chunk_program._cache_size())
    generate(model, np.array([[7, 8, 9, 10, 11, 12, 13]]), 12, key=jax.random.key(5))  # same bucket and chunk
    assert (sample._start._cache_size(), sample.chunk_program._cache_size()) == before


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_chunked_generation_equals_one_long_chunk_token_for_token(model, temperature):
    """Three chunk sizes, the same key: identical tokens, well past block_size (16)."""
    prompt = np.array([[1, 2, 3], [9, 8, 7]])
    runs = [np.concatenate(list(generate_chunks(model, prompt, 150, temperature=temperature, key=jax.random.key(3),
                                                chunk=chunk)), axis=1) for chunk in (256, 32, 5)]
    assert runs[0].shape == (2, 150)
    for other in runs[1:]:
        np.testing.assert_array_equal(runs[0], other)


@pytest.mark.parametrize("length", [1, 3, 9, 16, 20])
def test_prompt_buckets_give_the_tokens_of_exact_shapes(model, monkeypatch, length):
    prompt = np.random.default_rng(length).integers(0, 256, (2, length))
    padded = generate(model, prompt, 40, key=jax.random.key(1))
    monkeypatch.setattr(sample, "prompt_bucket", lambda n, bs: n if n <= bs else 0)  # prefill exactly the prompt
    np.testing.assert_array_equal(padded, generate(model, prompt, 40, key=jax.random.key(1)))


@pytest.mark.parametrize("kwargs, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_k=0), "top_k"), (dict(top_k=257), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
])
def test_bad_sampling_parameters_are_refused(model, kwargs, match):
    with pytest.raises(UserError, match=match):
        generate(model, np.array([[1]]), 3, **kwargs)


def test_empty_prompt_is_refused_by_the_library(model):
    with pytest.raises(UserError, match="prompt"):
        generate(model, np.zeros((1, 0), np.int64), 3)
