"""Parity as a tool for users' own checkpoints: `check_checkpoint(path) -> Report`, behind
`python -m parity --checkpoint PATH` and `scripts/convert.py --verify`, and callable from a
user's own pytest:

    from parity import check_checkpoint
    def test_my_checkpoint_agrees_across_frameworks():
        report = check_checkpoint("out/shakespeare")
        assert report.passed, report.table()

The checkpoint is loaded in jaxgpt and, through the one conversion table, in torchref (and, for
a Hugging Face folder, in transformers too); the rows are the parity harness's, on the
checkpoint's own vocabulary and block size, with the tolerances of parity/tolerances.py.
"""
from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import jax
import numpy as np

from formats.table import flat_params, from_torch_state_dict, to_torch_state_dict
from jaxgpt.errors import UserError
from jaxgpt.model import GPT
from parity import tolerances as tol
from parity.rows import Result, jax_logits, logits_diff, max_diff

SAMPLING = dict(temperature=0.8, top_k=40, top_p=0.95)
PAST_BLOCK = 32  # decoding rows run this many tokens past block_size by default


class NonFinite(Exception):
    """Weights or logits that are NaN/Inf: the check cannot mean anything; exit 1."""


@dataclass
class Report:
    checkpoint: str
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    def table(self) -> str:
        lines = ["| check | case | value | tolerance | result |", "|---|---|---|---|---|"]
        lines += [f"| {r.check} | {r.case} | {r.value:.3g} | {r.tolerance:.3g} | {'pass' if r.passed else 'FAIL'} |"
                  for r in self.results]
        return "\n".join(lines + [f"\n{note}" for note in self.notes])

    def to_json(self) -> dict[str, Any]:
        def v(name: str) -> str | None:
            try:
                return version(name)
            except PackageNotFoundError:
                return None
        device = jax.devices()[0]
        return {"checkpoint": self.checkpoint, "passed": self.passed, "notes": self.notes,
                "checks": [{**asdict(r), "passed": r.passed} for r in self.results],
                "versions": {n: v(n) for n in ("jax", "jaxlib", "flax", "torch", "transformers")},
                "device": f"{device.platform}:{device.device_kind}", "python": platform.python_version()}


def check_finite(model: GPT) -> None:
    for name, value in flat_params(model).items():
        if not np.isfinite(value).all():
            bad = int((~np.isfinite(value)).sum())
            raise NonFinite(f"weight {name} holds {bad} non-finite value(s) (NaN/Inf) of {value.size}")


def _logit_row(name: str, case: str, ours: np.ndarray, theirs: np.ndarray, limit: float) -> Result:
    if not (np.isfinite(ours).all() and np.isfinite(theirs).all()):
        raise NonFinite(f"{name} [{case}]: the logits are not finite (NaN/Inf) although the weights are")
    return Result(name, case, logits_diff(ours, theirs), limit)


def _decoding_rows(model: GPT, tmodel: Any, prompt: np.ndarray, tokens: int) -> list[Result]:
    """jaxgpt's KV-cache decoding vs torchref's full forward over the cropped context (nanoGPT's
    loop), greedy and sampled under the same uniform draws."""
    import torch

    from jaxgpt.sample import generate
    from torchref.sample import generate as torch_generate

    u = np.random.default_rng(5).random((tokens, prompt.shape[0])).astype(np.float32)
    out = []
    for name, sampling in (("greedy", dict(temperature=0.0)), ("sampled", SAMPLING)):
        a = generate(model, prompt, tokens, uniforms=u, **sampling)
        b = torch_generate(tmodel, torch.from_numpy(prompt.astype(np.int64)), tokens, uniforms=torch.from_numpy(u),
                           use_cache=False, **sampling).numpy()
        where = f"{tokens} tokens from {prompt.shape[1]}, block {model.config.block_size}"
        label = ", ".join(f"{k}={v}" for k, v in sampling.items())
        out.append(Result(f"{name} decoding vs torch full forward, mismatches", f"{where}; {label}",
                          float((a != b).sum()), 0.0))
    return out


def _hf_rows(path: Path, model: GPT, idx: np.ndarray, limit: float) -> list[Result]:
    """A Hugging Face folder: against transformers itself, and its round trip through jaxgpt."""
    import tempfile

    import torch
    from safetensors.numpy import load_file
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    from formats.hf import read_weights
    from formats.io import load_any, save_hf, save_jaxgpt

    logging.disable_progress_bar()
    logging.set_verbosity_error()
    hf = GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = hf(torch.from_numpy(idx.astype(np.int64))).logits.numpy()
    rows = [_logit_row("logits vs transformers", f"{idx.shape[0]} x {idx.shape[1]} random tokens", jax_logits(model, idx),
                       theirs, limit)]
    with tempfile.TemporaryDirectory() as tmp:
        _, info = load_any(path)
        save_jaxgpt(model, Path(tmp) / "run", info)
        back, info = load_any(Path(tmp) / "run")
        save_hf(back, Path(tmp) / "hf", info)
        a, b = read_weights(path), load_file(str(Path(tmp) / "hf" / "model.safetensors"))
        common = [k for k in b if k in a]
        worst = max(max_diff(np.asarray(a[k], np.float32) if not hasattr(a[k], "float") else a[k].float().numpy(), b[k])
                    for k in common)
    rows.append(Result("roundtrip HF -> jaxgpt -> HF", f"{len(common)} tensors", worst, tol.ROUNDTRIP_ATOL))
    return rows


