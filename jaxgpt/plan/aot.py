"""Plans made by the real compilers: the programs a run would compile, compiled for a chip this host
may not have, with their memory, FLOPs and a roofline bound.

`plan_training` builds the train step with the same function the run uses (step.search_train_step:
same step, dtype, remat, accumulation, mesh and shardings), the eval step and generation's chunk,
and compiles them with XLA:TPU or XLA:GPU over deviceless devices (jaxgpt.plan.targets) or with the
local backend. `plan_serving` does the same for the serving engine's decode widths and KV cache.
The answer to "does it fit?" is the compiler's: XLA:TPU refuses a program over its HBM while
compiling, and every program's memory_analysis() is checked against the chip's usable memory.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any, cast

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from jaxgpt import platform
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.plan import targets
from jaxgpt.plan.export import HOST_CALLBACKS
from jaxgpt.plan.perf import flops_per_token
from jaxgpt.platform import gib
from jaxgpt.sharding import BATCH_AXES, abstract, batch_sharding, make_mesh
from jaxgpt.step import abstract_train_state, make_eval_step, search_train_step, train_candidates

CUDNN_ATTENTION_MARK = "__cudnn$fmha"
FLOPS_FLOOR = 0.9  # a compiler FLOP count below this fraction of the FLOP formula's is an undercount  # cuDNN fused attention's custom calls in a compiled GPU program


def where(target: str | None) -> tuple[platform.Site, list[Any]]:
    """The Site programs are planned for and its devices: a named target's deviceless devices
    (targets.devices), or this process's own."""
    if target:
        t = targets.parse(target)
        devs = targets.devices(t)
        return platform.Site(t.platform, devs[0].device_kind, t.devices, t.hosts, t.chip.usable(),
                             f"{t.name}'s usable memory", t.name, t.chip.peak_flops, t.chip.bandwidth,
                             t.chip.memory_bytes), devs
    site = platform.local_site()
    chip = targets.chip_for_kind(site.device_kind)
    if chip is not None:
        site = dataclasses.replace(site, peak_flops=chip.peak_flops, bandwidth=chip.bandwidth,
                                   memory_total=chip.memory_bytes)
    return site, jax.devices()


def figures(compiled: Any, compile_s: float) -> dict[str, Any]:
    """Bytes per device (XLA's memory analysis), the compiler's FLOPs and bytes accessed per device
    where it gives them, the attention kernel and host callbacks found in the compiled program."""
    sizes = platform.program_bytes(compiled)
    if sizes is None:
        raise UserError("the compiler gave no memory analysis for this program; the plan cannot say whether it fits")
    try:
        cost = compiled.cost_analysis() or {}
    except Exception:  # not every backend implements it (XLA:GPU over deviceless devices returns None)
        cost = {}
    cost = cost[0] if isinstance(cost, list) else cost
    text = compiled.as_text() or ""
    return {"per_device_bytes": sizes, "compile_s": round(compile_s, 2),
            "compiler_flops_per_device": float(cost["flops"]) if cost.get("flops") else None,
            "compiler_bytes_accessed_per_device": float(cost["bytes accessed"]) if cost.get("bytes accessed") else None,
            "attention": "cudnn" if CUDNN_ATTENTION_MARK in text else "xla",
            "host_callbacks": sorted({c for c in HOST_CALLBACKS if c in text})}


def _roofline(fig: dict[str, Any], model_flops: float, devices: int, site: platform.Site, tokens: int) -> dict[str, Any]:
    """FLOPs per step (the compiler's, else the FLOP formula) and a lower bound on step time: the
    busier of the chip's peak FLOP/s and its HBM bandwidth (bytes accessed, else every argument
    read and every output written once). An estimate: real steps are slower."""
    compiler = fig["compiler_flops_per_device"]
    # XLA's cost analysis counts a loop's body once when it cannot see the trip count: with accumulation
    # (GPT-2 124M, 8 micro-steps on v5e-8) it said 37.8 TFLOP a step against the formula's 448. A program
    # does no less than the model's FLOPs, so a figure below them is not used, nor its bytes accessed.
    trusted = bool(compiler) and compiler >= FLOPS_FLOOR * model_flops / devices
    source = "compiler" if trusted else "formula (jaxgpt.plan.perf.flops_per_token)" + (
        ": the compiler's figure counts loops once" if compiler else "")
    per_device = compiler if trusted else model_flops / devices
    sizes = fig["per_device_bytes"]
    traffic = (trusted and fig["compiler_bytes_accessed_per_device"]) or sizes["arguments"] + sizes["output"]
    out = {"flops_per_step": per_device * devices, "flops_per_device": per_device, "flops_source": source,
           "model_flops_per_step": model_flops}
    if site.peak_flops and site.bandwidth:
        bound = max(per_device / site.peak_flops, traffic / site.bandwidth)
        out.update(step_time_lower_bound_s=bound, tokens_per_s_upper_bound=tokens / bound,
                   bound_by="compute" if per_device / site.peak_flops >= traffic / site.bandwidth else "memory bandwidth")
    return out


