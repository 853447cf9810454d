"""Parity of the modern recipe (`python -m parity --only recipe`): each model switch on its own and
all of them together, against torchref's twin of the switch — logits both ways, round trips,
parameter counts, greedy and sampled decoding, cached decode vs full forward — then Muon training,
RoPE past block_size (the exact crop, and the rolling cache against sliding-window attention), and
the bf16 rows of the full recipe."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

import torchref
from formats.table import flat_params, from_torch_state_dict, to_torch_state_dict
from jaxgpt.config import GPTConfig
from jaxgpt.model import GPT
from parity import tolerances as tol
from parity.checks import bf16_logit_gap, check_param_counts, sample_tokens, torch_logits, train_twins
from parity.rows import Result, jax_logits, logits_diff, max_diff
from parity.twins import jax_to_torch_model

BASE = GPTConfig(block_size=32, n_layer=2, n_head=4, n_embd=64, dropout=0.0, bias=False)
SWITCHES: dict[str, dict[str, Any]] = {
    "rope": dict(pos_embedding="rope"),
    "rmsnorm": dict(norm="rmsnorm"),
    "qk_norm": dict(qk_norm=True),
    "relu2": dict(activation="relu2"),
    "untied": dict(tie_embeddings=False),
    "zero_init_proj": dict(zero_init_proj=True),
    "softcap": dict(logit_softcap=15.0),
    "value_embeds": dict(value_embeds=1, n_layer=3),  # one table shared by layers 0 and 2; none in layer 1
    "modern": dict(pos_embedding="rope", norm="rmsnorm", qk_norm=True, activation="relu2", tie_embeddings=False,
                   zero_init_proj=True, logit_softcap=15.0, value_embeds=2),
}
MODERN = dataclasses.replace(BASE, **SWITCHES["modern"])
MUON = dict(optimizer="muon", muon_lr=0.02, weight_decay=0.0)


def _model(cfg: GPTConfig, seed: int, matmul: str = "float32", attention: str = "xla") -> GPT:
    """A random model whose zero-initialised projections are filled in, so every switch acts on the output."""
    model = GPT(cfg, rngs=nnx.Rngs(seed), matmul=matmul, attention=attention)
    if cfg.zero_init_proj:
        rng = np.random.default_rng(seed)
        for _, p in nnx.to_flat_state(nnx.state(model, nnx.Param)):
            if not np.any(p[...]):
                p[...] = jnp.asarray(rng.normal(0, 0.02, p.shape), p[...].dtype)
    model.eval()
    return model


def _torch_model(cfg: GPTConfig, seed: int) -> torchref.GPT:
    torch.manual_seed(seed)
    tmodel = torchref.GPT(cfg).eval()
    with torch.no_grad():
        for p in tmodel.parameters():
            if not p.any():
                p.normal_(0, 0.02)
    return tmodel


def check_switch(name: str, cfg: GPTConfig) -> list[Result]:
    """Logits jax->torch and torch->jax at T < and = block_size, both round trips, and which
    tensors each side initialises to zero (zero_init_proj)."""
    model, tmodel = _model(cfg, 1), _torch_model(cfg, 2)
    out = []
    for T in (cfg.block_size // 2 + 3, cfg.block_size):
        idx = sample_tokens(cfg, T)
        out.append(Result("logits jax->torch", f"{name} T={T}",
                          logits_diff(jax_logits(model, idx), torch_logits(jax_to_torch_model(model), idx)), tol.LOGITS_TOL))
        out.append(Result("logits torch->jax", f"{name} T={T}",
                          logits_diff(jax_logits(from_torch_state_dict(tmodel.state_dict(), cfg), idx),
                                      torch_logits(tmodel, idx)), tol.LOGITS_TOL))
    back = from_torch_state_dict(to_torch_state_dict(model), cfg)
    a, b = flat_params(model), flat_params(back)
    sd = tmodel.state_dict()
    sd2 = to_torch_state_dict(from_torch_state_dict(sd, cfg))
    out += [Result("roundtrip jax->torch->jax", name, max(max_diff(a[k], b[k]) for k in a), tol.ROUNDTRIP_ATOL),
            Result("roundtrip torch->jax->torch", name, max(max_diff(sd[k], sd2[k]) for k in sd), tol.ROUNDTRIP_ATOL)]
    zero_jax = {k for k, v in to_torch_state_dict(GPT(cfg, rngs=nnx.Rngs(0))).items() if not v.any()}
    zero_torch = {k for k, v in torchref.GPT(cfg).state_dict().items() if not v.any()}
    out.append(Result("zero-initialised tensors differ (count)", name, float(len(zero_jax ^ zero_torch)), 0.0))
    return out


def check_decoding(name: str, cfg: GPTConfig, new_tokens: int = 48) -> list[Result]:
    """Greedy and sampled decoding (same uniforms) vs torchref's, past block_size; cached decode
    logits vs a full forward over the cropped context."""
    from jaxgpt.sample import generate
    from torchref.sample import generate as torch_generate

    model = _model(cfg, 11)
    tmodel = jax_to_torch_model(model)
    prompt = sample_tokens(cfg, 5, seed=3, batch=2)
    u = np.random.default_rng(5).random((new_tokens, 2)).astype(np.float32)
    out = []
    for label, sampling in (("greedy", dict(temperature=0.0)), ("sampled", dict(temperature=1.0, top_k=40, top_p=0.95))):
        a, logits = generate(model, prompt, new_tokens, uniforms=u, return_logits=True, **sampling)
        b = torch_generate(tmodel, torch.from_numpy(prompt), new_tokens, uniforms=torch.from_numpy(u), **sampling).numpy()
        out.append(Result(f"{label} {new_tokens} tokens vs torch, mismatches", name, float((a != b).sum()), 0.0))
    bs = cfg.block_size
    ref = [jax_logits(model, a[:, max(0, L - bs):max(L, bs)])[:, min(L, bs) - 1] for L in range(5, 5 + new_tokens)]
    out.append(Result("cached decode vs full forward", f"{name}, to {5 + new_tokens} (block {bs})",
                      max_diff(logits, np.stack(ref)), tol.CACHE_LOGITS_ATOL))
    return out


def check_rope_past_block(new_tokens: int = 300) -> list[Result]:
    """A RoPE model 300 tokens past a 32-token context: the exact crop (default) against torchref's
    cropped full forward, and the rolling cache (--past_context=slide) against torchref's full
    forward with sliding-window attention of width block_size."""
    from jaxgpt.sample import generate
    from torchref.sample import generate as torch_generate

    model = _model(MODERN, 13)
    tmodel = jax_to_torch_model(model)
    prompt = sample_tokens(MODERN, 5, seed=4, batch=2)
    crop = generate(model, prompt, new_tokens, temperature=0.0)
    ref = torch_generate(tmodel, torch.from_numpy(prompt), new_tokens, temperature=0.0).numpy()
    slide, logits = generate(model, prompt, new_tokens, temperature=0.0, return_logits=True, past_context="slide")
    with torch.no_grad():
        band = tmodel(torch.from_numpy(slide[:, :-1]), window=MODERN.block_size).numpy()[:, 4:].transpose(1, 0, 2)
    case = f"modern, {new_tokens} tokens, block {MODERN.block_size}"
    return [Result("RoPE crop past block_size vs torch cropped forward, greedy mismatches", case,
                   float((crop != ref).sum()), 0.0),
            Result("RoPE rolling cache vs torch sliding-window forward, greedy mismatches", case,
                   float((band.argmax(-1).T != slide[:, 5:]).sum()), 0.0),
            Result("RoPE rolling cache vs torch sliding-window forward, logits", case, logits_diff(logits, band),
                   tol.LOGITS_TOL)]


def check_muon_training(steps: int = 60, accum: int = 2, beta2: float = 0.0, attention: str = "auto",
                        batch_split: int = 1) -> list[Result]:
    """Muon (+ the AdamW group), clipping and schedule on the full recipe's model: per-step loss and final
    parameters; with `beta2` > 0 NorMuon (--muon_beta2); `attention`: --attention; `batch_split`:
    --batch_split on jaxgpt's side only (torchref takes each micro-batch whole)."""
    jl, tl, jax_sd, torch_sd, _ = train_twins(steps, accum, cfg=dataclasses.replace(MODERN, bias=True), **MUON,
                                              muon_beta2=beta2, attention=attention, batch_split=batch_split)
    case = (f"modern + Muon, accum={accum}" + (f", NorMuon beta2={beta2}" if beta2 else "")
            + (f", {attention} attention" if attention != "auto" else "")
            + (f", batch in {batch_split} parts" if batch_split > 1 else ""))
    return [Result(f"train loss rel. diff, {steps} steps", case, max(abs(a - b) / abs(b) for a, b in zip(jl, tl, strict=True)),
                   tol.TRAIN_LOSS_RTOL),
            Result(f"train params after {steps} steps", case,
                   max(max_diff(jax_sd[k], v.detach()) for k, v in torch_sd.items()), tol.TRAIN_PARAM_ATOL)]