def check_checkpoint(path: str | Path, *, text: str | Path | None = None, tokens: int | None = None,
                     tolerance: float | None = None, which: str = "best") -> Report:
    """Every parity row for the checkpoint at `path` (any format the converter reads).
    `text`: also compare logits on this file's text; `tokens`: decoding rows length (default:
    PAST_BLOCK past block_size); `tolerance`: loosen the logits tolerance to this value.
    Raises UserError when the checkpoint cannot be read, NonFinite for NaN/Inf weights/logits."""
    import torchref
    from formats.io import kind_of, load_any

    model, info = load_any(path, which=which)
    check_finite(model)
    cfg = model.config
    report = Report(str(path))
    limit = tol.LOGITS_TOL
    if tolerance is not None:
        if not tolerance > 0:
            raise UserError(f"--tolerance must be > 0, got {tolerance}")
        report.notes.append(f"logits tolerance loosened from {tol.LOGITS_TOL:g} to {tolerance:g} by --tolerance")
        limit = tolerance
    tmodel = torchref.GPT(cfg)
    tmodel.load_state_dict(to_torch_state_dict(model))
    tmodel.eval()
    T = cfg.block_size
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, T))
    report.results.append(_logit_row("logits jax vs torch", f"2 x {T} random tokens (vocab {cfg.vocab_size})",
                                     jax_logits(model, idx), _torch_logits(tmodel, idx), limit))
    if text is not None:
        tok = info.get("tokenizer")
        if tok is None:
            raise UserError(f"--text needs the checkpoint's tokenizer, and {path} has none")
        try:
            ids = tok.encode(Path(text).read_text(encoding="utf-8"))[:T]
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read --text {text} ({e})") from None
        if len(ids) < 2:
            raise UserError(f"--text {text} holds fewer than 2 tokens")
        report.results.append(_logit_row("logits jax vs torch", f"{len(ids)} tokens of {Path(text).name}",
                                         jax_logits(model, ids[None]), _torch_logits(tmodel, ids[None]), limit))
    n = tokens if tokens is not None else T + PAST_BLOCK
    if n < 1:
        raise UserError(f"--tokens must be >= 1, got {n}")
    prompt = np.random.default_rng(1).integers(0, cfg.vocab_size, (1, min(8, T)))
    report.results += _decoding_rows(model, tmodel, prompt, n)
    back = from_torch_state_dict(to_torch_state_dict(model), cfg)
    a, b = flat_params(model), flat_params(back)
    report.results.append(Result("roundtrip jax -> torch -> jax", f"{len(a)} tensors",
                                 max(max_diff(a[k], b[k]) for k in a), tol.ROUNDTRIP_ATOL))
    if kind_of(path) == "hf":
        from jaxgpt.paths import fetched
        from parity.hf_checks import missing
        if (why := missing()) is None:
            with fetched(path) as local:
                report.results += _hf_rows(local, model, idx, limit)
        else:
            report.notes.append(f"transformers rows skipped: {why}")
    return report


def _torch_logits(tmodel: Any, idx: np.ndarray) -> np.ndarray:
    import torch
    with torch.no_grad():
        return tmodel(torch.from_numpy(np.asarray(idx, np.int64))).numpy()


def verify_conversion(src: str | Path, dst: str | Path, tokens: int | None = None) -> Report:
    """convert.py --verify: the logits and greedy rows of DST's model against SRC's."""
    from formats.io import load_any
    from jaxgpt.sample import generate

    a, _ = load_any(src)
    b, _ = load_any(dst)
    report = Report(f"{src} -> {dst}")
    if a.config != b.config:
        report.results.append(Result(f"config differs: {a.config} vs {b.config}", "", 1.0, 0.0))
        return report
    cfg = a.config
    idx = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, cfg.block_size))
    report.results.append(_logit_row("logits destination vs source", f"2 x {cfg.block_size} random tokens",
                                     jax_logits(b, idx), jax_logits(a, idx), tol.ROUNDTRIP_ATOL))
    n = tokens if tokens is not None else cfg.block_size + PAST_BLOCK
    prompt = idx[:1, :min(8, cfg.block_size)]
    greedy = [generate(m, prompt, n, temperature=0.0) for m in (a, b)]
    report.results.append(Result("greedy decoding destination vs source, mismatches", f"{n} tokens",
                                 float((greedy[0] != greedy[1]).sum()), 0.0))
    return report


def to_json_line(report: Report) -> str:
    return json.dumps(report.to_json())