def plan_training(model_cfg: GPTConfig, tc: TrainConfig, target: str | None = None, *, batch_auto: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Compile the run's programs for `target` (None: this host's devices) and report them. The train
    step is the run's own search (step.search_train_step over step.train_candidates): with remat=auto
    the cheapest policy that fits; with batch_auto, under each policy, the largest micro-batch that fits.
    A choice keeps platform.MEMORY_MARGIN of the memory, as the run's does; `fits` is against all of it."""
    site, devices = where(target)
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp, devices)
    dtype = platform.resolve_dtype(tc.dtype, site.backend, site.device_kind)
    attention = platform.resolve_attention(model_cfg, dtype, site.backend, tc.attention)
    T = model_cfg.block_size
    if tc.batch_size % mesh.size and not batch_auto:
        raise UserError(f"--batch_size={tc.batch_size} must be divisible by the {mesh.size} devices of {site.name}")
    state = abstract_train_state(model_cfg, tc, mesh)

    def batch(cand: TrainConfig) -> tuple[Any, Any]:
        log(f"compiling the train step for {site.name} (remat={cand.remat}, batch {cand.batch_size} x "
            f"{cand.gradient_accumulation_steps})")
        x = jax.ShapeDtypeStruct((cand.gradient_accumulation_steps, cand.batch_size, T), jnp.int32,
                                 sharding=batch_sharding(mesh))
        return x, x
    fits, eval_graphdef = search_train_step(model_cfg, train_candidates(tc, site.backend, mesh.size, batch_auto, site.device_kind),
                                            state, batch, 0, attention, site)
    fit, chosen = fits[-1], fits[-1].tc
    tokens = chosen.batch_size * chosen.gradient_accumulation_steps * T
    train: dict[str, Any] = {"remat": chosen.remat, "batch_size": chosen.batch_size,
                             "gradient_accumulation_steps": chosen.gradient_accumulation_steps,
                             "per_device_batch": chosen.batch_size // mesh.size, "tokens_per_step": tokens,
                             "dtype": dtype, "mesh": dict(mesh.shape),
                             "tried": [{"remat": f.tc.remat, "batch_size": f.tc.batch_size,
                                        "fits": dataclasses.replace(f.memory, margin=1.0).fits(),
                                        "compile_s": f.compile_s, "bytes": f.memory.need} for f in fits]}
    if fit.memory.refused:
        train.update(compile_s=fit.compile_s, refused=fit.memory.refused, fits=False)
        return _report(site, model_cfg, {"train_step": train})
    train.update(figures(fit.compiled, fit.compile_s))
    train.update(_roofline(train, flops_per_token(model_cfg) * tokens, mesh.size, site, tokens))
    programs = {"train_step": train}
    # evaluation: the run's eval step over eval batches of batch_size windows
    log(f"compiling the eval step for {site.name}")
    t = time.perf_counter()
    xb = jax.ShapeDtypeStruct((chosen.batch_size, T), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES)))
    compiled = cast(Any, make_eval_step(eval_graphdef, dataclasses.replace(chosen, dtype=cast(Any, dtype)),
                                        site.backend)).lower(state.params, xb, xb).compile()
    programs["eval_step"] = figures(compiled, time.perf_counter() - t)
    programs["generate_chunk"] = plan_generation(model_cfg, site, devices[0], log)
    return _report(site, model_cfg, programs)


def plan_generation(model_cfg: GPTConfig, site: platform.Site, device: Any, log: Callable[[str], None],
                    batch: int = 1) -> dict[str, Any]:
    """generate.py's largest program on one device: the chunk that crosses block_size
    (sample.abstract_chunk) with float32 weights and default sampling (temperature 0.8, top-k 200)."""
    from jaxgpt import sample

    log(f"compiling the generation chunk for {site.name}")
    t = time.perf_counter()
    compiled = sample.abstract_chunk(model_cfg, batch, sharding=SingleDeviceSharding(device)).compile()
    out = figures(compiled, time.perf_counter() - t)
    out.update(tokens=sample.CHUNK, sequences=batch, dtype="float32")
    return out


