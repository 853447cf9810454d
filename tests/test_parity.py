"""The parity checks of `python -m parity`, one pytest case each."""
import pytest

from parity.checks import bf16_checks, generation_checks, model_checks, training_checks
from parity.recipe_checks import SWITCHES, recipe_run_checks, switch_model_checks

MODEL_CHECKS = list(model_checks())


@pytest.mark.parametrize("check", MODEL_CHECKS, ids=[f"model{i}" for i in range(len(MODEL_CHECKS))])
def test_model_parity(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"


@pytest.mark.slow
@pytest.mark.parametrize("check", list(training_checks()))
def test_training_trajectory_matches_torch(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"


@pytest.mark.slow
@pytest.mark.parametrize("check", list(generation_checks()), ids=lambda c: c.__name__)
def test_generation_matches_torch_and_full_forward(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"


@pytest.mark.slow
@pytest.mark.parametrize("check", list(bf16_checks()), ids=lambda c: c.__name__)
def test_bf16_compute_matches_torch_autocast_and_fp32_training(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"


SWITCH_CHECKS = list(switch_model_checks())


@pytest.mark.parametrize("check", SWITCH_CHECKS, ids=list(SWITCHES))
def test_each_recipe_switch_matches_its_torch_twin(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"


# Decoding is checked here for the full recipe, whose decode path goes through every switch at once
# (each switch alone costs ~20 s of compilation per row); `python -m parity --only recipe` runs every row.
DECODED = ("modern",)


@pytest.mark.slow
@pytest.mark.parametrize("check", list(recipe_run_checks(DECODED)),
                         ids=[f"decoding-{n}" for n in DECODED] + ["rope_past_block", "muon_training", "normuon_training",
                                                                  "bf16", "bf16_matmuls", "explicit_attention",
                                                                  "batch_split"])
def test_recipe_decoding_training_and_bf16_match_torch(check):
    for r in check():
        assert r.passed, f"{r.check} [{r.case}]: {r.value:.3g} > tolerance {r.tolerance:.0e}"
