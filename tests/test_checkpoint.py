"""Checkpoint retention: the last `keep` steps and the one with the lowest val loss."""
import jax.numpy as jnp

from jaxgpt.checkpoint import Checkpointer


def test_retention_keeps_the_last_steps_and_the_lowest_val_loss(tmp_path):
    ckpt = Checkpointer(tmp_path, keep=2, use_async=False)
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.0), (4, 2.5), (5, float("inf")), (6, 2.6)]:
        ckpt.save(step, {"w": jnp.full((2,), float(step))}, None, {"step": step, "val_loss": val})
    ckpt.wait()
    assert ckpt.steps() == [2, 5, 6], "expected the last 2 steps and step 2 (val 1.0, the lowest)"
    assert ckpt.best_step() == 2
    ckpt.close()
