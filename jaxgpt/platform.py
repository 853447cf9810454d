"""Everything that depends on the backend (CPU, GPU, TPU), decided in one place.

`resolve()` turns the user's `--dtype`/`--remat`/`--attention`/`--matmul_precision` (default `auto`)
and the devices present (a `Site`) into a `Platform` of plain values that train.py uses and config.json
records. Nothing else in jaxgpt asks "am I on CPU?", and importing this changes no environment variable.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import asdict, dataclass
from typing import Any

import jax
import jax.numpy as jnp

from jaxgpt.config import ATTENTION_KERNELS, GPTConfig, TrainConfig
from jaxgpt.errors import UserError

REMAT_BY_MEMORY = ("none", "dots", "full")  # remat=auto: the first whose compiled step fits in memory
MEMORY_MARGIN = 0.85  # remat=auto keeps this fraction of device memory for the train step
GIB = 2 ** 30
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclass(frozen=True)
class Site:
    """Where programs will run: this process's devices (local_site), or a target they are compiled
    for ahead of time (jaxgpt.plan.aot.where, from a jaxgpt.plan.targets.Target). Every choice below
    that depends on the backend takes one, so a plan made on this host decides exactly as the run will
    on the target."""

    backend: str  # 'cpu' | 'gpu' | 'tpu'
    device_kind: str
    devices: int
    processes: int
    memory: int | None  # bytes one device may use (None: unknown)
    memory_source: str
    name: str = "local"  # a target's name (jaxgpt.plan.targets), or 'local'
    peak_flops: float | None = None  # the chip's datasheet, where jaxgpt.plan.targets knows it
    bandwidth: float | None = None
    memory_total: int | None = None


@dataclass(frozen=True)
class Platform:
    """The resolved per-platform choices of one run on its Site (recorded in config.json)."""

    site: Site
    dtype: str  # compute dtype; parameters and optimizer state stay float32
    remat: str  # 'none' | 'dots' | 'full'
    attention: str  # the kernel for dropout-free attention: 'xla' | 'cudnn'
    matmul: str = "float32"  # the linear layers' products in float32 compute: 'float32' | 'bfloat16' (layers.bf16_matmul)
    batch_split: int = 1  # parts of each batch whose gradients the step computes side by side (resolve_batch_split)
    host_allocator: str = ""  # what jaxgpt.cli.tune_host_allocator did to this process ('' = untouched; train.py fills it)

    def to_dict(self) -> dict[str, Any]:
        site = self.site
        choices = {k: v for k, v in asdict(self).items() if k != "site"}
        return {"backend": site.backend, "device_kind": site.device_kind, "devices": site.devices,
                "processes": site.processes, **choices}


def backend() -> str:
    return jax.default_backend()


def local_site() -> Site:
    limit, where = memory_limit()
    return Site(backend(), jax.devices()[0].device_kind, jax.device_count(), jax.process_count(), limit, where)


def eval_batch_limit(platform: str | None = None) -> int:
    """The most windows per forward of a whole-split evaluation: 32 on CPU, where a smaller batch's
    activations stay in cache (measured on the project's AMD EPYC VM: the CPU preset's val split 1.21 ->
    0.85 s, the seed model's 12.5 -> 10.5 s; BENCHMARKS.md), 256 elsewhere (memory decides below it)."""
    return 32 if (platform or backend()) == "cpu" else 256


# GPUs before Ampere (compute capability < 8.0) have no bf16 tensor cores, and cuDNN's flash attention needs 8.0
NO_BF16_GPUS = ("tesla t4", "nvidia t4", "v100", "p100", "tesla p", "titan v", "titan rtx", "quadro rtx", "rtx 20", "gtx")


def resolve_dtype(requested: str, platform: str, device_kind: str = "") -> str:
    """auto: bfloat16 compute on TPUs and on GPUs from Ampere on (float32 master weights); float32 on CPU,
    where bf16 matmuls are emulated and slower, and on older GPUs (NO_BF16_GPUS: a T4), which would compute
    bf16 in float32 anyway."""
    if requested != "auto":
        return requested
    old_gpu = platform == "gpu" and any(k in device_kind.lower() for k in NO_BF16_GPUS)
    return "float32" if platform == "cpu" or old_gpu else "bfloat16"


def resolve_attention(cfg: GPTConfig, dtype: str, platform: str, requested: str = "auto") -> str:
    """The kernel of dropout-free attention (layers.attention_path: attention with dropout is spelled
    out whatever this says, because jax.nn.dot_product_attention has no dropout).
    auto: cuDNN's fused (flash) attention on GPU where it applies (half-precision inputs and a head size it
    supports), else XLA's fused op: the kernels nanoGPT's numbers were proved with. fast: auto's choice,
    except on CPU, where the softmax written out (explicit) ran the modern recipe's step ~5 % faster
    (jax.nn.dot_product_attention's xla path vmaps over query groups, and XLA:CPU fused its backward
    into one slow YNNPACK kernel: BENCHMARKS.md, "tenth lap"). explicit, xla: that one; cudnn: refused
    where cuDNN cannot run it."""
    cudnn = platform == "gpu" and dtype == "bfloat16" and cfg.head_dim % 8 == 0 and cfg.head_dim <= 128
    if requested == "cudnn" and not cudnn:
        raise UserError(f"--attention=cudnn needs a GPU, bfloat16 compute and a head size that is a multiple of 8 "
                        f"up to 128 (here: {platform}, {dtype}, head size {cfg.head_dim}); use --attention=auto")
    if requested in ATTENTION_KERNELS:
        return requested
    if requested == "fast" and platform == "cpu":
        return "explicit"
    return "cudnn" if cudnn else "xla"


def resolve_batch_split(requested: int, platform: str, rows: int) -> int:
    """How many parts the train step cuts each (micro-)batch of `rows` rows per device into; their
    gradients are computed side by side in one program and averaged. 0: 2 on CPU when the rows divide
    evenly, else 1. XLA:CPU runs a step's small matmuls one at a time, each on one core; two independent
    halves give its thunk executor work for both cores at once (the modern CPU-preset step 0.92x: BENCHMARKS.md,
    "eleventh lap"). An accelerator runs one matmul on all its cores, so there a split only adds work."""
    if requested == 0:
        return 2 if platform == "cpu" and rows % 2 == 0 else 1
    if rows % requested:
        raise UserError(f"--batch_split={requested} must divide the {rows} rows of a batch on each device; "
                        f"pick a divisor, or 0 for the platform's choice")
    return requested


@functools.cache
def cpu_has_amx_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this host's CPU multiplies bfloat16 in AMX tiles (the amx_bf16 flag Linux reports), where
    XLA:CPU's bfloat16 matmul ran 3-4x its float32 one (BENCHMARKS.md, "ninth lap"). CPUs with only
    AVX512-BF16 (AMD EPYC Zen 4) are not counted: the gain there is unmeasured."""
    try:
        with open(cpuinfo, encoding="ascii", errors="replace") as f:
            return any(line.startswith("flags") and "amx_bf16" in line.split() for line in f)
    except OSError:
        return False


def resolve_matmul(requested: str, dtype: str, platform: str) -> str:
    """The linear layers' matmul precision in float32 compute. auto: bfloat16 (inputs rounded, float32
    sums) on a CPU with AMX, float32 elsewhere: a GPU or TPU computing in float32 keeps its own default
    (a TPU already multiplies float32 in bfloat16 passes). In bfloat16 compute there is nothing to round."""
    if dtype != "float32":
        return "float32"
    if requested != "auto":
        return requested
    return "bfloat16" if platform == "cpu" and cpu_has_amx_bf16() else "float32"


def remat_candidates(requested: str, platform: str) -> tuple[str, ...]:
    """Policies train.py compiles in order, keeping the first whose step fits in memory. Storing
    activations (none) is the fastest policy on every platform once the host allocator keeps
    the CPU step's buffers (jaxgpt.cli.tune_host_allocator; BENCHMARKS.md)."""
    return (requested,) if requested != "auto" else REMAT_BY_MEMORY


