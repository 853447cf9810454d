"""parity: where jaxgpt and torchref meet — the conversion table, the formats, the parity checks.

`parity.check_checkpoint(path) -> Report` checks a user's own checkpoint (see parity/report.py);
it needs torch, which `import parity` alone does not.
"""
from parity.convert import (
    config_from_model_args,
    from_torch_state_dict,
    jax_to_torch_model,
    model_args_from_config,
    to_torch_state_dict,
    torch_to_jax_model,
)

__all__ = ["to_torch_state_dict", "from_torch_state_dict", "jax_to_torch_model", "torch_to_jax_model",
           "model_args_from_config", "config_from_model_args", "check_checkpoint", "Report"]


def __getattr__(name: str):  # lazy: the checks import torch
    if name in ("check_checkpoint", "Report"):
        from parity import report
        return getattr(report, name)
    raise AttributeError(name)
