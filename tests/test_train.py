import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxgpt import GPTConfig, TrainConfig, UserError
from jaxgpt.data import prepare_text
from jaxgpt.optim import decay_mask, lr_schedule, make_optimizer
from jaxgpt.rundir import resolve_configs
from jaxgpt.step import init_state, make_train_step
from jaxgpt.train import train
from parity.checks import synthetic_corpus

MODEL = GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32, dropout=0.0, bias=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    prepare_text(synthetic_corpus(30_000).astype(np.uint8).tobytes(), root / "synth", "synthetic")
    return root


def _tc(data_dir, out_dir, **kw):
    base = dict(dataset="synth", data_dir=str(data_dir), out_dir=str(out_dir), batch_size=4, max_iters=12,
                eval_interval=4, eval_iters=2, log_interval=1, warmup_iters=2, lr_decay_iters=12, progress=False,
                plot=False)
    return TrainConfig(**{**base, **kw})


def _rows(out_dir):
    return [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_accumulated_gradients_equal_one_big_batch():
    tc1 = TrainConfig(batch_size=4, gradient_accumulation_steps=1, seed=0)
    tc2 = dataclasses.replace(tc1, batch_size=2, gradient_accumulation_steps=2)
    x = np.random.default_rng(0).integers(0, 256, (1, 4, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=-1)
    out = []
    for tc, shape in ((tc1, (1, 4, 16)), (tc2, (2, 2, 16))):
        graphdef, _, state = init_state(MODEL, tc)
        state, _ = make_train_step(graphdef, make_optimizer(tc), tc)(state, x.reshape(shape), y.reshape(shape), 0)
        state, _ = make_train_step(graphdef, make_optimizer(tc), tc)(state, x.reshape(shape), y.reshape(shape), 1)
        out.append(state.params)
    worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]), strict=True))
    assert worst <= 1e-6, f"accumulated update differs from the big-batch update by {worst}"


def test_batch_in_parts_equals_one_batch_and_keeps_nanogpt_default():
    """--batch_split: the mean of the parts' gradients is the whole batch's (float32 rounding apart), with
    accumulation too; the default (1) is the unsplit program, and a split must divide the rows."""
    x = np.random.default_rng(1).integers(0, 256, (2, 4, 16)).astype(np.int32)
    y = np.roll(x, -1, axis=-1)
    out, losses = [], []
    for split in (1, 2, 4):
        tc = TrainConfig(batch_size=4, gradient_accumulation_steps=2, seed=0, batch_split=split)
        graphdef, _, state = init_state(MODEL, tc)
        step = make_train_step(graphdef, make_optimizer(tc), tc)
        for i in range(2):
            state, metrics = step(state, x, y, i)
        out.append(state.params)
        losses.append(float(metrics["loss"]))
    for params, loss in zip(out[1:], losses[1:], strict=True):
        worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(out[0]), jax.tree.leaves(params), strict=True))
        assert worst <= 1e-6, f"the batch in parts updates the parameters {worst} away from the whole batch"
        assert loss == pytest.approx(losses[0], rel=1e-6)
    assert TrainConfig().batch_split == 1
    with pytest.raises(UserError, match="--batch_split=3 must divide --batch_size=4"):
        TrainConfig(batch_size=4, batch_split=3)
    with pytest.raises(UserError, match="--batch_split must be >= 0"):
        TrainConfig(batch_split=-1)


def test_weight_decay_applies_to_matrices_and_embeddings_only():
    graphdef, _, state = init_state(MODEL, TrainConfig())
    leaves = jax.tree_util.tree_flatten_with_path(decay_mask(state.params))[0]
    decayed = sorted(jax.tree_util.keystr(p, simple=True, separator=".").removesuffix(".value") for p, v in leaves if v)
    assert decayed == ["h.attn.c_attn.kernel", "h.attn.c_proj.kernel", "h.mlp.c_fc.kernel", "h.mlp.c_proj.kernel",
                       "wpe.embedding", "wte.embedding"]


def test_lr_schedule_warms_up_then_decays_to_min_lr():
    s = lr_schedule(TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, max_iters=2000))
    assert float(s(0)) == 0.0 and float(s(100)) == pytest.approx(1e-3)
    assert float(s(1050)) == pytest.approx((1e-3 + 1e-4) / 2, rel=1e-3)
    assert float(s(2000)) == pytest.approx(1e-4) and float(s(5000)) == pytest.approx(1e-4)


