"""jaxgpt: a byte-level GPT in JAX + Flax NNX, proven against a PyTorch twin."""
import os

# XLA:CPU: hand each matmul to the YNN library on its own instead of fusing elementwise
# neighbours into it (those fusions materialise broadcasts); measured 7% faster train step
# on the CPU preset (BENCHMARKS.md). Only read when the CPU backend starts; set
# JAXGPT_XLA_DEFAULTS=0 to leave XLA_FLAGS alone.
_CPU_FLAG = "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
if os.environ.get("JAXGPT_XLA_DEFAULTS", "1") != "0" and "ynn_fusion_type" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _CPU_FLAG).strip()
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import ByteTokenizer

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ByteTokenizer", "UserError"]
__version__ = "0.1.0"
