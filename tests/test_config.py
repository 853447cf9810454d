import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError
from jaxgpt.config import build, make_parser
from jaxgpt.presets import PRESETS, RECIPES


@pytest.mark.parametrize("kwargs, field", [
    (dict(n_embd=65, n_head=2), "n_embd"),
    (dict(n_layer=0), "n_layer"),
    (dict(block_size=-1), "block_size"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(n_head=0), "n_head"),
    (dict(dropout=1.0), "dropout"),
    (dict(dropout=-0.1), "dropout"),
])
def test_invalid_gpt_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        GPTConfig(**kwargs)


def test_gpt_config_from_dict_ignores_extra_keys():
    cfg = GPTConfig.from_dict({"n_layer": 3, "n_head": 3, "n_embd": 48, "unrelated": 1})
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd) == (3, 3, 48)


def test_cli_accepts_seed_flags_and_preset_overrides():
    parser = make_parser("t", GPTConfig, TrainConfig, presets=True)
    args = parser.parse_args(["--preset=cpu", "--max_iters=20", "--bias=false", "--n_embd=64"])
    base = PRESETS[args.preset]
    model, train = build(GPTConfig, args, base), build(TrainConfig, args, base)
    assert train.max_iters == 20 and train.batch_size == 12
    assert model.n_embd == 64 and model.n_layer == 4 and model.bias is False


def test_cli_unknown_flag_raises_user_error():
    parser = make_parser("t", GPTConfig, TrainConfig, presets=True)
    with pytest.raises(UserError, match="unrecognized"):
        parser.parse_args(["--not_a_flag=1"])


@pytest.mark.parametrize("flag", ["--dtype=float16", "--remat=some", "--batch_size=abc"])
def test_cli_bad_values_raise_user_error(flag):
    parser = make_parser("t", GPTConfig, TrainConfig, presets=True)
    with pytest.raises(UserError):
        parser.parse_args([flag])


def test_recipe_composes_with_the_preset_and_explicit_flags_win():
    """Each value comes from the first of: an explicit flag, the recipe's values for this preset, the recipe's,
    the preset's, the default -- checked against the tables themselves, not copies of their numbers."""
    from jaxgpt.presets import RECIPE_FOR_PRESET, base_values

    parser = make_parser("t", GPTConfig, TrainConfig, presets=True)
    explicit = {"muon_lr": 0.05, "qk_norm": False, "n_layer": 3}
    args = parser.parse_args(["--preset=cpu", "--recipe=modern", "--muon_lr=0.05", "--qk_norm=false", "--n_layer=3"])
    base = base_values(args.preset, args.recipe)
    model, train = build(GPTConfig, args, base), build(TrainConfig, args, base)
    value = lambda k: getattr(model, k) if hasattr(model, k) else getattr(train, k)  # noqa: E731
    for layer in (PRESETS["cpu"], RECIPES["modern"], RECIPE_FOR_PRESET[("modern", "cpu")], explicit):  # later wins
        for k in layer:
            want = next(src[k] for src in (explicit, RECIPE_FOR_PRESET[("modern", "cpu")], RECIPES["modern"],
                                           PRESETS["cpu"]) if k in src)
            assert value(k) == want, (k, value(k), want)
    assert train.recipe == "modern" and base_values("cpu", "nanogpt") == PRESETS["cpu"]  # nanogpt changes nothing
    assert base_values("gpu", "nanogpt") == {}  # the seed config: nanoGPT's defaults stay the defaults
    # the recipe's CPU estimate takes at least nanoGPT's windows (the preset's eval_iters x batch), by less than a batch
    nanogpt_windows = PRESETS["cpu"]["eval_iters"] * PRESETS["cpu"]["batch_size"]
    assert (train.eval_iters - 1) * train.batch_size < nanogpt_windows <= train.eval_iters * train.batch_size
    seed = build(TrainConfig, parser.parse_args(["--recipe=modern"]), base_values("gpu", "modern"))
    assert all(getattr(seed, k) == v for k, v in RECIPE_FOR_PRESET[("modern", "gpu")].items())
    assert build(GPTConfig, parser.parse_args(["--recipe=modern"]), base_values("gpu", "modern")).dropout == \
        GPTConfig().dropout  # the recipe leaves the seed config's dropout
    assert "with --preset=gpu also" in parser.epilog and "with --preset=cpu also" in parser.epilog


