"""torchref: the PyTorch twin of jaxgpt, with nanoGPT's parameter names."""
from torchref.model import GPT

__all__ = ["GPT"]
