import pickle

import numpy as np
import pytest
import torch
from flax import nnx

import torchref
from formats.io import load_any, save_jaxgpt, save_pt, save_safetensors
from formats.table import NANOGPT_ARGS, flat_params, from_torch_state_dict
from jaxgpt import GPT, GPTConfig, UserError
from jaxgpt.tokenizer import load_meta_pkl
from parity.checks import jax_logits, torch_logits

CFG = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, bias=True)


def _nanogpt_ckpt(path, cfg=CFG, compiled=True):
    """What nanoGPT's train.py writes: compiled-model keys, optimizer state, tensor best_val_loss."""
    torch.manual_seed(0)
    model = torchref.GPT(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros((1, 4), dtype=torch.long)).sum().backward()
    opt.step()
    sd = {("_orig_mod." if compiled else "") + k: v for k, v in model.state_dict().items()}
    torch.save({"model": sd, "optimizer": opt.state_dict(), "model_args": cfg.to_dict(), "iter_num": 250,
                "best_val_loss": torch.tensor(1.4697), "config": {"dataset": "shakespeare_char"}}, path)
    return model.eval()


def test_real_nanogpt_checkpoint_loads_with_identical_logits(tmp_path):
    tmodel = _nanogpt_ckpt(tmp_path / "ckpt.pt")
    model, info = load_any(tmp_path / "ckpt.pt")
    assert info["step"] == 250 and info["val_loss"] == pytest.approx(1.4697)
    idx = np.random.default_rng(0).integers(0, 256, (2, 16))
    assert np.abs(jax_logits(model, idx) - torch_logits(tmodel, idx)).max() <= 1e-5


