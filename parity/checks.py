"""The parity checks: each returns Results (parity/rows.py) that `python -m parity` tabulates
and tests assert.

Every check builds both models from the same weights (converted through formats/table.py)
and compares in float32 on CPU, where both frameworks are deterministic.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torchref
from formats.table import flat_params, from_torch_state_dict, to_torch_state_dict
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT
from parity import tolerances as tol
from parity.rows import Result, jax_logits, jit_forward, logits_diff, max_diff, synthetic_corpus
from parity.twins import jax_to_torch_model

# Small configs covering bias on/off, 1-4 layers; each is run at T < block_size and T == block_size.
CONFIGS: dict[str, GPTConfig] = {
    "L1-bias": GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True),
    "L2-nobias": GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False),
    "L3-bias": GPTConfig(block_size=48, n_layer=3, n_head=3, n_embd=48, dropout=0.0, bias=True),
    "L4-nobias": GPTConfig(block_size=64, n_layer=4, n_head=4, n_embd=64, dropout=0.0, bias=False),
}


def _cases() -> Iterator[tuple[str, GPTConfig, int]]:
    for name, cfg in CONFIGS.items():
        for T in (cfg.block_size // 2 + 3, cfg.block_size):
            yield f"{name} T={T}", cfg, T


def sample_tokens(cfg: GPTConfig, T: int, seed: int = 0, batch: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, (batch, T), dtype=np.int64)


def torch_logits(model: torchref.GPT, idx: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(idx)).numpy()


def check_logits_jax_to_torch(cfg: GPTConfig, T: int, case: str) -> list[Result]:
    model = GPT(cfg, rngs=nnx.Rngs(1))
    model.eval()
    idx = sample_tokens(cfg, T)
    diff = logits_diff(jax_logits(model, idx), torch_logits(jax_to_torch_model(model), idx))
    return [Result("logits jax->torch", case, diff, tol.LOGITS_TOL)]


def check_logits_torch_to_jax(cfg: GPTConfig, T: int, case: str) -> list[Result]:
    torch.manual_seed(2)
    tmodel = torchref.GPT(cfg).eval()
    idx = sample_tokens(cfg, T, seed=1)
    diff = logits_diff(jax_logits(from_torch_state_dict(tmodel.state_dict(), cfg), idx), torch_logits(tmodel, idx))
    return [Result("logits torch->jax", case, diff, tol.LOGITS_TOL)]


def check_roundtrips(cfg: GPTConfig, case: str) -> list[Result]:
    model = GPT(cfg, rngs=nnx.Rngs(3))
    back = from_torch_state_dict(to_torch_state_dict(model), cfg)
    a, b = (flat_params(m) for m in (model, back))
    jtj = max(max_diff(a[k], b[k]) for k in a) if a.keys() == b.keys() else math.inf
    torch.manual_seed(4)
    sd = torchref.GPT(cfg).state_dict()
    sd2 = to_torch_state_dict(from_torch_state_dict(sd, cfg))
    tjt = max(max_diff(sd[k], sd2[k]) for k in sd) if sd.keys() == sd2.keys() else math.inf
    return [Result("roundtrip jax->torch->jax", case, jtj, tol.ROUNDTRIP_ATOL),
            Result("roundtrip torch->jax->torch", case, tjt, tol.ROUNDTRIP_ATOL)]


def check_param_counts(cfg: GPTConfig, case: str) -> list[Result]:
    j = GPT(cfg, rngs=nnx.Rngs(0))
    t = torchref.GPT(cfg)
    diff = max(abs(j.num_params(ne) - t.num_params(ne)) for ne in (True, False))
    return [Result("param count diff", case, float(diff), 0.0)]


def expected_init_std(torch_name: str, cfg: GPTConfig) -> float | None:
    """nanoGPT's init: N(0, 0.02), residual projections N(0, 0.02/sqrt(2*n_layer)); None = constant."""
    if torch_name.endswith("c_proj.weight"):
        return 0.02 / math.sqrt(2 * cfg.n_layer)
    if torch_name.endswith(("wte.weight", "lm_head.weight", "wpe.weight", "c_attn.weight", "c_fc.weight")):
        return 0.02
    return None


def check_init(cfg: GPTConfig, case: str) -> list[Result]:
    """Worst relative std error over the random tensors, and worst |diff| of LayerNorm/bias constants."""
    sd = to_torch_state_dict(GPT(cfg, rngs=nnx.Rngs(5)))
    worst_std, worst_const = 0.0, 0.0
    for name, value in sd.items():
        want = expected_init_std(name, cfg)
        if want is not None:
            worst_std = max(worst_std, abs(float(value.std()) - want) / want, abs(float(value.mean())) / want)
        elif name.endswith(".weight") and "ln_" in name:
            worst_const = max(worst_const, float((value - 1).abs().max()))
        else:
            worst_const = max(worst_const, float(value.abs().max()))
    return [Result("init std rel. error", case, worst_std, tol.INIT_STD_RTOL),
            Result("init LayerNorm/bias consts", case, worst_const, 0.0)]


TRAIN_CFG = GPTConfig(block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0, bias=True)


