"""parity: the proof that jaxgpt computes what its PyTorch twin (torchref) computes.

`python -m parity` runs the harness's checks; `parity.check_checkpoint(path) -> Report` checks a
user's own checkpoint (parity/report.py). The conversion table itself is the product's
(formats/table.py); parity only uses it. The checks need torch, which `import parity` alone does not.
"""
from formats.table import (
    config_from_model_args,
    from_torch_state_dict,
    model_args_from_config,
    to_torch_state_dict,
)

__all__ = ["to_torch_state_dict", "from_torch_state_dict", "jax_to_torch_model", "torch_to_jax_model",
           "model_args_from_config", "config_from_model_args", "check_checkpoint", "Report"]


def __getattr__(name: str):  # lazy: these import torch
    if name in ("check_checkpoint", "Report"):
        from parity import report
        return getattr(report, name)
    if name in ("jax_to_torch_model", "torch_to_jax_model"):
        from parity import twins
        return getattr(twins, name)
    raise AttributeError(name)