def plan_serving(model: Any, target: str | None, slots: int, chunk: int,
                 log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """scripts/serve.py's programs for `target` (jaxgpt.serve.engine.programs): the decode step at every
    width and the prefill of the longest prompt bucket, over the KV cache of `slots` sequences, with
    the checkpoint's weights as loaded (their dtype)."""
    from jaxgpt.serve import engine

    site, devices = where(target)
    one = SingleDeviceSharding(devices[0])
    model.eval()
    graphdef, state = nnx.split(model)
    dtype = jax.tree.leaves(state)[0].dtype
    carry = abstract(jax.eval_shape(lambda: engine.new_carry(model, slots, dtype)), one)
    chosen = {name: p for name, p in engine.programs(graphdef, abstract(state, one), carry, chunk).items()
              if name.startswith("decode_") or name == f"prefill_{model.config.block_size}"}
    programs: dict[str, dict[str, Any]] = {}
    for name, program in chosen.items():
        log(f"compiling the {name.replace('_', ' ')} for {site.name} ({slots} slots)")
        t = time.perf_counter()
        compiled = program.compile()
        programs[name.split("_")[0] if name.startswith("prefill") else name] = figures(compiled, time.perf_counter() - t)
    report = _report(site, model.config, programs)
    report["kv_cache_bytes"] = platform.total_bytes(carry[3])
    return report


def _report(site: platform.Site, model_cfg: GPTConfig, programs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for name, p in programs.items():
        if "fits" not in p:
            p["fits"] = _memory(name, p, site.memory, site.memory_source).fits()
    train = programs.get("train_step", {})
    first = train or next(iter(programs.values()))
    return {"target": site.name, "platform": site.backend, "device_kind": site.device_kind, "devices": site.devices,
            "hosts": site.processes, "device_memory_bytes": site.memory,
            "device_memory_source": site.memory_source, "device_memory_total_bytes": site.memory_total,
            "peak_flops_per_device": site.peak_flops, "bandwidth_bytes_per_s": site.bandwidth,
            "fits": all(p["fits"] for p in programs.values()),
            "per_device_bytes": first.get("per_device_bytes"), "flops_per_step": train.get("flops_per_step"),
            "compile_s": round(sum(p.get("compile_s", 0.0) for p in programs.values()), 2),
            "step_time_lower_bound_s": train.get("step_time_lower_bound_s"),
            "model": model_cfg.to_dict(), "parameters": model_cfg.num_params(non_embedding=False), "programs": programs}


def _memory(name: str, program: dict[str, Any], usable: int | None, source: str) -> platform.Memory:
    what = f"the {name.replace('_', ' ')}" + (f" (remat={program['remat']}, batch_size={program['batch_size']})"
                                              if "remat" in program else "")
    need = program["per_device_bytes"]["total"] if "per_device_bytes" in program else None
    return platform.Memory(what, need, usable, source, refused=program.get("refused", ""))


def shortfall(report: dict[str, Any]) -> str:
    """The one error line for a plan that does not fit: the program, by how much, and what to try."""
    for name, p in report["programs"].items():
        if not p["fits"]:
            mesh = p.get("mesh", {})
            return _memory(name, p, report["device_memory_bytes"], report["device_memory_source"]).shortfall(platform.advice(
                remat=p.get("remat"), batch_size=p.get("batch_size", 0), accumulation=p.get("gradient_accumulation_steps", 1),
                fsdp=mesh.get("fsdp")))
    return ""


def render(report: dict[str, Any]) -> str:
    """The plan as text, a few lines a program."""
    usable = report["device_memory_bytes"]
    peak, bw = report["peak_flops_per_device"], report["bandwidth_bytes_per_s"]
    m = report["model"]
    lines = [f"model: {m['n_layer']} layers x {m['n_embd']} wide, {m['n_head']} heads, block {m['block_size']}, "
             f"vocab {m['vocab_size']} ({report['parameters'] / 1e6:.1f} M parameters)",
             f"target {report['target']}: {report['devices']} x {report['device_kind']} on {report['hosts']} host(s); "
             f"{gib(usable)} usable per device" + (f", {peak / 1e12:.0f} TFLOP/s bf16, {bw / 1e9:.0f} GB/s (datasheet)"
                                                    if peak and bw else "")]
    for name, p in report["programs"].items():
        head = name.replace("_", " ")
        if name == "train_step":
            head += (f": remat={p['remat']}, batch {p['batch_size']} ({p['per_device_batch']} per device) x "
                     f"{p['gradient_accumulation_steps']} micro-step(s), {p['dtype']}, mesh {p['mesh']}")
        elif name == "generate_chunk":
            head += f": {p['tokens']} tokens, {p['sequences']} sequence(s), {p['dtype']}"
        if p.get("refused"):
            lines += [head, f"  refused by the compiler after {p['compile_s']:.1f} s: {p['refused']}"]
            continue
        b = p["per_device_bytes"]
        lines += [head + (f", attention {p['attention']}" if "attention" in p else ""),
                  f"  per device: arguments {gib(b['arguments'])}, temp {gib(b['temp'])}, output {gib(b['output'])}, "
                  f"aliased {gib(b['alias'])} -> {gib(b['total'])} of {gib(usable)}"
                  + (f" ({b['total'] / usable:.1%})" if usable else "") + f": {'fits' if p['fits'] else 'DOES NOT FIT'}; "
                  f"compiled in {p['compile_s']:.1f} s" + (f"; host callbacks: {p['host_callbacks']}" if p["host_callbacks"] else "")]
        if "flops_per_step" in p:
            line = f"  {p['flops_per_step'] / 1e12:.3f} TFLOP per step ({p['flops_source']})"
            if "step_time_lower_bound_s" in p:
                line += (f"; roofline lower bound (an estimate, {p['bound_by']}-bound): "
                         f"{p['step_time_lower_bound_s'] * 1e3:.2f} ms/step, {p['tokens_per_s_upper_bound'] / 1e6:.2f} M tokens/s")
            lines.append(line)
    lines.append(f"fits: {'yes' if report['fits'] else 'no'}; compiled in {report['compile_s']:.1f} s in all")
    return "\n".join(lines)


def finite(x: Any) -> Any:
    """JSON without NaN/inf (None instead)."""
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x
