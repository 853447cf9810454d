import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxgpt import GPT, GPTConfig, UserError
from jaxgpt.model import REMAT_POLICIES


def _idx(cfg, T, seed=0, B=2):
    return jnp.asarray(np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T)), jnp.int32)


def test_logits_shape_and_dtype(tiny_model, tiny_cfg):
    logits = tiny_model(_idx(tiny_cfg, 7))
    assert logits.shape == (2, 7, tiny_cfg.vocab_size) and logits.dtype == jnp.float32


def test_no_output_depends_on_a_future_token_by_gradients(tiny_model, tiny_cfg):
    """d logits[:, t] / d wpe[s] must be exactly zero for every s > t."""
    graphdef, state = nnx.split(tiny_model)
    idx = _idx(tiny_cfg, tiny_cfg.block_size)
    T = tiny_cfg.block_size

    @jax.jit  # one program for every t (t is traced), not an eager gradient per t
    def grad_at(state, idx, t):
        return jax.grad(lambda s: jnp.sum(jnp.take(nnx.merge(graphdef, s)(idx), t, axis=1) ** 2))(state)

    for t in (0, 5, T - 2):
        g = grad_at(state, idx, t)["wpe"]["embedding"][...]
        row_norms = np.abs(np.asarray(g)).sum(axis=1)
        assert (row_norms[t + 1:] == 0).all(), f"position {t} sees future positions {np.nonzero(row_norms[t + 1:])[0] + t + 1}"
        assert row_norms[t] > 0


def test_changing_future_tokens_leaves_past_logits_unchanged(tiny_model, tiny_cfg):
    a = _idx(tiny_cfg, 20, seed=1)
    b = a.at[:, 12:].set((a[:, 12:] + 7) % 256)
    forward = nnx.jit(lambda m, i: m(i))  # both inputs have one shape: one compile
    la, lb = forward(tiny_model, a), forward(tiny_model, b)
    np.testing.assert_array_equal(np.asarray(la[:, :12]), np.asarray(lb[:, :12]))
    assert not np.allclose(la[:, 12:], lb[:, 12:])


def _loss_and_grads(model, idx):
    graphdef, state = nnx.split(model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(idx[:, :-1])
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])

    return jax.jit(jax.value_and_grad(loss)), state


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_the_program_not_the_gradients(tiny_cfg, policy):
    idx = _idx(tiny_cfg, tiny_cfg.block_size + 1)
    base = GPT(tiny_cfg, rngs=nnx.Rngs(0))
    remat = GPT(tiny_cfg, rngs=nnx.Rngs(0), remat=policy)
    f0, s0 = _loss_and_grads(base, idx)
    f1, s1 = _loss_and_grads(remat, idx)
    assert f0.lower(s0).as_text() != f1.lower(s1).as_text(), "remat did not change the compiled program"
    (l0, g0), (l1, g1) = f0(s0), f1(s1)
    assert abs(float(l0) - float(l1)) <= 1e-6
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(g1), strict=True))
    assert worst <= 1e-6, f"remat={policy} changed gradients by {worst}"


def test_remat_policy_names():
    assert set(REMAT_POLICIES) == {"none", "full", "dots"}
    with pytest.raises(UserError, match="remat"):
        GPT(GPTConfig(n_layer=1, n_head=1, n_embd=8, block_size=4), rngs=nnx.Rngs(0), remat="everything")


def test_input_longer_than_block_size_is_refused(tiny_model, tiny_cfg):
    with pytest.raises(UserError, match="block_size"):
        tiny_model(_idx(tiny_cfg, tiny_cfg.block_size + 1))


@pytest.mark.parametrize("bad", [-1, 256, 1000])
def test_token_ids_outside_vocab_are_refused(tiny_model, bad):
    with pytest.raises(UserError, match="token ids"):
        tiny_model(jnp.array([[1, 2, bad]], jnp.int32))


def test_dropout_needs_a_key_in_train_mode_and_is_seeded():
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.5)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    idx = _idx(cfg, 16)
    with pytest.raises(UserError, match="key"):
        model(idx)
    forward = nnx.jit(lambda m, i, key: m(i, key=key))  # one compile, not one per eager call
    a, b = forward(model, idx, jax.random.key(1)), forward(model, idx, jax.random.key(1))
    c = forward(model, idx, jax.random.key(2))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(a, c)
    model.eval()
    np.testing.assert_array_equal(np.asarray(forward(model, idx, None)), np.asarray(forward(model, idx, None)))