@pytest.mark.parametrize("kwargs, field", [(dict(pos_embedding="alibi"), "pos_embedding"), (dict(norm="batch"), "norm"),
                                           (dict(activation="swish"), "activation"), (dict(logit_softcap=-1.0), "logit_softcap"),
                                           (dict(pos_embedding="rope", n_embd=12, n_head=4), "even"),
                                           (dict(qk_norm=1), "qk_norm"), (dict(rope_base=0.5), "rope_base"),
                                           (dict(value_embeds=2), "value_embeds"), (dict(value_embeds=-1), "value_embeds")])
def test_invalid_switches_name_the_field(kwargs, field):
    with pytest.raises(UserError, match=field):
        GPTConfig(**{"n_layer": 1, "n_head": 2, "n_embd": 32, **kwargs})


def test_invalid_optimizer_settings_name_the_flag():
    for kwargs, flag in [(dict(optimizer="sgd"), "--optimizer"), (dict(muon_momentum=1.0), "--muon_momentum"),
                         (dict(recipe="speedrun"), "--recipe"), (dict(stop_loss=-1.0), "--stop_loss"),
                         (dict(eval_below=-1.0), "--eval_below"), (dict(muon_beta2=1.0), "--muon_beta2")]:
        with pytest.raises(UserError, match=flag):
            TrainConfig(**kwargs)


def test_the_gpt2_preset_is_llm_c_and_build_nanogpt_recipe(tmp_path):
    """--preset=gpt2: the 124M model and FineWeb-edu 10B recipe the issue specifies (llm.c, build-nanogpt), every
    value reaching the configs unless a flag overrides it; the GPT-2 vocabulary padded to 50304."""
    from jaxgpt.rundir import resolve_configs

    p = PRESETS["gpt2"]
    model, tc = resolve_configs({}, {"out_dir": str(tmp_path / "run")}, p, data_vocab=50257)
    assert (model.n_layer, model.n_head, model.n_embd, model.block_size, model.vocab_size, model.dropout, model.bias) == \
           (12, 12, 768, 1024, 50304, 0.0, True)
    assert round(model.num_params() / 1e6) == 124, model.num_params()
    tokens_per_step = tc.batch_size * tc.gradient_accumulation_steps * model.block_size
    assert tokens_per_step == 524288 and p["batch_auto"] and tc.max_iters == 19073
    assert abs(tokens_per_step * tc.max_iters - 10e9) < 0.001 * 10e9  # 10 B tokens
    assert (tc.learning_rate, tc.min_lr, tc.warmup_iters, tc.lr_decay_iters) == (6e-4, 6e-5, 715, 0)  # 0: to max_iters
    assert (tc.beta1, tc.beta2, tc.weight_decay, tc.grad_clip, tc.data_order) == (0.9, 0.95, 0.1, 1.0, "epoch")
    assert tc.dtype == "auto" and tc.eval_full and tc.val_tokens == 20 * 524288
    medium, _ = resolve_configs({}, {"out_dir": str(tmp_path / "m")}, PRESETS["gpt2-medium"], data_vocab=50257)
    assert (medium.n_layer, medium.n_head, medium.n_embd) == (24, 16, 1024) and round(medium.num_params(False) / 1e6) == 355
    small, tc = resolve_configs({"n_embd": 64, "n_head": 2, "vocab_size": 512}, {"out_dir": str(tmp_path / "s"),
                                "learning_rate": 1e-3}, p, data_vocab=400)
    assert (small.n_embd, small.vocab_size, tc.learning_rate, small.n_layer) == (64, 512, 1e-3, 12)  # flags win
    bigger, _ = resolve_configs({}, {"out_dir": str(tmp_path / "b")}, p, data_vocab=60000)
    assert bigger.vocab_size == 60000, "a vocabulary larger than the preset's is the data's"