def check_bf16() -> list[Result]:
    """The full recipe in bf16 compute (fp32 master weights): logits vs torch autocast, 100 Muon steps
    vs torch autocast, and the held-out loss of 300 steps vs the fp32 run; the same for bf16 matmuls
    in float32 compute (--matmul_precision=bfloat16)."""
    gap = bf16_logit_gap(_model(MODERN, 1), sample_tokens(MODERN, MODERN.block_size))
    cfg = dataclasses.replace(MODERN, bias=True)
    jl, tl, *_ = train_twins(100, dtype="bfloat16", cfg=cfg, **MUON)
    *_, b16 = train_twins(300, dtype="bfloat16", torch_side=False, cfg=cfg, **MUON)
    *_, f32 = train_twins(300, dtype="float32", torch_side=False, cfg=cfg, **MUON)
    *_, matmuls = train_twins(300, torch_side=False, cfg=cfg, **MUON, matmul_precision="bfloat16")
    return [Result("bf16 logits jax vs torch autocast, rel.", "modern", gap, tol.BF16_LOGITS_RTOL),
            Result("bf16 train loss rel. diff vs torch autocast, 100 steps", "modern + Muon",
                   max(abs(a - b) / abs(b) for a, b in zip(jl, tl, strict=True)), tol.BF16_TRAIN_LOSS_RTOL),
            Result("bf16 vs fp32 held-out loss after 300 steps, rel.", f"modern + Muon ({f32:.4f} fp32)",
                   abs(b16 - f32) / f32, tol.BF16_VS_FP32_RTOL),
            Result("bf16 matmuls vs fp32 held-out loss after 300 steps, rel.", f"modern + Muon ({f32:.4f} fp32)",
                   abs(matmuls - f32) / f32, tol.BF16_VS_FP32_RTOL)]