@pytest.mark.parametrize("bias", [True, False])
def test_num_params_matches_the_closed_form(bias):
    L, C, V, T = 6, 384, 256, 256
    cfg = GPTConfig(block_size=T, vocab_size=V, n_layer=L, n_head=6, n_embd=C, bias=bias)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    per_layer = 12 * C * C + (13 * C if bias else 2 * C)  # 4 matmuls (+ biases) and 2 LayerNorms
    expected = L * per_layer + (2 * C if bias else C) + V * C  # + ln_f + tied wte
    assert model.num_params() == expected
    assert model.num_params(non_embedding=False) == expected + T * C
    modern = GPTConfig(block_size=T, vocab_size=V, n_layer=2, n_head=6, n_embd=C, bias=bias, norm="rmsnorm",
                       pos_embedding="rope", qk_norm=True, tie_embeddings=False)
    for c in (cfg, modern):  # the config's closed form (FLOPs, memory checks) counts what the model holds
        built = nnx.eval_shape(lambda c=c: GPT(c, rngs=nnx.Rngs(0)))
        assert [c.num_params(ne) for ne in (True, False)] == [built.num_params(ne) for ne in (True, False)], c


def test_num_params_equals_nanogpt_printout_for_shakespeare_char():
    """nanoGPT prints 'number of parameters: 10.65M' for its shakespeare_char run (vocab 65, no bias)."""
    cfg = GPTConfig(block_size=256, vocab_size=65, n_layer=6, n_head=6, n_embd=384, bias=False)
    model = nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0)))
    assert round(model.num_params() / 1e6, 2) == 10.65


def test_decode_with_a_position_per_sequence_equals_each_sequence_decoded_alone():
    """The server's batched step: one new token per sequence, each at its own position (B,), against
    the same sequences decoded one at a time with a scalar position; a RoPE model refuses it. One
    prefill of 15 tokens serves every row: a row at position p sees only the cache's first p keys."""
    model = GPT(GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0), rngs=nnx.Rngs(3))
    model.eval()
    graphdef, state = nnx.split(model)
    decode = jax.jit(lambda state, idx, cache, pos: nnx.merge(graphdef, state).decode(idx, cache, pos))
    rng = np.random.default_rng(0)
    prompts = jnp.asarray(rng.integers(0, 256, (3, 15)), jnp.int32)
    nxt = jnp.asarray(rng.integers(0, 256, (3, 1)), jnp.int32)
    positions = jnp.asarray([3, 7, 15], jnp.int32)
    _, cache = decode(state, prompts, model.init_cache(3), 0)
    logits, (k, v) = decode(state, nxt, cache, positions)
    for i in range(3):
        one_logits, one_cache = decode(state, nxt[i:i + 1], tuple(c[:, i:i + 1] for c in cache), positions[i])
        np.testing.assert_allclose(logits[i], one_logits[0], rtol=1e-5, atol=1e-6)
        p, others = int(positions[i]), np.arange(16) != int(positions[i])
        for new, one, old in zip((k, v), one_cache, cache, strict=True):  # (layer, row, head, slot, dim)
            # row i's new key and value land in slot p and nowhere else: every other slot is the prefill's, bit
            # for bit; slot p is the one-row decode's (to float rounding: the two shapes are different
            # programs, and LLVM below -O3 can round them differently)
            np.testing.assert_array_equal(new[:, i][:, :, others], old[:, i][:, :, others])
            np.testing.assert_allclose(new[:, i, :, p], one[:, 0, :, p], rtol=1e-5, atol=1e-6)
    rope = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, pos_embedding="rope"), rngs=nnx.Rngs(0))
    rope.eval()
    with pytest.raises(ValueError, match="learned positions"):
        rope.decode(nxt, rope.init_cache(3), positions)


def test_value_embeddings_mix_each_layers_table_into_its_values():
    """value_embeds=1 over 3 layers: layers 0 and 2 read table 0, layer 1 none. A table row moves the logits
    of the positions holding that token; with lambda = (1, 0) in every layer the model is the one without."""
    import dataclasses

    cfg = GPTConfig(block_size=16, n_layer=3, n_head=2, n_embd=16, dropout=0.0, value_embeds=1)
    assert [cfg.value_table(i) for i in range(3)] == [0, 1, 0]  # 1 = no table
    model = GPT(cfg, rngs=nnx.Rngs(0))
    model.eval()
    idx = jnp.asarray([[5, 9, 5, 7, 1, 2]])
    before = model(idx)
    model.ve.embedding[...] = model.ve.embedding[...].at[0, 9].add(1.0)
    moved = np.abs(np.asarray(model(idx) - before)).max(axis=-1)[0]
    assert moved[0] == 0 and moved[1] > 1e-3  # token 9 sits at position 1: nothing before it moves
    plain = GPT(dataclasses.replace(cfg, value_embeds=0), rngs=nnx.Rngs(0))
    plain.eval()
    model.h.attn.ve_lambda[...] = jnp.tile(jnp.asarray([1.0, 0.0]), (3, 1))
    weights = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, p in nnx.to_flat_state(nnx.state(plain, nnx.Param)):
        p[...] = weights[path][...]  # the same weights, less the value embeddings
    np.testing.assert_allclose(np.asarray(model(idx)), np.asarray(plain(idx)), atol=1e-6)


