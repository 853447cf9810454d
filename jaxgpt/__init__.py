"""jaxgpt: a byte-level GPT in JAX + Flax NNX, proven against a PyTorch twin."""
from jaxgpt.config import GPTConfig, TrainConfig
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from jaxgpt.tokenizer import ByteTokenizer

__all__ = ["GPT", "GPTConfig", "TrainConfig", "ByteTokenizer", "UserError"]
__version__ = "0.1.0"