def bf16_matmul_gap(n: int = 96, k: int = 64, m: int = 48, seed: int = 0) -> float:
    """jaxgpt.layers.bf16_matmul against torchref's twin on the same float32 inputs: the largest of the
    output's and both input gradients' max|diff|, each relative to its own largest value."""
    import jax

    from jaxgpt.layers import bf16_matmul
    from torchref.layers import bf16_matmul as torch_bf16_matmul
    rng = np.random.default_rng(seed)
    x, w, g = (rng.normal(size=shape).astype(np.float32) for shape in ((n, k), (k, m), (n, m)))
    y, vjp = jax.vjp(bf16_matmul, jnp.asarray(x), jnp.asarray(w))
    dx, dw = vjp(jnp.asarray(g))
    tx, tw = torch.tensor(x, requires_grad=True), torch.tensor(w.T.copy(), requires_grad=True)  # torch: (out, in)
    ty = torch_bf16_matmul(tx, tw)
    ty.backward(torch.from_numpy(g))
    pairs = ((y, ty.detach()), (dx, tx.grad), (dw, tw.grad.T))
    return max(max_diff(a, b) / float(np.abs(np.asarray(b)).max()) for a, b in pairs)


def check_bf16_matmuls(steps: int = 60, accum: int = 2) -> list[Result]:
    """--matmul_precision=bfloat16 (the linear layers' inputs rounded to bf16, float32 sums) against
    torchref's twin: the op and its gradients at float32's tolerance; the full recipe's logits and the
    per-step loss of Muon training (clipping, schedule) at bf16's (check_bf16 holds the held-out loss
    against the float32 run's), with no final-parameter row. Rounding to bf16 turns a 1-ulp difference
    anywhere (the order of a float32 sum) into a different rounding of some activation: the twins'
    logits differ by 2e-07 to 3e-04 with the compiler's settings, and two correct programs drift apart
    as they train (jaxgpt against itself with every weight nudged by 2 ulps: gradients 2.4e-03 apart
    relative to the largest; after 60 steps the twins' losses differ by ~4e-05, parameters by ~1e-02)."""
    model = _model(MODERN, 1, matmul="bfloat16")
    idx = sample_tokens(MODERN, MODERN.block_size)
    cfg = dataclasses.replace(MODERN, bias=True)
    jl, tl, *_ = train_twins(steps, accum, cfg=cfg, **MUON, matmul_precision="bfloat16")
    return [Result("bf16 matmul: output and both gradients jax vs torch, rel.", "96 x 64 @ 64 x 48", bf16_matmul_gap(),
                   tol.LOGITS_TOL),
            Result("bf16 matmuls: logits jax vs torch twin", f"modern T={MODERN.block_size}",
                   logits_diff(jax_logits(model, idx), torch_logits(jax_to_torch_model(model), idx)), tol.BF16_LOGITS_RTOL),
            Result(f"bf16 matmuls: train loss rel. diff, {steps} steps", f"modern + Muon, accum={accum}",
                   max(abs(a - b) / abs(b) for a, b in zip(jl, tl, strict=True)), tol.BF16_TRAIN_LOSS_RTOL)]


