"""The optimizers: Muon's pieces against their PyTorch twins, the parameter groups, the schedule,
and nanoGPT's AdamW left as it was."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

import torchref
from formats.table import to_torch_state_dict
from jaxgpt import GPT, GPTConfig, TrainConfig
from jaxgpt.optim import is_muon, lr_multiplier, lr_schedule, make_optimizer, muon_labels, newton_schulz, orthogonalize
from torchref.optim import make_optimizer as torch_optimizer
from torchref.optim import newton_schulz as torch_newton_schulz
from torchref.optim import orthogonalize as torch_orthogonalize
from torchref.optim import set_lr

CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True, tie_embeddings=False)


@pytest.mark.parametrize("shape", [(32, 32), (96, 32), (32, 128), (3, 16, 16)])
def test_newton_schulz_matches_torch_and_orthogonalises(shape):
    g = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    ours = np.asarray(newton_schulz(jnp.asarray(g)))
    theirs = torch_newton_schulz(torch.from_numpy(g)).numpy()
    assert np.max(np.abs(ours - theirs)) < 1e-5, np.max(np.abs(ours - theirs))
    singular = np.linalg.svd(ours.reshape(-1, *shape[-2:]), compute_uv=False)
    # Keller Jordan's quintic leaves singular values near 1 (about 0.5 .. 1.5), not exactly 1
    assert singular.min() > 0.4 and singular.max() < 1.6, (singular.min(), singular.max())


@pytest.mark.parametrize("shape", [(32, 128), (128, 32), (2, 16, 64), (24, 48)])
def test_newton_schulz_through_the_gram_matrix_is_the_direct_iteration(shape):
    """A matrix twice as wide as tall (or tall) iterates on X X^T; the result is the direct iteration's."""
    from jaxgpt.config import NS_COEFFS, NS_EPS, NS_STEPS

    g = np.random.default_rng(1).normal(size=shape)
    X = g.swapaxes(-1, -2) if shape[-2] > shape[-1] else g  # float64: the iteration as written
    X = X / (np.sqrt(np.sum(X * X, axis=(-2, -1), keepdims=True)) + NS_EPS)
    a, b, c = NS_COEFFS
    for _ in range(NS_STEPS):
        A = X @ X.swapaxes(-1, -2)
        X = a * X + (b * A + c * A @ A) @ X
    direct = X.swapaxes(-1, -2) if shape[-2] > shape[-1] else X
    ours = np.asarray(newton_schulz(jnp.asarray(g, jnp.float32)))
    assert np.max(np.abs(ours - direct)) < 2e-6 * np.max(np.abs(direct)), np.max(np.abs(ours - direct))


@pytest.mark.parametrize("shape", [(2, 96, 32), (2, 32, 96), (3, 16, 16)])
def test_normuon_matches_torch_keeps_the_norm_and_evens_the_neurons(shape):
    from jaxgpt.optim import normuon
    from torchref.optim import normuon as torch_normuon

    rng = np.random.default_rng(2)
    axis = -1 if shape[-2] >= shape[-1] else -2
    ours = jnp.zeros_like(jnp.mean(jnp.zeros(shape), axis=axis, keepdims=True))
    theirs = torch.zeros(tuple(ours.shape))
    for step in range(3):
        O = rng.normal(size=shape).astype(np.float32) * rng.uniform(0.1, 3, size=shape[:-2] + (shape[-2], 1)).astype(np.float32)
        a, ours = normuon(jnp.asarray(O), ours, 0.95)
        b = torch_normuon(torch.from_numpy(O), theirs, 0.95).numpy()  # updates `theirs` in place
        np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(ours), theirs.numpy(), rtol=2e-5, atol=1e-9)
        # the update keeps each matrix's Frobenius norm; only its share between neurons changes
        np.testing.assert_allclose(np.linalg.norm(np.asarray(a), axis=(-2, -1)), np.linalg.norm(O, axis=(-2, -1)), rtol=1e-5)
        if step == 0:  # from zeros, the EMA is this step's mean square times (1 - beta2): every neuron alike
            rms = np.sqrt(np.mean(np.asarray(a) ** 2, axis=axis))
            np.testing.assert_allclose(rms / rms.mean(axis=-1, keepdims=True), np.ones_like(rms), rtol=1e-4)


