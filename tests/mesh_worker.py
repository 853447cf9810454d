"""Runs one training job in a fresh process with N host devices (XLA must see the flag
before jax starts, hence a subprocess). Used by test_sharding.py; prints one JSON line."""
import argparse
import json
import os
import sys

ap = argparse.ArgumentParser()
ap.add_argument("--devices", type=int, default=1)
ap.add_argument("--data_dir", required=True)
ap.add_argument("--out_dir", required=True)
ap.add_argument("--mesh_data", type=int, default=0)
ap.add_argument("--mesh_fsdp", type=int, default=1)
ap.add_argument("--max_iters", type=int, default=6)
ap.add_argument("--resume", action="store_true")
ap.add_argument("--dump_params", help="write the final params to this .npz")
ap.add_argument("--load_params", help="compare the run's restored checkpoint with this .npz")
ap.add_argument("--coordinator", help="host:port for a multi-process run")
ap.add_argument("--num_processes", type=int, default=1)
ap.add_argument("--process_id", type=int, default=0)
args = ap.parse_args()
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"

import jax  # noqa: E402
import numpy as np  # noqa: E402

from formats.table import flat_params  # noqa: E402
from jaxgpt import GPTConfig, TrainConfig  # noqa: E402
from jaxgpt.checkpoint import load_model  # noqa: E402
from jaxgpt.cli import use_compile_cache  # noqa: E402
from jaxgpt.sharding import init_distributed  # noqa: E402
from jaxgpt.train import train  # noqa: E402

use_compile_cache(None)  # the test session's cache ($XDG_CACHE_HOME, set by conftest)
if args.coordinator:
    init_distributed(args.coordinator, args.num_processes, args.process_id)
model = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.0, bias=True)
tc = TrainConfig(dataset="synth", data_dir=args.data_dir, out_dir=args.out_dir, batch_size=8, max_iters=args.max_iters,
                 eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2, lr_decay_iters=8, progress=False,
                 plot=False, mesh_data=args.mesh_data, mesh_fsdp=args.mesh_fsdp, resume=args.resume)
losses = []
result = {"devices": jax.device_count(), "process": jax.process_index()}
if args.load_params:
    restored, meta = load_model(args.out_dir, "latest")
    ref = np.load(args.load_params)
    flat = flat_params(restored)
    result["restored_step"] = meta["step"]
    result["restore_max_diff"] = max(float(np.abs(flat[k] - ref[k]).max()) for k in ref.files)
summary = train(model, tc, on_log=lambda r: losses.append(r["train_loss"]))
result["losses"] = losses
if args.dump_params:
    restored, _ = load_model(args.out_dir, "latest")
    np.savez(args.dump_params, **flat_params(restored))
print(json.dumps(result))
sys.stdout.flush()
