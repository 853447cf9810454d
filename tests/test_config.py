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


def test_user_error_is_a_value_error():
    assert issubclass(UserError, ValueError)


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
    from jaxgpt.config import base_values

    parser = make_parser("t", GPTConfig, TrainConfig, presets=True)
    args = parser.parse_args(["--preset=cpu", "--recipe=modern", "--muon_lr=0.05", "--qk_norm=false", "--n_layer=3"])
    base = base_values(args.preset, args.recipe)
    model, train = build(GPTConfig, args, base), build(TrainConfig, args, base)
    assert (model.n_layer, model.n_embd, model.block_size) == (3, 128, 64)  # the flag's depth, the cpu preset's width
    assert build(GPTConfig, parser.parse_args(["--preset=cpu", "--recipe=modern"]), base).n_layer == 2  # the recipe's depth
    assert (train.batch_size, train.max_iters, train.warmup_iters) == (32, 95, 5)  # the recipe's own batch and schedule here
    assert train.muon_momentum == 0.85  # ... and its momentum for a short run
    # evaluates at least as many windows as nanoGPT's estimate, by less than a batch more
    assert (train.eval_iters - 1) * train.batch_size < 20 * 12 <= train.eval_iters * train.batch_size
    assert model.pos_embedding == "rope" and model.norm == "rmsnorm" and not model.qk_norm  # recipe, then the flag
    assert train.optimizer == "muon" and train.muon_lr == 0.05 and train.recipe == "modern"
    assert base_values("cpu", "nanogpt") == PRESETS["cpu"]  # the default recipe changes nothing
    seed = build(TrainConfig, parser.parse_args(["--recipe=modern"]), base_values("gpu", "modern"))
    assert (seed.batch_size, seed.max_iters, seed.decay_iters, seed.warmup_iters) == (64, 2000, 2000, 200)
    assert seed.muon_momentum == RECIPES["modern"]["muon_momentum"] == 0.95
    assert seed.muon_lr == 0.03 and seed.muon_beta2 == train.muon_beta2 == 0.95  # NorMuon in both; lr 0.07 is the cpu preset's
    assert build(TrainConfig, parser.parse_args(["--preset=cpu", "--recipe=modern"]), base).muon_lr == 0.07
    assert build(GPTConfig, parser.parse_args(["--recipe=modern"]), base_values("gpu", "modern")).dropout == 0.2
    assert base_values("gpu", "nanogpt") == {}  # the seed config: nanoGPT's 5000 steps stay the default
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
