"""Every parity tolerance, defined once; tests and `python -m parity` import these."""

# fp32 CPU logits, jaxgpt vs torchref (or transformers), same weights: max|diff| per unit of logit
# scale (parity.rows.logits_diff), since fp32 rounding grows with the logits' magnitude
LOGITS_TOL = 1e-5
ROUNDTRIP_ATOL = 0.0  # jax -> torch -> jax (and back) must be bit-exact
INIT_STD_RTOL = 0.05  # per-tensor init std vs nanoGPT's scheme (sampling noise on small tensors)
TRAIN_LOSS_RTOL = 1e-4  # per-step training loss, jaxgpt vs torchref
TRAIN_PARAM_ATOL = 1e-4  # final parameters after the parity training run
CACHE_LOGITS_ATOL = 1e-5  # KV-cached decode vs a full forward
# bf16 compute (fp32 master weights) vs torchref under torch.autocast(bfloat16). The two frameworks
# round at different places (jaxgpt runs every op in bf16, autocast only the matmuls), so these
# bound the disagreement of two valid bf16 programs: a few bf16 ulps (2**-8 relative).
BF16_LOGITS_RTOL = 2e-2  # max|diff| / max|fp32 logit|
BF16_TRAIN_LOSS_RTOL = 1e-2  # per-step loss over 100 AdamW steps
BF16_VS_FP32_RTOL = 2e-2  # held-out loss after 300 steps, bf16 run vs fp32 run
FINETUNE_LOSS_RATIO = 0.95  # fine-tuning an imported model on new text: val loss after / before, at most
