import jax
import numpy as np
import pytest
import torch
from flax import nnx

from jaxgpt import GPT, GPTConfig, UserError
from jaxgpt.sample import _generate, filter_probs, generate, pick
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


def test_compiled_once_per_shape(model):
    prompt = np.array([[1, 2, 3, 4]])
    generate(model, prompt, 12, key=jax.random.key(0))
    before = _generate._cache_size()
    generate(model, prompt + 1, 12, key=jax.random.key(5))
    assert _generate._cache_size() == before


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
