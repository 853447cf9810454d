"""Accelerators by name, as data: the chips a run can be planned for, and their device descriptions.

`parse("v5e-8")` or `parse("h100x8")` gives a Target: the chip (memory, published peak and
bandwidth), how many devices on how many hosts, and the topology the real compiler needs.
`devices(target)` asks that compiler's plugin for deviceless descriptions of those chips
(`jax.experimental.topologies`): libtpu for TPU slices (`pip install -e ".[tpu]"`), the CUDA plugin
for GPUs (`pip install -e ".[gpu]"`) with a target config written from the table below, so a
program can be compiled for a chip this host does not have (jaxgpt.plan.aot). This module is also the
one table of peak FLOP/s (jaxgpt.plan.perf reads it).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from jaxgpt.errors import UserError
from jaxgpt.platform import GIB

# JAX's GPU client takes this fraction of device memory for its allocator unless
# XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise: it is what one GPU process may use.
GPU_MEMORY_FRACTION = 0.75
INSTALL = {"tpu": 'pip install -e ".[tpu]"', "gpu": 'pip install -e ".[gpu]"'}


@dataclass(frozen=True)
class Chip:
    """One accelerator chip's published facts (per chip; a TPU v4/v5p chip is one megacore device)."""

    name: str  # our short name: 'v5e', 'h100'
    platform: str  # 'tpu' | 'gpu'
    kinds: tuple[str, ...]  # jax's device_kind for it (lower case, matched as substrings)
    memory_bytes: int  # HBM per chip
    usable_bytes: int  # what one program may use: XLA:TPU's "available HBM"; for GPUs see usable()
    peak_flops: float  # dense bf16 FLOP/s (datasheet)
    bandwidth: float  # HBM bytes/s (datasheet)
    gpu: tuple[Any, ...] = ()  # GPUs: (SMs, GHz, L2 bytes, shared memory per SM, per block opt-in, compute capability)

    def usable(self) -> int:
        if self.platform != "gpu":
            return self.usable_bytes
        fraction = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", GPU_MEMORY_FRACTION))
        return int(self.memory_bytes * fraction)


MIB = GIB // 1024
# TPU usable bytes: the "available HBM" XLA:TPU (libtpu 0.0.42) stated for programs too big to fit.
# GPU memory: what the driver reports.
CHIPS: dict[str, Chip] = {c.name: c for c in (
    Chip("v4", "tpu", ("tpu v4",), 32 * GIB, int(30.75 * GIB), 275e12, 1.2e12),
    Chip("v5e", "tpu", ("tpu v5 lite", "tpu v5e"), 16 * GIB, int(15.75 * GIB), 197e12, 819e9),
    Chip("v5p", "tpu", ("tpu v5p", "tpu v5"), 96 * GIB, int(95.74 * GIB), 459e12, 2765e9),
    Chip("v6e", "tpu", ("tpu v6 lite", "tpu v6e"), 32 * GIB, int(31.25 * GIB), 918e12, 1640e9),
    Chip("a100", "gpu", ("a100",), 81920 * MIB, 0, 312e12, 2039e9, (108, 1.41, 40 * MIB, 167936, 166912, (8, 0))),
    Chip("h100", "gpu", ("h100",), 81559 * MIB, 0, 989e12, 3350e9, (132, 1.98, 50 * MIB, 233472, 232448, (9, 0))),
    Chip("h200", "gpu", ("h200",), 143771 * MIB, 0, 989e12, 4800e9, (132, 1.98, 50 * MIB, 233472, 232448, (9, 0))),
    Chip("b200", "gpu", ("b200",), 183359 * MIB, 0, 2250e12, 8000e9, (148, 1.965, 126 * MIB, 233472, 232448, (10, 0))),
    # the GPUs people own: GeForce peaks are dense bf16 with float32 accumulation (half the float16-accumulate
    # figure on the box); the A10G's are NVIDIA A10's datasheet (AWS's variant of it); the T4 (Turing) has no
    # bf16 tensor cores, so its peak is float32's (XLA:GPU computes bf16 there in float32)
    Chip("a100-40gb", "gpu", ("a100-sxm4-40gb", "a100-pcie-40gb"), 40960 * MIB, 0, 312e12, 1555e9,
         (108, 1.41, 40 * MIB, 167936, 166912, (8, 0))),
    Chip("rtx4090", "gpu", ("rtx 4090",), 24564 * MIB, 0, 165.2e12, 1008e9, (128, 2.52, 72 * MIB, 102400, 101376, (8, 9))),
    Chip("rtx3090", "gpu", ("rtx 3090",), 24576 * MIB, 0, 71e12, 936e9, (82, 1.695, 6 * MIB, 102400, 101376, (8, 6))),
    Chip("l4", "gpu", ("nvidia l4",), 23034 * MIB, 0, 121e12, 300e9, (58, 2.04, 48 * MIB, 102400, 101376, (8, 9))),
    Chip("a10g", "gpu", ("a10g",), 23028 * MIB, 0, 125e12, 600e9, (80, 1.71, 6 * MIB, 102400, 101376, (8, 6))),
    Chip("t4", "gpu", ("tesla t4", "nvidia t4"), 15360 * MIB, 0, 8.1e12, 320e9, (40, 1.59, 4 * MIB, 65536, 65536, (7, 5))),
)}
GPU_DESCRIPTIONS = {"a100": "NVIDIA A100-SXM4-80GB", "h100": "NVIDIA H100 80GB HBM3", "h200": "NVIDIA H200",
                    "b200": "NVIDIA B200", "a100-40gb": "NVIDIA A100-SXM4-40GB", "rtx4090": "NVIDIA GeForce RTX 4090",
                    "rtx3090": "NVIDIA GeForce RTX 3090", "l4": "NVIDIA L4", "a10g": "NVIDIA A10G", "t4": "Tesla T4"}