def _dot_operand_types(hlo: str) -> list[tuple[str, str]]:
    """(lhs, rhs) element types of every dot in an HLO module's text, each operand looked up in its
    own computation (parameter names repeat across fused computations)."""
    out = []
    for comp in re.split(r"\n(?=\S)", hlo):  # a computation starts at column 0
        types = dict(re.findall(r"(%[\w.-]+) = (\w+)\[", comp))
        for lhs, rhs in re.findall(r" dot\((%[\w.-]+), (%[\w.-]+)\)", comp):
            out.append((types.get(lhs, "?"), types.get(rhs, "?")))
    return out


def test_bf16_matmuls_multiply_every_linear_layer_in_bf16_forward_and_backward():
    """--matmul_precision=bfloat16 rounds the linear layers' inputs (and, backward, their output
    gradient) to bf16 with float32 sums: the logits move by about bf16's rounding, the gradients stay
    close, and XLA:CPU's compiled step keeps all three products of each layer in bf16 (given a
    transposed operand it multiplies in float32: layers.row_major)."""
    from jaxgpt.step import loss_fn
    cfg = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=False, tie_embeddings=False)
    f32, b16 = (GPT(cfg, rngs=nnx.Rngs(0), matmul=m) for m in ("float32", "bfloat16"))
    idx = _idx(cfg, 16, B=4)
    a, b = np.asarray(f32(idx)), np.asarray(b16(idx))
    gap = np.abs(a - b).max() / np.abs(a).max()
    assert 1e-5 < gap < 2e-2, gap  # rounded, by about bf16's precision (2**-8)
    y = jnp.roll(idx, -1, axis=1)
    graphdef, params = nnx.split(b16)
    step = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(graphdef, p, x, y, None, jnp.float32)))
    (loss_b, grads_b), (loss_f, grads_f) = step(params, idx, y), jax.jit(jax.value_and_grad(
        lambda p, x, y: loss_fn(nnx.graphdef(f32), p, x, y, None, jnp.float32)))(nnx.state(f32), idx, y)
    assert abs(float(loss_b) - float(loss_f)) < 1e-2 * float(loss_f)
    for gb, gf in zip(jax.tree.leaves(grads_b), jax.tree.leaves(grads_f), strict=True):
        assert np.abs(np.asarray(gb) - np.asarray(gf)).max() <= 0.05 * np.abs(np.asarray(gf)).max() + 1e-7
    dots = _dot_operand_types(step.lower(params, idx, y).compile().as_text())
    linears = cfg.n_layer * 4 + 1  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer; lm_head
    assert dots.count(("bf16", "bf16")) == 3 * linears, dots
    import torch  # the twin rounds the same layers (torchref.layers.Linear), and only with the switch

    import torchref
    for matmul, rounded in (("bfloat16", linears), ("float32", 0)):
        twin = [m.matmul for m in torchref.GPT(cfg, matmul=matmul).modules() if isinstance(m, torch.nn.Linear)]
        assert len(twin) == linears and twin.count("bfloat16") == rounded
    # the tied head multiplies by wte transposed, and one token is a (1, C) matmul: shapes XLA:CPU's bf16
    # kernel does not take, which must still run (a bf16 dot outside it aborted the process)
    tied = dataclasses.replace(cfg, tie_embeddings=True)
    f32, b16 = (GPT(tied, rngs=nnx.Rngs(0), matmul=m) for m in ("float32", "bfloat16"))
    graphdef, params = nnx.split(b16)
    loss, grads = jax.jit(jax.value_and_grad(lambda p, x, y: loss_fn(graphdef, p, x, y, None, jnp.float32)))(params, idx, y)
    assert abs(float(loss) - float(loss_fn(*nnx.split(f32), idx, y, None, jnp.float32))) < 1e-2 * float(loss)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    one = idx[:1, :1]
    assert np.abs(np.asarray(b16(one)) - np.asarray(f32(one))).max() < 2e-2 * np.abs(np.asarray(f32(one))).max()
    with pytest.raises(UserError, match="matmul must be one of"):
        GPT(cfg, rngs=nnx.Rngs(0), matmul="int8")
