"""benchmarks: how jaxgpt's speed is measured — fresh alternating processes against PyTorch
(harness.py, workers.py) and the checklist for a new GPU/TPU host (validate.py). scripts/bench.py is the CLI."""
