"""The optimizers: nanoGPT's AdamW (the default), and Muon for the blocks' matrices beside an AdamW
group for the rest (--optimizer=muon), composed from optax pieces.

Muon follows Keller Jordan's published formulation (github.com/KellerJordan/Muon, muon.py),
written in float32 here and in torchref/optim.py alike: momentum buf = lerp(buf, g, 1 - beta),
Nesterov u = lerp(g, buf, beta), a quintic Newton-Schulz iteration (5 steps) on
u / (||u||_F + eps) that orthogonalises it, the update scaled by sqrt(max(1, fan_out / fan_in)),
and decoupled weight decay. With --muon_beta2 > 0, NorMuon (Li et al. 2025, arXiv:2510.05491, as
modded-nanogpt runs it): each orthogonalised matrix is divided per neuron (its rows, or its columns
when it has more columns than rows) by the root of an EMA of their mean squares, then rescaled to the
Frobenius norm it had before. optax.contrib.muon (bias-corrected Nesterov) and torch.optim.Muon
(bfloat16 Newton-Schulz) are different enough that neither could carry a 1e-5 parity claim.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxgpt.config import NS_COEFFS, NS_EPS, NS_GRAM_RESTART, NS_STEPS, TrainConfig


def lr_schedule(tc: TrainConfig) -> optax.Schedule:
    """Linear warmup from 0 to learning_rate, cosine decay to min_lr at decay_iters, then flat."""
    warmup = min(tc.warmup_iters, tc.decay_iters - 1)  # leave the cosine at least one step in tiny runs
    return optax.warmup_cosine_decay_schedule(0.0, tc.learning_rate, warmup, tc.decay_iters, tc.min_lr)


def lr_multiplier(tc: TrainConfig) -> optax.Schedule:
    """The schedule's shape, 0 .. 1: with Muon it multiplies every group's peak learning rate."""
    warmup = min(tc.warmup_iters, tc.decay_iters - 1)
    floor = tc.min_lr / tc.learning_rate if tc.learning_rate else 1.0
    return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, tc.decay_iters, floor)


def _path(keypath: tuple) -> str:
    return jax.tree_util.keystr(keypath, simple=True, separator=".").removesuffix(".value")


def decays(path: str) -> bool:
    """Weight decay on matrices and embeddings only (nanoGPT's rule: dim >= 2). Decided by
    name, because the stacked layers make LayerNorm scales 2-D too."""
    return path.removesuffix(".value").rsplit(".", 1)[-1] in ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
    """A tree of bools matching `params`: True where weight decay applies."""
    return jax.tree_util.tree_map_with_path(lambda p, _: decays(_path(p)), params)


def is_muon(path: str) -> bool:
    """Muon takes the 2-D matrices inside the blocks (stacked: h.<...>.kernel); embeddings, the
    head, gains and biases stay with AdamW, as Muon's authors prescribe."""
    return path.startswith("h.") and path.endswith(".kernel")


def muon_labels(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(lambda p, _: "muon" if is_muon(_path(p)) else "adamw", params)


def newton_schulz(G: jax.Array, steps: int = NS_STEPS) -> jax.Array:
    """Orthogonalise the last two axes of G (..., rows, cols) in float32: X / (||X||_F + eps), then
    X <- aX + (bA + cA^2)X with A = X X^T, on the wide orientation (transposed when rows > cols).
    A matrix at least twice as wide as tall takes the same iteration through its Gram matrix
    (_gram_iteration): fewer FLOPs, the same result to float32's rounding (tests/test_optim.py)."""
    a, b, c = NS_COEFFS
    X = G.astype(jnp.float32)
    tall = X.shape[-2] > X.shape[-1]
    if tall:
        X = jnp.swapaxes(X, -1, -2)
    X = X / (jnp.sqrt(jnp.sum(X * X, axis=(-2, -1), keepdims=True)) + NS_EPS)
    if X.shape[-1] >= 2 * X.shape[-2]:
        X = _gram_iteration(X, steps)
    else:
        for _ in range(steps):
            A = X @ jnp.swapaxes(X, -1, -2)
            B = b * A + (c * A) @ A
            X = a * X + B @ X
    return jnp.swapaxes(X, -1, -2) if tall else X


def _gram_iteration(X: jax.Array, steps: int) -> jax.Array:
    """Newton-Schulz on a wide X (r x n, n >= 2r) in r x r products. Each step is X <- P X with
    P = aI + bA + cA^2, a polynomial in A = X X^T, so P commutes with A and the next A is P A P: the
    steps run on A, and X is multiplied by the product of their P's. A is formed from X again every
    NS_GRAM_RESTART steps: carried through all five, its rounding compounded (jaxgpt's and torchref's
    parameters 1.7e-04 apart after 60 Muon steps, over parity's 1e-04; 1.3e-05 with the restart, as
    with the direct iteration). Muon's 128 x 512 updates at the CPU preset: 0.7x the time (BENCHMARKS.md
    "tenth lap")."""
    a, b, c = NS_COEFFS
    eye = jnp.eye(X.shape[-2], dtype=X.dtype)
    for first in range(0, steps, NS_GRAM_RESTART):
        A = X @ jnp.swapaxes(X, -1, -2)
        Q = P = a * eye + b * A + c * (A @ A)
        for _ in range(first + 1, min(first + NS_GRAM_RESTART, steps)):
            A = P @ (P @ A)
            P = a * eye + b * A + c * (A @ A)
            Q = P @ Q
        X = Q @ X
    return X


def _matrices(path: str, u: jax.Array) -> jax.Array:
    """A (stacked) Flax kernel u (L, in, out) as the matrices Muon orthogonalises, in torch's (out, in)
    orientation so both frameworks run the same arithmetic; c_attn's fused q, k, v are three matrices."""
    G = jnp.swapaxes(u, -1, -2)  # (L, out, in), torch's nn.Linear layout
    if path.endswith("attn.c_attn.kernel"):
        L, out3, fan_in = G.shape
        return G.reshape(L, 3, out3 // 3, fan_in)
    return G


def _neuron_axis(G: jax.Array) -> int:
    """NorMuon's reduction axis: the mean square is kept per row, or per column when columns outnumber rows."""
    return -1 if G.shape[-2] >= G.shape[-1] else -2


def normuon(O: jax.Array, second: jax.Array, beta2: float) -> tuple[jax.Array, jax.Array]:
    """NorMuon's step on orthogonalised matrices O (..., out, in): `second` (the EMA of each neuron's mean
    square) moves toward this step's, O is divided by its root per neuron and rescaled to O's own
    Frobenius norm -- so the update keeps Muon's size and only its share between neurons changes."""
    axis = _neuron_axis(O)
    n = O.shape[axis]
    mean_sq = jnp.mean(O * O, axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.sum(mean_sq, axis=(-2, -1), keepdims=True) * n)
    second = second + (1 - beta2) * (mean_sq - second)  # lerp(second, mean_sq, 1 - beta2)
    scale = jax.lax.rsqrt(jnp.maximum(second, 1e-10))
    new_norm = jnp.sqrt(jnp.sum(mean_sq * n * scale * scale, axis=(-2, -1), keepdims=True))
    return O * (scale * (norm / jnp.maximum(new_norm, 1e-10))), second


def muon_direction(path: str, u: jax.Array, second: jax.Array | None = None, beta2: float = 0.0
                   ) -> tuple[jax.Array, jax.Array | None]:
    """Muon's update for one (stacked) Flax kernel u (L, in, out): Newton-Schulz per matrix, NorMuon's
    per-neuron normalisation when `second` is given, scaled by sqrt(max(1, fan_out / fan_in))."""
    G = _matrices(path, u)
    O = newton_schulz(G)
    if second is not None:
        O, second = normuon(O, second, beta2)
    fan_out, fan_in = G.shape[-2:]
    return jnp.swapaxes(O.reshape(*u.shape[:-2], -1, u.shape[-2]), -1, -2) * max(1.0, fan_out / fan_in) ** 0.5, second


def orthogonalize(path: str, u: jax.Array) -> jax.Array:
    """Muon's update for one (stacked) Flax kernel u (L, in, out), without NorMuon."""
    return muon_direction(path, u)[0]


def second_moments(params: Any) -> Any:
    """NorMuon's state: zeros shaped like each matrix's per-neuron mean square."""
    def zeros(kp: tuple, p: jax.Array) -> jax.Array:
        G = _matrices(_path(kp), p)
        return jnp.zeros_like(jnp.mean(G, axis=_neuron_axis(G), keepdims=True))
    return jax.tree_util.tree_map_with_path(zeros, params)


class MuonState(NamedTuple):
    step: jax.Array
    momentum: Any


class NorMuonState(NamedTuple):
    step: jax.Array
    momentum: Any
    second: Any  # per-neuron EMA of the orthogonalised update's mean square


def muon(tc: TrainConfig) -> optax.GradientTransformation:
    """Muon for the stacked block kernels: momentum, Newton-Schulz (then NorMuon's normalisation with
    --muon_beta2 > 0), decoupled weight decay, all scaled by muon_lr times the schedule's multiplier.
    Without NorMuon the state is the plain MuonState, so earlier checkpoints restore unchanged."""
    beta, schedule, beta2 = tc.muon_momentum, lr_multiplier(tc), tc.muon_beta2

    def init(params: Any) -> MuonState | NorMuonState:
        step, momentum = jnp.zeros([], jnp.int32), jax.tree.map(jnp.zeros_like, params)
        return NorMuonState(step, momentum, second_moments(params)) if beta2 > 0 else MuonState(step, momentum)

    def update(grads: Any, state: MuonState | NorMuonState, params: Any = None) -> tuple[Any, MuonState | NorMuonState]:
        lr = tc.muon_lr * schedule(state.step)
        buf = jax.tree.map(lambda m, g: m + (1 - beta) * (g - m), state.momentum, grads)  # lerp(buf, g, 1 - beta)
        nesterov = jax.tree.map(lambda g, m: g + beta * (m - g), grads, buf)  # lerp(g, buf, beta)
        step = optax.safe_increment(state.step)
        if not isinstance(state, NorMuonState):
            updates = jax.tree_util.tree_map_with_path(
                lambda kp, u, p: -lr * (orthogonalize(_path(kp), u) + tc.weight_decay * p), nesterov, params)
            return updates, MuonState(step, buf)
        pairs = jax.tree_util.tree_map_with_path(lambda kp, u, s: muon_direction(_path(kp), u, s, beta2), nesterov,
                                                 state.second)
        direction, second = jax.tree.transpose(jax.tree.structure(nesterov), jax.tree.structure((0, 0)), pairs)
        updates = jax.tree.map(lambda o, p: -lr * (o + tc.weight_decay * p), direction, params)
        return updates, NorMuonState(step, buf, second)

    return optax.GradientTransformation(init, update)


def make_optimizer(tc: TrainConfig) -> optax.GradientTransformation:
    """nanoGPT's AdamW (decay on matrices and embeddings) or, with --optimizer=muon, Muon on the
    blocks' matrices beside that AdamW on the rest; gradient clipping over every parameter first."""
    if tc.optimizer == "muon":
        adamw = optax.adamw(lambda count: tc.learning_rate * lr_multiplier(tc)(count), b1=tc.beta1, b2=tc.beta2,
                            eps=1e-8, weight_decay=tc.weight_decay, mask=decay_mask)
        tx = optax.multi_transform({"adamw": adamw, "muon": muon(tc)}, muon_labels)
    else:
        tx = optax.adamw(lr_schedule(tc), b1=tc.beta1, b2=tc.beta2, eps=1e-8, weight_decay=tc.weight_decay,
                         mask=decay_mask)
    return optax.chain(optax.clip_by_global_norm(tc.grad_clip), tx) if tc.grad_clip > 0 else tx
