"""Every parity tolerance, defined once; tests and `python -m parity` import these."""

LOGITS_ATOL = 1e-5  # fp32 CPU logits, jaxgpt vs torchref, same weights
ROUNDTRIP_ATOL = 0.0  # jax -> torch -> jax (and back) must be bit-exact
INIT_STD_RTOL = 0.05  # per-tensor init std vs nanoGPT's scheme (sampling noise on small tensors)
TRAIN_LOSS_RTOL = 1e-4  # per-step training loss, jaxgpt vs torchref
TRAIN_PARAM_ATOL = 1e-4  # final parameters after the parity training run
CACHE_LOGITS_ATOL = 1e-5  # KV-cached decode vs a full forward