THREADS_PER_SM = {(7, 5): 1024, (8, 6): 1536, (8, 9): 1536}  # else 2048 (A100, H100 and later)
GPUS_PER_HOST = 8
TPU_CHIPS_PER_HOST = 4  # multi-host slices: 4 chips per VM; v5e-8 / v6e-8 are one VM of 8


@dataclass(frozen=True)
class Target:
    """A named slice or GPU machine: `devices` chips on `hosts` hosts."""

    name: str
    chip: Chip
    devices: int
    hosts: int
    topology: str  # TPU 'v5e:2x4'; GPU 'slices x hosts x devices per host'
    host_bounds: tuple[int, int, int] = (1, 1, 1)  # TPU chips per host, per dimension
    wrap: tuple[bool, bool, bool] = (False, False, False)  # TPU torus links per dimension

    @property
    def platform(self) -> str:
        return self.chip.platform


def chip_for_kind(kind: str) -> Chip | None:
    """The table's chip for a jax device_kind ('TPU v5 lite', 'NVIDIA H100 80GB HBM3'), if any."""
    low = kind.lower()
    matches = [(len(k), c) for c in CHIPS.values() for k in c.kinds if k in low]
    return max(matches, key=lambda m: m[0])[1] if matches else None


def _grid_2d(chips: int) -> tuple[int, int]:
    x = 1 << ((chips.bit_length() - 1) // 2)  # 8 -> 2x4, 16 -> 4x4, 128 -> 8x16
    return x, chips // x


def _grid_3d(chips: int) -> tuple[int, int, int]:
    dims = [2, 2, 1]  # 4 chips; then double the smallest dimension, the last one on a tie (2x2x2, 2x2x4, 2x4x4, 4x4x4)
    while dims[0] * dims[1] * dims[2] < chips:
        smallest = min(dims)
        i = max(j for j in range(3) if dims[j] == smallest)
        dims[i] *= 2
    return dims[0], dims[1], dims[2]


def _tpu(name: str, gen: str, count: int) -> Target:
    chip = CHIPS[gen]
    if gen in ("v4", "v5p"):  # the name counts TensorCores, two per (megacore) chip
        chips = count // 2
        if count % 2 or chips < 4 or chips & (chips - 1):
            raise UserError(f"--target={name}: {gen} slices are {gen}-8, {gen}-16, {gen}-32, ... (a power of two, >= 8)")
        x, y, z = _grid_3d(chips)
        full = chips >= 64  # a full cube and up: torus links in every dimension
        return Target(name, chip, chips, max(1, chips // TPU_CHIPS_PER_HOST), f"{'v5' if gen == 'v5p' else gen}:{x}x{y}x{z}",
                      (2, 2, 1), (full, full, full))
    chips = count
    if chips not in (1, 4, 8) and (chips < 16 or chips > 256 or chips & (chips - 1)):
        raise UserError(f"--target={name}: {gen} slices are {gen}-1, -4, -8, -16, -32, ... -256")
    x, y = _grid_2d(chips)
    bounds = (x, y, 1) if chips <= 8 else (2, 2, 1)
    hosts = 1 if chips <= 8 else chips // TPU_CHIPS_PER_HOST
    return Target(name, chip, chips, hosts, f"{gen}:{x}x{y}", bounds, (x >= 16, y >= 16, False))


def parse(name: str) -> Target:
    """'v4-8', 'v5e-16' (= 'v5litepod-16'), 'v5p-8', 'v6e-8', 'h100', 'h100x8', 'h100x16' (2 hosts of 8), 'rtx4090',
    'a100-40gbx8', 't4', ..."""
    low = name.strip().lower().replace("v5litepod", "v5e")
    if m := re.fullmatch(r"(v4|v5e|v5p|v6e)-(\d+)", low):
        return _tpu(name, m.group(1), int(m.group(2)))
    m = re.fullmatch(r"(.+)x(\d+)", low)
    if low in CHIPS or m:
        chip, count = (low, "1") if low in CHIPS or m is None else m.groups()
        if chip in CHIPS and CHIPS[chip].platform == "gpu":
            n = int(count)
            if n < 1 or (n > GPUS_PER_HOST and n % GPUS_PER_HOST):
                raise UserError(f"--target={name}: up to {GPUS_PER_HOST} GPUs on one host, or a multiple of "
                                f"{GPUS_PER_HOST} (whole hosts)")
            hosts = max(1, n // GPUS_PER_HOST)
            return Target(name, CHIPS[chip], n, hosts, f"1x{hosts}x{n // hosts}")
    gpus = ", ".join(f"{c}, {c}x8" for c, spec in CHIPS.items() if spec.platform == "gpu")
    raise UserError(f"unknown --target={name!r}; Cloud TPU types (v4-8, v4-32, v5e-8 = v5litepod-8, v5e-16, v5p-8, "
                    f"v6e-8, any slice size) or GPUs ({gpus}, h100x16 = 2 hosts of 8)")


def plugin_env(target: Target) -> dict[str, str]:
    """Environment for a process that compiles for `target` from a host without its chips (the CLI
    sets it for its own process, before the plugin starts): libtpu, finding no Cloud TPU metadata
    server, otherwise asks for it and prints warnings about its accelerator type and workers; and
    it takes /tmp/libtpu_lockfile, which a killed process leaves behind (the next plan then fails)
    and which two plans at once would contend for, though neither uses a chip."""
    if target.platform != "tpu":
        return {}
    cloud = target.name.lower().replace("v5e-", "v5litepod-")
    return {"TPU_SKIP_MDS_QUERY": "1", "TPU_ACCELERATOR_TYPE": cloud, "TPU_WORKER_HOSTNAMES": "localhost",
            "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def compile_here(name: str) -> Target:
    """Set up this process (a CLI's, before JAX starts a backend) to compile for target `name`: JAX
    itself stays on the CPU and the plugin gets plugin_env. Returns the parsed Target."""
    import jax

    target = parse(name)
    jax.config.update("jax_platforms", "cpu")
    for key, value in plugin_env(target).items():
        os.environ.setdefault(key, value)
    return target


def gpu_target_config(chip: Chip) -> str:
    """XLA:GPU's target description (GpuTargetConfigProto, text format) for `chip`: the device's
    published facts, with the cuDNN version of the installed CUDA plugin (the one a user on that
    GPU installs with the same extra), so XLA makes the same kernel choices it would make there."""
    from importlib import metadata

    sms, ghz, l2, smem_core, smem_optin, (major, minor) = chip.gpu
    try:
        dnn = [int(p) for p in metadata.version("nvidia-cudnn-cu12").split(".")[:3]]
    except metadata.PackageNotFoundError:
        dnn = [9, 8, 0]  # no cuDNN wheel (a system CUDA): the oldest cuDNN jax[cuda12] accepts
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: {smem_core} shared_memory_per_block_optin: {smem_optin}
  threads_per_core_limit: {THREADS_PER_SM.get((major, minor), 2048)}
  core_count: {sms} fpus_per_core: {64 if (major, minor) in ((7, 5), (8, 0)) else 128} clock_rate_ghz: {ghz}
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {int(chip.bandwidth)} l2_cache_size: {l2} device_memory_size: {chip.memory_bytes}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
  cuda_compute_capability {{ major: {major} minor: {minor} }}
}}
platform_name: "CUDA"
dnn_version_info {{ major: {dnn[0]} minor: {dnn[1]} patch: {dnn[2] if len(dnn) > 2 else 0} }}
device_description_str: "{GPU_DESCRIPTIONS[chip.name]}"
"""


def devices(target: Target) -> list[Any]:
    """Deviceless descriptions of the target's chips from its compiler's plugin. Call before JAX
    starts a backend, with JAX_PLATFORMS=cpu (scripts/train.py --target sets it for its process):
    the plugin then compiles without looking for a chip. A missing plugin is one UserError."""
    import jax
    from jax.experimental import topologies

    try:
        if target.platform == "tpu":
            topo = topologies.get_topology_desc(platform="tpu", topology_name=target.topology,
                                                chip_config_name="megacore" if target.chip.name in ("v4", "v5p") else "default",
                                                chips_per_host_bounds=target.host_bounds, num_slices=1, wrap=target.wrap)
        else:
            topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(target.chip),
                                                topology=target.topology)
    except Exception as e:
        # jax says "JAX TPU support not installed" (RuntimeError) or "topology not implemented for cuda"
        if isinstance(e, (NotImplementedError, ImportError)) or "not installed" in str(e):
            raise UserError(f"--target={target.name} needs the {target.platform.upper()} compiler, which is not installed "
                            f"(jax {jax.__version__}); {INSTALL[target.platform]}") from None
        raise
    found = list(topo.devices)
    if len(found) != target.devices:
        raise UserError(f"--target={target.name}: the compiler describes {len(found)} devices, expected {target.devices}")
    return found
