"""Planning for chips this host does not have: accelerators by name (targets.py), the run's and the server's
programs compiled ahead of time by XLA:TPU / XLA:GPU (aot.py: memory, FLOPs, the roofline), StableHLO exports
for cuda and tpu (export.py), and the FLOP formula and peak FLOP/s (perf.py). `pip install 'jaxgpt[tpu]'` or
`'jaxgpt[gpu]'` brings the compilers."""
