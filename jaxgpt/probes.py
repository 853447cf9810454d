"""What a run shows besides its losses, as build-nanogpt shows it: HellaSwag's acc and acc_norm every
--hellaswag_interval steps and a short sample every --sample_interval steps, into the step's metrics record
(metrics.jsonl, TensorBoard, W&B) and, for the sample, the terminal. One process only: a multi-host run
scores its checkpoints with `eval.py --hellaswag` instead (the scoring here runs on one host's devices)."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from jaxgpt import hellaswag
from jaxgpt.errors import UserError
from jaxgpt.sample import generate

SAMPLE_TOKENS = 64  # nanoGPT's sample.py defaults otherwise: temperature 0.8, top-k 200
SAMPLE_SEED = 42


class Probes:
    """Built once per run (the HellaSwag file read and tokenized up front: a bad file stops the run before
    its first step); called with the parameters at each step that is due."""

    def __init__(self, tc: Any, graphdef: nnx.GraphDef, tokenizer: Any, processes: int):
        self.tc, self.graphdef, self.tokenizer = tc, graphdef, tokenizer
        if (tc.hellaswag_interval or tc.sample_interval) and processes > 1:
            raise UserError("--hellaswag_interval and --sample_interval run on one process; on a multi-host run score "
                            "the checkpoints with scripts/eval.py --hellaswag instead")
        self.examples: list[hellaswag.Example] = []
        if tc.hellaswag_interval:
            source = tc.hellaswag_file or str(hellaswag.fetch())
            self.examples = hellaswag.encode(hellaswag.read(source), tokenizer)
        self.prompt = np.asarray(tokenizer.encode(tc.sample_prompt))[None] if tc.sample_interval else None
        if self.prompt is not None and self.prompt.size == 0:
            raise UserError("--sample_prompt must hold at least one token")

    def due(self, step: int) -> bool:
        return any(n and step % n == 0 for n in (self.tc.hellaswag_interval, self.tc.sample_interval))

    def __call__(self, step: int, params: nnx.State, record: dict[str, Any]) -> str | None:
        """Score and sample into `record`; returns the sample's text (None when no sample was due)."""
        model = nnx.merge(self.graphdef, params)
        if self.tc.hellaswag_interval and step % self.tc.hellaswag_interval == 0:
            r = hellaswag.score(model, self.examples)
            record.update(hellaswag_acc=r.acc, hellaswag_acc_norm=r.acc_norm)
        if self.prompt is None or step % self.tc.sample_interval:
            return None
        tokens = np.asarray(generate(model, self.prompt, SAMPLE_TOKENS, temperature=0.8,
                                     top_k=min(200, model.config.vocab_size), key=jax.random.key(SAMPLE_SEED)))
        text: str = self.tokenizer.decode(tokens[0, self.prompt.shape[1]:])
        record["sample"] = text
        return text