def _windows(data: np.ndarray, rng: np.random.Generator, accum: int, batch: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    ix = rng.integers(0, len(data) - T - 1, size=(accum, batch))
    win = np.stack([data[i:i + T + 1] for i in ix.reshape(-1)]).reshape(accum, batch, -1)
    return win[..., :-1], win[..., 1:]


def train_twins(steps: int, accum: int = 1, dtype: str = "float32", torch_side: bool = True, batch_size: int = 4,
                cfg: GPTConfig = TRAIN_CFG, **train: object):
    """Same initial weights, same batches, dropout 0: jaxgpt's jitted optax step (computing in
    `dtype`) and torchref's step (under torch.autocast for bfloat16), AdamW unless `train` says
    otherwise (optimizer='muon', ...). Returns the per-step losses of each, both final models'
    state_dicts and a held-out loss of jaxgpt's."""
    from jaxgpt.config import TrainConfig
    from jaxgpt.optim import lr_schedule, make_optimizer
    from jaxgpt.step import init_state, loss_fn, make_train_step
    from torchref.train import make_optimizer as torch_optimizer
    from torchref.train import train_step as torch_step

    tc = TrainConfig(**{**dict(batch_size=batch_size, gradient_accumulation_steps=accum, max_iters=steps, warmup_iters=10,
                               learning_rate=1e-3, min_lr=1e-4, seed=7, weight_decay=0.1, grad_clip=1.0, dtype=dtype,
                               remat="none"), **train})  # type: ignore[arg-type]
    graphdef, eval_graphdef, state = init_state(cfg, tc)
    tmodel = jax_to_torch_model(nnx.merge(graphdef, state.params))  # multiplying as jaxgpt's step does
    topt = torch_optimizer(tmodel, tc)
    step_fn, schedule = make_train_step(graphdef, make_optimizer(tc), tc), lr_schedule(tc)
    data, rng = synthetic_corpus(20_000), np.random.default_rng(0)
    jax_losses, torch_losses = [], []
    for step in range(steps):
        x, y = _windows(data, rng, accum, tc.batch_size, cfg.block_size)
        state, metrics = step_fn(state, jnp.asarray(x, jnp.int32), jnp.asarray(y, jnp.int32), step)
        jax_losses.append(metrics["loss"])
        if torch_side:
            torch_losses.append(torch_step(tmodel, topt, torch.from_numpy(x), torch.from_numpy(y), float(schedule(step)),
                                           tc, autocast=dtype == "bfloat16"))
    held_out = _windows(synthetic_corpus(20_000, seed=1), np.random.default_rng(1), 1, 32, cfg.block_size)
    eval_loss = float(jax.jit(loss_fn, static_argnums=(0, 5))(
        eval_graphdef, state.params, *(jnp.asarray(a[0], jnp.int32) for a in held_out), None, jnp.float32))
    return ([float(v) for v in jax.device_get(jax_losses)], torch_losses,
            to_torch_state_dict(nnx.merge(graphdef, state.params)), tmodel.state_dict(), eval_loss)


def check_training(steps: int = 60, accum: int = 2) -> list[Result]:
    """fp32: relative per-step loss difference and final parameter difference vs torchref."""
    jl, tl, jax_sd, torch_sd, _ = train_twins(steps, accum)
    worst_loss = max(abs(a - b) / abs(b) for a, b in zip(jl, tl, strict=True))
    worst_param = max(max_diff(jax_sd[k], v.detach()) for k, v in torch_sd.items())
    return [Result(f"train loss rel. diff, {steps} steps", f"L2-bias accum={accum}", worst_loss, tol.TRAIN_LOSS_RTOL),
            Result(f"train params after {steps} steps", f"L2-bias accum={accum}", worst_param, tol.TRAIN_PARAM_ATOL)]


def check_bf16_logits() -> list[Result]:
    """jaxgpt computing in bf16 vs torchref under torch.autocast(bfloat16), same fp32 weights:
    max|diff| relative to the largest fp32 logit (bf16 keeps 8 significant bits)."""
    out = []
    for name in ("L2-nobias", "L3-bias"):
        cfg = CONFIGS[name]
        model = GPT(cfg, rngs=nnx.Rngs(1))
        model.eval()
        out.append(Result("bf16 logits jax vs torch autocast, rel.", f"{name} T={cfg.block_size}",
                          bf16_logit_gap(model, sample_tokens(cfg, cfg.block_size)), tol.BF16_LOGITS_RTOL))
    return out


def bf16_logit_gap(model: GPT, idx: np.ndarray) -> float:
    """max|jaxgpt in bf16 - torchref under autocast(bf16)| / max|fp32 logit|, the same fp32 weights."""
    ref = jax_logits(model, idx)
    graphdef, state = nnx.split(model)
    bf16 = np.asarray(jit_forward(graphdef, jax.tree.map(lambda p: p.astype(jnp.bfloat16), state),
                                   jnp.asarray(idx, jnp.int32)).astype(jnp.float32))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        tb = jax_to_torch_model(model)(torch.from_numpy(idx)).float().numpy()
    return max_diff(bf16, tb) / float(np.abs(ref).max())


def check_bf16_training(steps: int = 100) -> list[Result]:
    """bf16 compute with fp32 master weights: per-step loss vs torchref's autocast twin."""
    jl, tl, _, _, _ = train_twins(steps, dtype="bfloat16")
    worst = max(abs(a - b) / abs(b) for a, b in zip(jl, tl, strict=True))
    return [Result(f"bf16 train loss rel. diff vs torch autocast, {steps} steps", "L2-bias", worst,
                   tol.BF16_TRAIN_LOSS_RTOL)]


def check_bf16_vs_fp32(steps: int = 300) -> list[Result]:
    """Training in bf16 reaches the fp32 run's held-out loss (relative difference)."""
    *_, bf16 = train_twins(steps, dtype="bfloat16", torch_side=False)
    *_, fp32 = train_twins(steps, dtype="float32", torch_side=False)
    return [Result(f"bf16 vs fp32 held-out loss after {steps} steps, rel.", f"L2-bias ({fp32:.4f} fp32)",
                   abs(bf16 - fp32) / fp32, tol.BF16_VS_FP32_RTOL)]


GEN_CFG = GPTConfig(block_size=64, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
SAMPLING = [dict(temperature=0.7), dict(temperature=1.0, top_k=10), dict(temperature=1.3, top_k=100),
            dict(temperature=0.9, top_p=0.8), dict(temperature=1.0, top_k=40, top_p=0.95)]


def _gen_pair(new_tokens: int, **sampling) -> tuple[np.ndarray, np.ndarray]:
    """The same weights and uniform draws through jaxgpt's and torchref's KV-cache decoders."""
    from jaxgpt.sample import generate
    from torchref.sample import generate as torch_generate

    model = GPT(GEN_CFG, rngs=nnx.Rngs(11))
    model.eval()
    prompt = sample_tokens(GEN_CFG, 5, seed=3, batch=2)
    u = np.random.default_rng(5).random((new_tokens, 2)).astype(np.float32)
    a = generate(model, prompt, new_tokens, uniforms=u, **sampling)
    b = torch_generate(jax_to_torch_model(model), torch.from_numpy(prompt), new_tokens,
                       uniforms=torch.from_numpy(u), **sampling).numpy()
    return a, b


def check_greedy(new_tokens: int = 500) -> list[Result]:
    a, b = _gen_pair(new_tokens, temperature=0.0)
    return [Result(f"greedy {new_tokens} tokens, mismatches", f"block {GEN_CFG.block_size}", float((a != b).sum()), 0.0)]


def check_sampled(new_tokens: int = 250) -> list[Result]:
    out = []
    for sampling in SAMPLING:
        a, b = _gen_pair(new_tokens, **sampling)
        case = ", ".join(f"{k}={v}" for k, v in sampling.items())
        out.append(Result(f"sampled {new_tokens} tokens, mismatches", case, float((a != b).sum()), 0.0))
    return out


def check_cache_vs_full_forward(new_tokens: int = 150) -> list[Result]:
    """Logits of every cached decode step vs a plain forward over the (cropped) context."""
    from jaxgpt.sample import generate

    model = GPT(GEN_CFG, rngs=nnx.Rngs(12))
    model.eval()
    bs = GEN_CFG.block_size
    out = []
    for P in (7, bs, bs + 9):  # short prompt (crosses block_size while decoding), full, overlong
        prompt = sample_tokens(GEN_CFG, P, seed=P, batch=2)
        tokens, logits = generate(model, prompt, new_tokens, temperature=1.0, key=jax.random.key(P), return_logits=True)
        # one compiled shape: causality lets a block that starts at the context start stand in for it
        ref = [jax_logits(model, tokens[:, max(0, L - bs):max(L, bs)])[:, min(L, bs) - 1] for L in range(P, P + new_tokens)]
        out.append(Result("cached decode vs full forward", f"prompt {P}, to {P + new_tokens} (block {bs})",
                          max_diff(logits, np.stack(ref)), tol.CACHE_LOGITS_ATOL))
    return out


def generation_checks() -> Iterator[Callable[[], list[Result]]]:
    yield check_greedy
    yield check_sampled
    yield check_cache_vs_full_forward


def training_checks() -> Iterator[Callable[[], list[Result]]]:
    yield check_training


def bf16_checks() -> Iterator[Callable[[], list[Result]]]:
    yield check_bf16_logits
    yield check_bf16_training
    yield check_bf16_vs_fp32


def model_checks() -> Iterator[Callable[[], list[Result]]]:
    """Every check of the model layer, as thunks (so callers can time or select them)."""
    for case, cfg, T in _cases():
        yield lambda cfg=cfg, T=T, case=case: check_logits_jax_to_torch(cfg, T, case)
        yield lambda cfg=cfg, T=T, case=case: check_logits_torch_to_jax(cfg, T, case)
    for name, cfg in CONFIGS.items():
        yield lambda cfg=cfg, name=name: check_roundtrips(cfg, name)
        yield lambda cfg=cfg, name=name: check_param_counts(cfg, name)
    big = GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384, dropout=0.0)  # init stats need big tensors
    yield lambda: check_init(big, "seed config")