def check_explicit_attention() -> list[Result]:
    """--attention=explicit (the softmax written out in einsums; what --attention=fast, the modern recipe's
    setting, takes on CPU) against torchref's SDPA at float32's tolerances: the full recipe's logits, and
    NorMuon training as the recipe runs it."""
    model = _model(MODERN, 1, attention="explicit")
    idx = sample_tokens(MODERN, MODERN.block_size)
    return [Result("logits jax->torch", f"modern, explicit attention T={MODERN.block_size}",
                   logits_diff(jax_logits(model, idx), torch_logits(jax_to_torch_model(model), idx)), tol.LOGITS_TOL),
            *check_muon_training(beta2=0.95, attention="explicit")]


def check_batch_split() -> list[Result]:
    """--batch_split=2 (what the modern recipe's batch_split=0 takes on CPU: each batch's gradient as the mean
    of two halves computed side by side) against torchref's whole batches, in the recipe as the CPU runs it
    (NorMuon, explicit attention), at float32's training tolerances."""
    return check_muon_training(beta2=0.95, attention="explicit", batch_split=2)


def switch_model_checks() -> Iterator[Callable[[], list[Result]]]:
    """Per switch: logits both ways, round trips, zero-init tensors, parameter counts."""
    for name, switch in SWITCHES.items():
        cfg = dataclasses.replace(BASE, **switch)
        yield lambda cfg=cfg, name=name: check_switch(name, cfg) + check_param_counts(cfg, name)


def recipe_checks() -> Iterator[Callable[[], list[Result]]]:
    yield from switch_model_checks()
    yield from recipe_run_checks()


def recipe_run_checks(decoding: tuple[str, ...] = tuple(SWITCHES)) -> Iterator[Callable[[], list[Result]]]:
    """Decoding per switch (those named in `decoding`), RoPE past block_size, Muon training (plain and
    NorMuon), bf16, bf16 matmuls, explicit attention, the batch in parts."""
    for name in decoding:
        yield lambda name=name: check_decoding(name, dataclasses.replace(BASE, **SWITCHES[name]))
    yield check_rope_past_block
    yield check_muon_training
    yield lambda: check_muon_training(beta2=0.95)
    yield check_bf16
    yield check_bf16_matmuls
    yield check_explicit_attention
    yield check_batch_split

