"""Plans made by the real compilers: the programs a run would compile, compiled for a chip this host
may not have, with their memory, FLOPs and a roofline bound.

`plan_training` builds the train step with the same function the run uses (step.fit_train_step:
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
from jaxgpt.plan.perf import flops_per_token, total_params
from jaxgpt.sharding import BATCH_AXES, abstract, batch_sharding, make_mesh
from jaxgpt.step import abstract_train_state, fit_train_step, make_eval_step

CUDNN_ATTENTION_MARK = "__cudnn$fmha"
FLOPS_FLOOR = 0.9  # a compiler FLOP count below this fraction of the FLOP formula's is an undercount  # cuDNN fused attention's custom calls in a compiled GPU program


@dataclasses.dataclass(frozen=True)
class Where:
    """The devices programs are compiled for, and the facts the plan reports against."""

    name: str  # the target's name, or 'local'
    site: platform.Site
    devices: list[Any]
    hosts: int
    peak_flops: float | None
    bandwidth: float | None
    memory_total: int | None


def where(target: str | None) -> Where:
    """A named target's deviceless devices (targets.devices), or this process's own."""
    if target:
        t = targets.parse(target)
        devs = targets.devices(t)
        usable = t.chip.usable()
        site = platform.Site(t.platform, devs[0].device_kind, t.devices, t.hosts, usable,
                             f"{t.chip.name} usable memory")
        return Where(t.name, site, devs, t.hosts, t.chip.peak_flops, t.chip.bandwidth, t.chip.memory_bytes)
    site = platform.local_site()
    chip = targets.chip_for_kind(site.device_kind)
    return Where("local", site, jax.devices(), jax.process_count(), chip.peak_flops if chip else None,
                 chip.bandwidth if chip else None, chip.memory_bytes if chip else None)


def figures(compiled: Any, compile_s: float) -> dict[str, Any]:
    """Bytes per device (XLA's memory analysis), the compiler's FLOPs and bytes accessed per device
    where it gives them, the attention kernel and host callbacks found in the compiled program."""
    m = compiled.memory_analysis()
    sizes = {"arguments": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
             "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    sizes["total"] = sizes["arguments"] + sizes["output"] - sizes["alias"] + sizes["temp"]
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


def _roofline(fig: dict[str, Any], model_flops: float, devices: int, w: Where, tokens: int) -> dict[str, Any]:
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
    if w.peak_flops and w.bandwidth:
        bound = max(per_device / w.peak_flops, traffic / w.bandwidth)
        out.update(step_time_lower_bound_s=bound, tokens_per_s_upper_bound=tokens / bound,
                   bound_by="compute" if per_device / w.peak_flops >= traffic / w.bandwidth else "memory bandwidth")
    return out


def _train_candidates(tc: TrainConfig, devices: int, batch_auto: bool) -> list[TrainConfig]:
    """--batch_size=auto: the requested global batch (batch_size x accumulation) split into the
    fewest micro-steps, largest micro-batch first; each micro-batch a multiple of the devices."""
    if not batch_auto:
        return [tc]
    total = tc.batch_size * tc.gradient_accumulation_steps
    out = [dataclasses.replace(tc, batch_size=b, gradient_accumulation_steps=total // b)
           for b in range(total, 0, -1) if total % b == 0 and b % devices == 0]
    if not out:
        raise UserError(f"--batch_size=auto: the global batch of {total} sequences cannot be split over {devices} "
                        f"devices; give --batch_size and --gradient_accumulation_steps whose product is a multiple of it")
    return out


def plan_training(model_cfg: GPTConfig, tc: TrainConfig, target: str | None = None, *, batch_auto: bool = False,
                  log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Compile the run's programs for `target` (None: this host's devices) and report them. With
    remat=auto the cheapest policy that fits; with batch_auto, under each policy, the largest
    micro-batch that fits (remat first: recomputing costs FLOPs, accumulation does not). A choice
    keeps platform.MEMORY_MARGIN of the memory, as the run's does; `fits` is against all of it."""
    w = where(target)
    mesh = make_mesh(tc.mesh_data, tc.mesh_fsdp, w.devices)
    site = w.site
    dtype = platform.resolve_dtype(tc.dtype, site.backend)
    attention = platform.resolve_attention(model_cfg, dtype, site.backend, tc.attention)
    T = model_cfg.block_size
    if tc.batch_size % mesh.size and not batch_auto:
        raise UserError(f"--batch_size={tc.batch_size} must be divisible by the {mesh.size} devices of {w.name}")
    state = abstract_train_state(model_cfg, tc, mesh)

    tried: list[dict[str, Any]] = []  # every compile of the train step (--batch_size=auto searches)
    tries = [cast(TrainConfig, dataclasses.replace(tc, remat=cast(Any, remat))) for remat in
             (platform.remat_candidates(tc.remat, site.backend) if batch_auto else (tc.remat,))]
    for cand in (c for t in tries for c in _train_candidates(t, mesh.size, batch_auto)):
        x = jax.ShapeDtypeStruct((cand.gradient_accumulation_steps, cand.batch_size, T), jnp.int32, sharding=batch_sharding(mesh))
        log(f"compiling the train step for {w.name} (remat={cand.remat}, batch {cand.batch_size} x "
            f"{cand.gradient_accumulation_steps})")
        fit, eval_graphdef = fit_train_step(model_cfg, cand, state, x, x, 0, attention, site)
        chosen = cand
        tried.append({"remat": fit.remat, "batch_size": cand.batch_size, "fits": fit.fits(site.memory), "compile_s": fit.compile_s,
                      "bytes": fit.need})
        if fit.fits(site.memory, platform.MEMORY_MARGIN):  # the run's own rule (step.fit_train_step): keep a margin
            break
    tokens = chosen.batch_size * chosen.gradient_accumulation_steps * T
    train: dict[str, Any] = {"remat": fit.remat, "batch_size": chosen.batch_size,
                             "gradient_accumulation_steps": chosen.gradient_accumulation_steps,
                             "per_device_batch": chosen.batch_size // mesh.size, "tokens_per_step": tokens,
                             "dtype": dtype, "mesh": dict(mesh.shape), "tried": tried}
    if fit.refused:
        train.update(compile_s=fit.compile_s, refused=fit.refused, fits=False)
        return _report(w, model_cfg, {"train_step": train})
    train.update(figures(fit.compiled, fit.compile_s))
    train.update(_roofline(train, flops_per_token(model_cfg) * tokens, mesh.size, w, tokens))
    programs = {"train_step": train}
    # evaluation: the run's eval step over eval batches of batch_size windows
    log(f"compiling the eval step for {w.name}")
    t = time.perf_counter()
    xb = jax.ShapeDtypeStruct((chosen.batch_size, T), jnp.int32, sharding=NamedSharding(mesh, P(BATCH_AXES)))
    compiled = cast(Any, make_eval_step(eval_graphdef, dataclasses.replace(chosen, dtype=cast(Any, dtype)),
                                        site.backend)).lower(state.params, xb, xb).compile()
    programs["eval_step"] = figures(compiled, time.perf_counter() - t)
    programs["generate_chunk"] = plan_generation(model_cfg, w, log)
    return _report(w, model_cfg, programs)


def plan_generation(model_cfg: GPTConfig, w: Where, log: Callable[[str], None], batch: int = 1) -> dict[str, Any]:
    """generate.py's largest program on one device: the chunk that crosses block_size
    (sample.abstract_chunk) with float32 weights and default sampling (temperature 0.8, top-k 200)."""
    from jaxgpt import sample

    log(f"compiling the generation chunk for {w.name}")
    t = time.perf_counter()
    compiled = sample.abstract_chunk(model_cfg, batch, sharding=SingleDeviceSharding(w.devices[0])).compile()
    out = figures(compiled, time.perf_counter() - t)
    out.update(tokens=sample.CHUNK, sequences=batch, dtype="float32")
    return out


def plan_serving(model: Any, target: str | None, slots: int, chunk: int,
                 log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """scripts/serve.py's programs for `target` (jaxgpt.serve.engine.programs): the decode step at every
    width and the prefill of the longest prompt bucket, over the KV cache of `slots` sequences, with
    the checkpoint's weights as loaded (their dtype)."""
    from jaxgpt.serve import engine

    w = where(target)
    one = SingleDeviceSharding(w.devices[0])
    model.eval()
    graphdef, state = nnx.split(model)
    dtype = jax.tree.leaves(state)[0].dtype
    carry = abstract(jax.eval_shape(lambda: engine.new_carry(model, slots, dtype)), one)
    chosen = {name: p for name, p in engine.programs(graphdef, abstract(state, one), carry, chunk).items()
              if name.startswith("decode_") or name == f"prefill_{model.config.block_size}"}
    programs: dict[str, dict[str, Any]] = {}
    for name, program in chosen.items():
        log(f"compiling the {name.replace('_', ' ')} for {w.name} ({slots} slots)")
        t = time.perf_counter()
        compiled = program.compile()
        programs[name.split("_")[0] if name.startswith("prefill") else name] = figures(compiled, time.perf_counter() - t)
    report = _report(w, model.config, programs)
    report["kv_cache_bytes"] = platform.total_bytes(carry[3])
    return report


def _report(w: Where, model_cfg: GPTConfig, programs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    usable = w.site.memory
    for p in programs.values():
        if "fits" not in p:
            total = p["per_device_bytes"]["total"]
            p["fits"] = usable is None or total <= usable
    train = programs.get("train_step", {})
    first = train or next(iter(programs.values()))
    return {"target": w.name, "platform": w.site.backend, "device_kind": w.site.device_kind, "devices": len(w.devices),
            "hosts": w.hosts, "device_memory_bytes": usable, "device_memory_total_bytes": w.memory_total,
            "peak_flops_per_device": w.peak_flops, "bandwidth_bytes_per_s": w.bandwidth,
            "fits": all(p["fits"] for p in programs.values()),
            "per_device_bytes": first.get("per_device_bytes"), "flops_per_step": train.get("flops_per_step"),
            "compile_s": round(sum(p.get("compile_s", 0.0) for p in programs.values()), 2),
            "step_time_lower_bound_s": train.get("step_time_lower_bound_s"),
            "model": model_cfg.to_dict(), "parameters": total_params(model_cfg), "programs": programs}


def shortfall(report: dict[str, Any]) -> str:
    """The one error line for a plan that does not fit: the program and by how much."""
    usable = report["device_memory_bytes"]
    for name, p in report["programs"].items():
        if p["fits"]:
            continue
        remedies = ["--batch_size=auto"] + (["--remat=full"] if p.get("remat") not in (None, "full") else []) + \
                   [f"--mesh_fsdp (shard weights and optimizer state over the {report['devices']} devices)"]
        what = f"the {name.replace('_', ' ')}"
        if p.get("refused"):
            why = p["refused"].removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")
            return (f"{what} does not fit {report['target']} (remat={p.get('remat')}, batch_size={p.get('batch_size')}): "
                    f"XLA says: {why}; try " + ", ".join(remedies))
        need = p["per_device_bytes"]["total"]
        return (f"{what} needs {_gib(need)} per device but {report['target']} has {_gib(usable)} usable "
                f"({_gib(need - usable)} short); try " + ", ".join(remedies))
    return ""


def _gib(n: float | None) -> str:
    return "?" if n is None else f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def render(report: dict[str, Any]) -> str:
    """The plan as text, a few lines a program."""
    usable = report["device_memory_bytes"]
    peak, bw = report["peak_flops_per_device"], report["bandwidth_bytes_per_s"]
    m = report["model"]
    lines = [f"model: {m['n_layer']} layers x {m['n_embd']} wide, {m['n_head']} heads, block {m['block_size']}, "
             f"vocab {m['vocab_size']} ({report['parameters'] / 1e6:.1f} M parameters)",
             f"target {report['target']}: {report['devices']} x {report['device_kind']} on {report['hosts']} host(s); "
             f"{_gib(usable)} usable per device" + (f", {peak / 1e12:.0f} TFLOP/s bf16, {bw / 1e9:.0f} GB/s (datasheet)"
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
                  f"  per device: arguments {_gib(b['arguments'])}, temp {_gib(b['temp'])}, output {_gib(b['output'])}, "
                  f"aliased {_gib(b['alias'])} -> {_gib(b['total'])} of {_gib(usable)}"
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
