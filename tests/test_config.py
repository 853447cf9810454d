import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError
from jaxgpt.config import PRESETS, RECIPES, build, make_parser


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
    from jaxgpt.config import RECIPE_FOR_PRESET, base_values

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