def memory_limit(device: jax.Device | None = None) -> tuple[int | None, str]:
    """(bytes one device may use, where that figure comes from); None when unknown.
    CPU devices share the host's available memory."""
    device = device or jax.local_devices()[0]
    if device.platform != "cpu":
        stats = device.memory_stats() or {}
        limit = stats.get("bytes_limit")
        return (int(limit), f"{device.device_kind} memory") if limit else (None, "unknown")
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None, "unknown"
    return available // jax.local_device_count(), "available host memory"


def program_bytes(compiled: Any) -> dict[str, int] | None:
    """Bytes per device of a compiled program (XLA's memory analysis): its arguments, temporaries, outputs,
    the outputs that reuse a donated argument (alias), and their peak `total` (arguments + outputs - alias +
    temporaries). None where the backend gives no analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # not every backend implements it
        return None
    if m is None:
        return None
    sizes = {"arguments": int(m.argument_size_in_bytes), "temp": int(m.temp_size_in_bytes),
             "output": int(m.output_size_in_bytes), "alias": int(m.alias_size_in_bytes)}
    return {**sizes, "total": sizes["arguments"] + sizes["output"] - sizes["alias"] + sizes["temp"]}


def bytes_per_device(tree: Any) -> int:
    """Bytes one device holds of a tree of arrays or ShapeDtypeStructs (their shardings' shard shapes)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
        total += math.prod(int(n) for n in shape) * jnp.dtype(leaf.dtype).itemsize
    return total


def total_bytes(tree: Any) -> int:
    """Bytes of a tree of arrays or ShapeDtypeStructs counted once, however sharded: what a checkpoint
    or a KV cache holds in all."""
    return sum(math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree))


