"""parity: where jaxgpt and torchref meet — the conversion table and the parity checks."""
from parity.convert import (
    from_torch_state_dict,
    jax_to_torch_model,
    model_args_from_config,
    config_from_model_args,
    to_torch_state_dict,
    torch_to_jax_model,
)

__all__ = ["to_torch_state_dict", "from_torch_state_dict", "jax_to_torch_model", "torch_to_jax_model",
           "model_args_from_config", "config_from_model_args"]