def test_nanogpt_causal_mask_buffers_are_ignored():
    sd = torchref.GPT(CFG).state_dict()
    sd["transformer.h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
    from_torch_state_dict(sd, CFG)


def test_key_problems_are_all_listed():
    sd = torchref.GPT(CFG).state_dict()
    del sd["transformer.h.1.mlp.c_fc.weight"]
    sd["transformer.h.0.attn.c_proj.weight"] = torch.zeros(5, 5)
    sd["transformer.extra"] = torch.zeros(1)
    with pytest.raises(UserError) as e:
        from_torch_state_dict(sd, CFG)
    msg = str(e.value)
    assert "transformer.h.1.mlp.c_fc.weight" in msg and "transformer.extra" in msg
    assert "transformer.h.0.attn.c_proj.weight has shape (5, 5), expected (32, 32)" in msg


def test_untied_head_is_refused():
    sd = dict(torchref.GPT(CFG).state_dict())
    sd["lm_head.weight"] = sd["lm_head.weight"].clone() + 1
    with pytest.raises(UserError, match="differs"):
        from_torch_state_dict(sd, CFG)


def test_all_formats_round_trip_bit_exactly(tmp_path):
    model = GPT(CFG, rngs=nnx.Rngs(3))
    info = {"step": 7, "val_loss": 2.5}
    save_pt(model, tmp_path / "a.pt", info)
    m_pt, i_pt = load_any(tmp_path / "a.pt")
    save_safetensors(m_pt, tmp_path / "a.safetensors", i_pt)
    m_st, i_st = load_any(tmp_path / "a.safetensors")
    save_jaxgpt(m_st, tmp_path / "run", i_st)
    m_jx, i_jx = load_any(tmp_path / "run")
    assert i_jx["step"] == i_st["step"] == i_pt["step"] == 7 and i_jx["val_loss"] == 2.5
    ref = flat_params(model)
    for m in (m_pt, m_st, m_jx):
        got = flat_params(m)
        assert all(np.array_equal(ref[k], got[k]) for k in ref)
    loaded = torch.load(tmp_path / "a.pt", weights_only=True)
    t = torchref.GPT(CFG)
    t.load_state_dict(loaded["model"])  # strict: nanoGPT's module accepts it as is
    # nanoGPT's GPTConfig(**model_args) takes exactly its own keys (the model's other fields are at nanoGPT's values)
    assert loaded["model_args"] == {k: v for k, v in CFG.to_dict().items() if k in NANOGPT_ARGS}


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_code_in_a_pt_is_refused_and_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    sd = {k: v for k, v in torchref.GPT(CFG).state_dict().items()}
    torch.save({"model": sd, "model_args": CFG.to_dict(), "payload": _Evil(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="refusing"):
        load_any(tmp_path / "evil.pt")
    assert not marker.exists()


def test_meta_pkl_is_read_without_running_code(tmp_path):
    chars = sorted(set("hello world\n"))
    with open(tmp_path / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": {c: i for i, c in enumerate(chars)}}, f)
    tok = load_meta_pkl(tmp_path / "meta.pkl")
    assert tok.decode(tok.encode("hello")) == "hello"
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump(_Evil(str(marker)), f)
    with pytest.raises(UserError, match="refusing"):
        load_meta_pkl(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("payload", [[1, 2, 3], {"weights": torch.zeros(2)}, torch.zeros(3)])
def test_pt_that_is_not_a_checkpoint_gets_a_clear_error(tmp_path, payload):
    torch.save(payload, tmp_path / "x.pt")
    with pytest.raises(UserError, match="not a nanoGPT checkpoint"):
        load_any(tmp_path / "x.pt")


def test_truncated_pt_gets_a_clear_error(tmp_path):
    _nanogpt_ckpt(tmp_path / "ckpt.pt")
    data = (tmp_path / "ckpt.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="cannot read"):
        load_any(tmp_path / "cut.pt")


MODERN = GPTConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False, pos_embedding="rope", norm="rmsnorm",
                   qk_norm=True, activation="relu2", tie_embeddings=False, logit_softcap=15.0, value_embeds=1)


def test_modern_models_round_trip_through_safetensors_and_run_folders(tmp_path):
    model = GPT(MODERN, rngs=nnx.Rngs(4))
    model.eval()
    idx = np.random.default_rng(0).integers(0, 256, (2, 16))
    save_safetensors(model, tmp_path / "m.safetensors", {"step": 7})
    save_jaxgpt(model, tmp_path / "run", {"step": 7})
    for path in (tmp_path / "m.safetensors", tmp_path / "run"):
        back, info = load_any(path)
        assert back.config == model.config, path
        a, b = flat_params(model), flat_params(back)
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
        np.testing.assert_array_equal(jax_logits(back, idx), jax_logits(model, idx))


@pytest.mark.parametrize("switch", [dict(pos_embedding="rope"), dict(norm="rmsnorm"), dict(qk_norm=True),
                                    dict(activation="relu2"), dict(tie_embeddings=False), dict(logit_softcap=30.0),
                                    dict(value_embeds=1)])
def test_nanogpt_and_hf_formats_refuse_what_they_cannot_hold_naming_the_field(tmp_path, switch):
    from formats.hf import write_hf

    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, **switch), rngs=nnx.Rngs(0))
    field = next(iter(switch))
    with pytest.raises(UserError, match=f"ckpt.pt cannot hold this model \\({field}="):
        save_pt(model, tmp_path / "x.pt", {})
    (tmp_path / "hf").mkdir()
    with pytest.raises(UserError, match=f"GPT-2 folder cannot hold this model \\({field}="):
        write_hf(model, tmp_path / "hf", None)
    assert not (tmp_path / "x.pt").exists() and not any((tmp_path / "hf").iterdir())


def test_nanogpt_models_keep_their_model_args_and_zero_init_converts(tmp_path):
    """A default model's ckpt.pt carries no recipe field; zero_init_proj only changes the init, so it converts."""
    from formats.table import model_args_from_config

    assert set(model_args_from_config(CFG)) == set(NANOGPT_ARGS)
    assert model_args_from_config(GPTConfig(activation="gelu_tanh"))["activation"] == "gelu_tanh"  # GPT-2's, kept
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, zero_init_proj=True), rngs=nnx.Rngs(0))
    save_pt(model, tmp_path / "z.pt", {})
    assert load_any(tmp_path / "z.pt")[0].config.zero_init_proj