def gib(n: float | None) -> str:
    """Bytes as the project writes them in every memory message: GiB, or MiB below one GiB."""
    return "?" if n is None else f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / (GIB // 1024):.1f} MiB"


@dataclass(frozen=True)
class Memory:
    """"Does it fit?", answered in one place for the run, the planner and the loaders: the bytes `what`
    needs per device, the bytes a device has (`limit`, None: unknown) and where that figure comes from,
    the share of it `what` may take, or the compiler's own out-of-memory refusal."""

    what: str  # the subject of the message: 'the train step', 'the train state (parameters and optimizer state)'
    need: int | None
    limit: int | None
    source: str  # 'available host memory', 'TPU v5 lite memory', 'v5e-8 usable memory'
    margin: float = 1.0
    refused: str = ""  # XLA:TPU's RESOURCE_EXHAUSTED line ('' when it compiled)

    def fits(self) -> bool:
        return not self.refused and (self.need is None or self.limit is None or self.need <= self.margin * self.limit)

    def shortfall(self, advice: str) -> str:
        """The one error line for what does not fit: how far over, then `advice` (platform.advice)."""
        if self.refused:
            why = self.refused.removeprefix("RESOURCE_EXHAUSTED: ").rstrip(".")
            return f"{self.what} does not fit {self.source}: XLA says: {why}; {advice}"
        assert self.need is not None and self.limit is not None
        usable = self.margin * self.limit
        share = f", {self.margin:.0%} of it usable" if self.margin < 1 else ""
        return (f"{self.what} needs {gib(self.need)} per device but {self.source} is {gib(self.limit)} "
                f"({gib(self.need - usable)} short{share}); {advice}")


def advice(*, remat: str | None = None, batch_size: int = 0, accumulation: int = 1, fsdp: int | None = None,
           step: bool = True) -> str:
    """The one advice for memory that runs out: the flags that shrink the train step (step=False:
    only what shrinks the train state), with the values to try where they are known."""
    out = []
    if step:
        out.append(f"--batch_size={batch_size // 2} --gradient_accumulation_steps={accumulation * 2} (or --batch_size=auto)"
                   if batch_size > 1 else "a smaller --batch_size (or --batch_size=auto)")
        if remat != "full":
            out.append("--remat=full")
    out.append(f"--mesh_fsdp={fsdp * 2 if fsdp else 'N'} (shards weights and optimizer state over more devices)")
    return "try " + ", or ".join(out) + ("" if step else ", or a smaller model")


def check_state_fits(state_bytes: int, what: str, device: jax.Device | None = None, remedy: str = "") -> None:
    """Stop before anything is allocated when `what` alone (state_bytes per device) cannot fit in
    MEMORY_MARGIN of the device."""
    m = Memory(what, state_bytes, *memory_limit(device), margin=MEMORY_MARGIN)
    if not m.fits():
        raise UserError(m.shortfall(remedy or "it cannot be loaded on this machine"))


def check_model_fits(cfg: GPTConfig, what: str) -> None:
    """Before a checkpoint's weights are built or restored: its config alone (a crafted config.json
    or header can claim any size) must describe float32 weights that fit in memory."""
    check_state_fits(4 * cfg.num_params(non_embedding=False), f"{what} (its float32 weights)")


def resolve(cfg: GPTConfig, tc: TrainConfig, remat: str, site: Site | None = None) -> Platform:
    """The run's Platform once remat is settled (train.py settles it by memory)."""
    site = site or local_site()
    dtype = resolve_dtype(tc.dtype, site.backend, site.device_kind)
    return Platform(site=site, dtype=dtype, remat=remat,
                    attention=resolve_attention(cfg, dtype, site.backend, tc.attention),
                    matmul=resolve_matmul(tc.matmul_precision, dtype, site.backend))


def streams_by_callback(platform: str) -> bool:
    """generate.py prints a streamed sample token by token from inside the compiled loop (an ordered
    host callback) on CPU, where host and device are one; on GPU/TPU a callback per token would
    stop the device every token, so it streams a short chunk at a time instead (no callback in the
    program: jaxgpt.plan.aot checks every accelerator program for them)."""
    return platform == "cpu"
