"""Hugging Face GPT-2 folders through the real CLIs, proven against transformers: import (safetensors,
sharded, pytorch_model.bin; no torch needed for safetensors), export, greedy text equal to
transformers', fine-tuning, and one clear line for every folder the model cannot take."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from parity.hf_checks import hf_checks, make_hf_model, missing
from tests import launch
from tests.launch import cli

pytestmark = [pytest.mark.slow,  # transformers and subprocesses: the full suite only
              pytest.mark.skipif(missing() is not None, reason=f"Hugging Face checks need it: {missing()}")]
ROOT = Path(__file__).resolve().parents[1]




@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    w = tmp_path_factory.mktemp("hf")
    make_hf_model(w / "bpe", "bpe")
    return w


@pytest.mark.parametrize("check", list(hf_checks()), ids=lambda c: c.__name__)
def test_parity_with_transformers(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:g}"


def test_generate_greedy_text_equals_transformers_generate(work):
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    cli("convert", "bpe", "run", cwd=work)
    ours = cli("generate", "--checkpoint=run", "--prompt=the king and", "--temperature=0", "--max_new_tokens=100",
               cwd=work).stdout
    hf, tok = GPT2LMHeadModel.from_pretrained(work / "bpe").eval(), AutoTokenizer.from_pretrained(work / "bpe")
    ids = torch.tensor([tok.encode("the king and")])
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=100, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours == tok.decode(out[0]) + "\n"
    assert (work / "run" / "tokenizer.json").read_bytes() == (work / "bpe" / "tokenizer.json").read_bytes()


def test_export_loads_in_transformers_without_custom_code(work, tmp_path):
    cli("convert", "bpe", "run2", cwd=work)
    cli("convert", "run2", str(tmp_path / "out"), "--to=hf", cwd=work)
    code = ("import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); t = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "print(type(m).__name__, m.config.vocab_size, t.decode(t.encode('the king')))")
    proc = launch.run([sys.executable, "-c", code, str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    vocab = json.loads((work / "bpe" / "config.json").read_text())["vocab_size"]
    assert proc.stdout.split()[:2] == ["GPT2LMHeadModel", str(vocab)] and proc.stdout.strip().endswith("the king")


@pytest.mark.parametrize("layout", ["sharded", "bin"])
def test_sharded_safetensors_and_pytorch_model_bin_import_with_the_same_logits(work, tmp_path, layout):
    import torch
    from transformers import GPT2LMHeadModel

    from formats.io import load_any
    from parity.checks import jax_logits

    hf = GPT2LMHeadModel.from_pretrained(work / "bpe").eval()
    folder = tmp_path / layout
    if layout == "sharded":
        hf.save_pretrained(folder, max_shard_size="100KB")
        assert (folder / "model.safetensors.index.json").is_file() and not (folder / "model.safetensors").exists()
    else:
        folder.mkdir()
        shutil.copy(work / "bpe" / "config.json", folder)
        torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    model, _ = load_any(folder)
    idx = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 32))
    with torch.no_grad():
        ref = hf(torch.from_numpy(idx)).logits.numpy()
    assert np.abs(jax_logits(model, idx) - ref).max() <= 1e-5


def test_safetensors_import_and_generation_need_no_torch(work, tmp_path):
    """torch made unimportable: convert a HF safetensors folder, generate from it; a .pt names the extra."""
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(blocker), "HOME": str(tmp_path)}
    cli("convert", "bpe", str(tmp_path / "run"), cwd=work, env=env)
    out = cli("generate", f"--checkpoint={tmp_path / 'run'}", "--max_new_tokens=5", "--prompt=the", cwd=work, env=env)
    assert out.stdout.startswith("the")
    torch_file = tmp_path / "x.pt"
    torch_file.write_bytes(b"not really")
    bad = cli("generate", f"--checkpoint={torch_file}", cwd=work, env=env, check=False)
    assert bad.returncode == 2 and "pip install 'jaxgpt[torch]'" in bad.stderr and "Traceback" not in bad.stderr


def _variant(work: Path, dst: Path, config: dict | None = None, drop: str | None = None, add: str | None = None,
             reshape: str | None = None, tokenizer_vocab: int | None = None) -> None:
    from safetensors.numpy import load_file, save_file

    shutil.copytree(work / "bpe", dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps({**cfg, **config}))
    sd = load_file(str(dst / "model.safetensors"))
    if drop:
        del sd[drop]
    if add:
        sd[add] = np.zeros(3, np.float32)
    if reshape:
        sd[reshape] = sd[reshape][:, :-1].copy()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer_vocab:  # a tokenizer with more tokens than the model's embedding has rows
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(dst / "tokenizer.json"))
        tok.add_tokens([f"<extra{i}>" for i in range(tokenizer_vocab)])
        tok.save(str(dst / "tokenizer.json"))


BAD = [
    ("not a model", dict(), "is not a jaxgpt run folder"),
    ("no weights", dict(), "has a config.json but no weights"),
    ("other model_type", dict(config={"model_type": "llama"}), "model_type is 'llama'"),
    ("inverse layer idx", dict(config={"scale_attn_by_inverse_layer_idx": True}), "scale_attn_by_inverse_layer_idx=True"),
    ("reorder attn", dict(config={"reorder_and_upcast_attn": True}), "reorder_and_upcast_attn=True"),
    ("n_inner", dict(config={"n_inner": 100}), "n_inner=100 is not supported"),
    ("activation", dict(config={"activation_function": "relu"}), "activation_function='relu'"),
    ("missing tensor", dict(drop="transformer.h.1.mlp.c_fc.weight"), "missing tensors ['transformer.h.1.mlp.c_fc.weight']"),
    ("extra tensor", dict(add="transformer.h.0.extra"), "unexpected tensors ['transformer.h.0.extra']"),
    ("shape", dict(reshape="transformer.h.0.attn.c_attn.weight"), "transformer.h.0.attn.c_attn.weight has shape (64, 191)"),
    ("tokenizer vocab", dict(tokenizer_vocab=10), "tokens but the model only"),
]


@pytest.mark.parametrize("name, how, message", BAD, ids=[b[0] for b in BAD])
def test_a_folder_the_model_cannot_take_gets_one_line_and_nothing_is_written(work, tmp_path, name, how, message):
    src = tmp_path / "src"
    if name == "not a model":
        src.mkdir()
        (src / "notes.txt").write_text("hello")
    elif name == "no weights":
        src.mkdir()
        shutil.copy(work / "bpe" / "config.json", src)
    else:
        _variant(work, src, **how)
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    proc = cli("convert", str(src), str(tmp_path / "dst"), cwd=tmp_path, check=False)
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    assert message in lines[0], lines[0]
    assert not (tmp_path / "dst").exists()
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "a failed conversion changed files"