def test_fused_qkv_is_orthogonalised_as_three_matrices():
    C = 16
    kernel = np.random.default_rng(1).normal(size=(2, C, 3 * C)).astype(np.float32)  # stacked (L, in, out)
    ours = np.asarray(orthogonalize("h.attn.c_attn.kernel", jnp.asarray(kernel)))
    for layer in range(2):
        weight = torch.from_numpy(np.ascontiguousarray(kernel[layer].T))  # torch's (3C, C)
        theirs = torch_orthogonalize("transformer.h.0.attn.c_attn.weight", weight).numpy().T
        assert np.max(np.abs(ours[layer] - theirs)) < 1e-5
        separate = [np.asarray(newton_schulz(jnp.asarray(kernel[layer][:, i * C:(i + 1) * C].T))).T for i in range(3)]
        np.testing.assert_allclose(ours[layer], np.concatenate(separate, axis=1), atol=1e-5)


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    params = nnx.state(GPT(CFG, rngs=nnx.Rngs(0)), nnx.Param)
    labels = {jax.tree_util.keystr(p, simple=True, separator="."): v
              for p, v in jax.tree_util.tree_leaves_with_path(muon_labels(params))}
    muon = sorted(k.removesuffix(".value") for k, v in labels.items() if v == "muon")
    assert muon == ["h.attn.c_attn.kernel", "h.attn.c_proj.kernel", "h.mlp.c_fc.kernel", "h.mlp.c_proj.kernel"]
    assert not is_muon("lm_head.kernel") and not is_muon("wte.embedding") and not is_muon("h.ln_1.scale")


def test_one_schedule_multiplies_both_groups():
    tc = TrainConfig(max_iters=100, warmup_iters=10, learning_rate=3e-3, min_lr=3e-4, muon_lr=0.05)
    for step in (0, 5, 10, 50, 99, 150):
        assert abs(float(lr_multiplier(tc)(step)) * tc.learning_rate - float(lr_schedule(tc)(step))) < 1e-9
    assert float(lr_multiplier(tc)(10)) == 1.0 and abs(float(lr_multiplier(tc)(200)) - 0.1) < 1e-7


def test_muon_steps_match_torchref_on_the_same_gradients():
    """Three steps of clip + Muon + AdamW from the same weights and gradients, both frameworks."""
    tc = TrainConfig(optimizer="muon", max_iters=10, warmup_iters=2, learning_rate=1e-3, muon_lr=0.05, weight_decay=0.1)
    model = GPT(CFG, rngs=nnx.Rngs(0))
    params = nnx.state(model, nnx.Param)
    tmodel = torchref.GPT(CFG)
    tmodel.load_state_dict(to_torch_state_dict(model))
    tx, topt = make_optimizer(tc), torch_optimizer(tmodel, tc)
    opt_state = tx.init(params)
    update = jax.jit(tx.update)  # one compilation instead of Newton-Schulz op by op
    rng = np.random.default_rng(2)
    for step in range(3):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.1, p.shape), jnp.float32), params)
        tgrads = to_torch_state_dict(nnx.merge(nnx.graphdef(model), grads))
        for name, p in tmodel.named_parameters():
            p.grad = tgrads[name].clone()
        updates, opt_state = update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        torch.nn.utils.clip_grad_norm_(tmodel.parameters(), tc.grad_clip)
        set_lr(topt, float(lr_schedule(tc)(step)), tc)
        topt.step()
    ours = to_torch_state_dict(nnx.merge(nnx.graphdef(model), params))
    worst = max(float((ours[k] - v).abs().max()) for k, v in tmodel.state_dict().items())
    assert worst < 1e-6, worst
