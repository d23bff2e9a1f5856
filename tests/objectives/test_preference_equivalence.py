"""The seed's claim, checked: with Bradley-Terry preferences DPO and KL-regularised RL reach the same policy;
with preferences derived from an outcome reward they do not (examples/dpo_equivalence.py)."""

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[2] / "examples" / "dpo_equivalence.py"
_spec = importlib.util.spec_from_file_location("dpo_equivalence", _PATH)
eq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(eq)


@pytest.fixture(scope="module", params=[0, 1])
def result(request):
    return eq.run_equivalence(seed=request.param)


def test_closed_form_equals_kl_regularised_rl(result):
    assert result["bt"]["tv_closed_vs_rl"] < eq.TOL_RL
    assert result["outcome"]["tv_closed_vs_rl"] < eq.TOL_RL


def test_dpo_on_bradley_terry_pairs_reaches_the_rl_optimum(result):
    tv = result["bt"]["tv_closed_vs_dpo"]
    assert tv[eq.PAIR_COUNTS[-1]] < eq.TOL_DPO
    assert tv[eq.PAIR_COUNTS[-1]] < tv[eq.PAIR_COUNTS[0]]          # the gap is sampling error: it shrinks with pairs


def test_dpo_on_outcome_preferences_misses_the_rl_optimum(result):
    o = result["outcome"]
    assert o["deterministic"]["tv_rl_vs_dpo"] > eq.MIN_GAP_OUTCOME
    assert o["deterministic"]["pass_mass_dpo"] > 0.999 > o["pass_mass_rl"]      # DPO drives pi(fail) to 0
    assert o["noisy_0.9"]["tv_rl_vs_dpo"] > eq.MIN_GAP_OUTCOME
    # ... and the noisy labels are Bradley-Terry in log(9) r: DPO finds that reward's RL optimum instead
    assert o["noisy_0.9"]["tv_dpo_vs_rescaled_closed_form"] < eq.TOL_DPO