@pytest.mark.slow
def test_train_writes_metrics_plot_and_checkpoints(data_dir, tmp_path):
    out = tmp_path / "run"
    summary = train(MODEL, _tc(data_dir, out, plot=True))
    rows = _rows(out)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all({"step", "train_loss", "lr", "tokens_per_sec"} <= r.keys() for r in rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [4, 8, 12]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert (out / "loss.png").stat().st_size > 1000 and json.loads((out / "config.json").read_text())["model"]["n_layer"] == 1
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["12", "4", "8"]
    assert summary["val_loss"] == rows[-1]["val_loss"]


@pytest.mark.slow
def test_a_run_lowers_only_its_own_programs(data_dir, tmp_path):
    """Every eager op is a program of its own to trace, lower and load (~10-20 ms each at start-up):
    a run lowers its step, initialisers, schedule and evaluations, and nothing else."""
    lowered = []
    listen = lambda event, secs, **kw: lowered.append(kw.get("fun_name")) if event.endswith("jaxpr_to_mlir_module_duration") else None  # noqa: E731
    jax.clear_caches()  # an earlier test's eager ops must not hide this run's
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        train(dataclasses.replace(MODEL, dropout=0.1), _tc(data_dir, tmp_path / "run", max_iters=4))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    allowed = {"jit(train_step)", "jit(<lambda>)", "jit(init_fn)", "jit(schedule)", "jit(nll)"}
    assert "jit(train_step)" in lowered and set(lowered) <= allowed, f"eager programs in a run: {set(lowered) - allowed}"


@pytest.mark.slow
def test_eval_below_skips_evaluations_until_the_train_loss_is_near_and_stop_loss_ends_the_run(data_dir, tmp_path):
    """The ablation's switches (benchmarks/time_to_loss.py): no evaluation (but the last) while the mean of
    the last 20 train losses is above --eval_below; the first at or below --stop_loss ends the run."""
    train(MODEL, _tc(data_dir, tmp_path / "never", max_iters=28, eval_below=0.01))
    assert [r["step"] for r in _rows(tmp_path / "never") if "val_loss" in r] == [28]
    out = tmp_path / "near"
    summary = train(MODEL, _tc(data_dir, out, max_iters=40, eval_below=100.0, stop_loss=100.0, eval_full=True))
    evaluated = [r["step"] for r in _rows(out) if "val_loss" in r]
    assert len(evaluated) == 1 and 20 <= evaluated[0] < 40 and evaluated[0] % 4 == 0, evaluated  # gate open, then stop
    assert summary["val_loss"] <= 100.0 and _rows(out)[-1]["step"] == evaluated[0]


@pytest.mark.slow
def test_resume_continues_bit_identically(data_dir, tmp_path):
    train(MODEL, _tc(data_dir, tmp_path / "straight"))
    train(MODEL, _tc(data_dir, tmp_path / "split", max_iters=8))
    summary = train(MODEL, _tc(data_dir, tmp_path / "split", resume=True))
    assert summary["start_step"] == 8
    assert _rows(tmp_path / "split") == [dict(r, tokens_per_sec=s["tokens_per_sec"]) for r, s in
                                          zip(_rows(tmp_path / "straight"), _rows(tmp_path / "split"), strict=True)]


@pytest.mark.slow
def test_starting_over_an_existing_run_is_refused(data_dir, tmp_path):
    train(MODEL, _tc(data_dir, tmp_path / "r", max_iters=4))
    with pytest.raises(UserError, match="--resume"):
        train(MODEL, _tc(data_dir, tmp_path / "r", max_iters=4))


@pytest.mark.slow
def test_resume_with_a_different_model_names_the_difference(data_dir, tmp_path):
    tc = _tc(data_dir, tmp_path / "r", max_iters=4)
    train(MODEL, tc)
    with pytest.raises(UserError, match=r"n_embd=64 \(checkpoint has 32\)"):
        resolve_configs({"n_embd": 64, "n_layer": 1}, {"out_dir": tc.out_dir, "resume": True}, {})
    model_cfg, tc2 = resolve_configs({"n_layer": 1}, {"out_dir": tc.out_dir, "resume": True, "max_iters": 8}, {})
    assert model_cfg == MODEL and tc2.max_iters == 8 and tc2.batch_size == 4


@pytest.mark.slow
def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoint(data_dir, tmp_path):
    out = tmp_path / "nan"
    train(MODEL, _tc(data_dir, out, max_iters=4))
    with pytest.raises(UserError, match="loss became nan"):
        train(MODEL, _tc(data_dir, out, max_iters=12, learning_rate=1e30, min_lr=0.0, resume=True))
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.isdigit()) == ["4"]


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_master_weights(data_dir, tmp_path):
    tc = _tc(data_dir, tmp_path / "bf16", dtype="bfloat16", max_iters=4)
    graphdef, _, state = init_state(MODEL, tc)
    x = np.zeros((1, 4, 16), np.int32)
    state, metrics = make_train_step(graphdef, make_optimizer(tc), tc)(state, x, x, 0)
    assert {p.dtype for p in jax.tree.leaves(state.params)} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"]))


def test_a_fresh_state_of_every_recipe_is_strongly_typed_so_the_step_compiles_once():
    """A weakly typed leaf in the fresh state (jnp.full(.., 0.5) gives one) differs from the strongly
    typed state the step returns: jit traced and compiled the step again on its second call."""
    from jaxgpt.presets import RECIPES

    small = {k: getattr(MODEL, k) for k in ("block_size", "n_head", "n_embd", "dropout", "bias")}
    for name, recipe in RECIPES.items():  # the recipe's values split into the two configs as train.py does
        model_cfg, tc = resolve_configs({**small, "n_layer": 2}, {"batch_size": 2, "remat": "none"}, recipe)
        graphdef, _, state = init_state(model_cfg, tc)
        weak = [jax.tree_util.keystr(k) for k, v in jax.tree_util.tree_leaves_with_path(state) if v.weak_type]
        assert not weak, f"{name}: weakly typed leaves in a fresh state: {weak}"
        step = make_train_step(graphdef, make_optimizer(tc), tc)
        x = jnp.zeros((1, 2, MODEL.block_size), jnp.int32)
        for i in range(2):
            state, _ = step(state, x, x, i)
        assert step._cache_size() == 1, f"{name}: the train step was compiled {step._cache_size()} times"
