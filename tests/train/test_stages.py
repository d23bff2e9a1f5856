"""The optional stages of an RL step: `plan` picks exactly the ones a config needs, in order, and each fills the
rollout field it names (what the credit estimator then reads)."""

from types import SimpleNamespace

import pytest
import torch

from llmrl.compute.settings import Execution
from llmrl.config_loader import load_config
from llmrl.data import Example
from llmrl.objectives.mismatch import Correction
from llmrl.presets import PRESETS
from llmrl.rollout.collect import collect_rollout
from llmrl.train import stages


def names(cfg, engine=False):
    return [s.__name__ for s in stages.plan(cfg, engine)]


@pytest.mark.parametrize("preset, expected", [
    ("grpo", ["reference_logprobs"]),                    # k3 KL in the loss: the reference is read
    ("dr_grpo", []),                                     # no KL, outcome credit: nothing beyond the scores
    ("ppo", ["reference_logprobs", "critic_values"]),
    ("trpo", ["critic_values"]),
    ("vineppo", ["segment_steps", "monte_carlo_values"]),
])
def test_plan_picks_what_the_preset_needs(preset, expected):
    assert names(load_config(None, [f"preset={preset}"], presets=PRESETS)) == expected


def test_plan_orders_process_rewards_after_the_segmenter_and_puts_the_engine_first():
    cfg = load_config(None, ["preset=grpo", "credit.estimator=process", "credit.steps=regex",
                             "credit.step_pattern='[=.]'", "credit.step_reward=equations"], presets=PRESETS)
    assert names(cfg, engine=True) == ["engine_logprobs", "reference_logprobs", "segment_steps", "step_rewards"]


@pytest.fixture
def recipe(tiny):
    """The few fields of a Recipe the stages read, around the tiny model (its own reference and critic stand-in)."""
    model, tok = tiny
    cfg = load_config(None, ["credit.steps=regex", "credit.step_pattern='[ 0-9]'", "credit.step_reward=equations",
                             "rollout.tis_cap=2.0"])
    return SimpleNamespace(cfg=cfg, model=model, reference=model, tokenizer=tok, ex=Execution(micro_batch_size=4),
                           critic=SimpleNamespace(critic=lambda ids, mask, T: torch.ones(len(ids), T)),
                           mismatch=Correction(cfg.rollout.mismatch, cfg.rollout.tis_cap, cfg.rollout.mismatch_low))


@pytest.fixture
def rollout(tiny):
    model, tok = tiny
    exs = [Example("What is 1 + 2?", "3"), Example("Say 12", "12")]
    return collect_rollout(model, tok, exs, group_size=2, max_new_tokens=6, temperature=1.0,
                           generator=torch.Generator().manual_seed(0))


def test_reference_logprobs_of_the_policy_itself_equal_the_samplers(recipe, rollout):
    out, stats = stages.reference_logprobs(recipe, rollout)
    assert stats == {} and out.logp_ref.shape == rollout.logp_old.shape
    torch.testing.assert_close(out.logp_ref, rollout.logp_old, atol=1e-4, rtol=0)   # same model, same tokens


def test_engine_logprobs_replace_mu_by_pi_old_and_weigh_by_their_ratio(recipe, rollout):
    mu = (rollout.logp_old - 1.0) * rollout.response_mask         # an engine whose log-probs are 1 nat lower
    out, stats = stages.engine_logprobs(recipe, rollout.with_(logp_old=mu))
    torch.testing.assert_close(out.logp_old, rollout.logp_old, atol=1e-4, rtol=0)
    chosen = rollout.response_mask.bool()
    torch.testing.assert_close(out.is_weight[chosen], torch.full_like(out.is_weight[chosen], 2.0))  # e^1 > cap 2
    assert stats["tis_truncated_fraction"] == pytest.approx(1.0)


def test_steps_then_step_scores_then_critic_values(recipe, rollout):
    out, _ = stages.segment_steps(recipe, rollout)
    assert out.step_ids.shape == rollout.response_mask.shape and (out.step_ids[rollout.response_mask == 0] == -1).all()
    out, stats = stages.step_rewards(recipe, out)
    assert out.step_scores.shape[0] == len(rollout.completions) and "steps_scored" in stats
    out, _ = stages.critic_values(recipe, out)
    torch.testing.assert_close(out.values, rollout.response_mask)   # ones on the chosen tokens, 0 elsewhere
