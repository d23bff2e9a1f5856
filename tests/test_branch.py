"""Monte-Carlo step values (VinePPO) against a slow one-prefix-at-a-time reference, and the credit-source checks."""

import pytest
import torch

from llmrl.config import load_config
from llmrl.credit import step_ids_for_batch
from llmrl.data import Example
from llmrl.presets import PRESETS
from llmrl.rewards import REWARDS, score
from llmrl.rollout.branch import monte_carlo_values
from llmrl.rollout.collect import collect_rollout, stop_ids
from llmrl.rollout.sampler import generate
from llmrl.train.rl import check_credit_sources


@REWARDS.register("test_count_sevens")
def _sevens(completions, examples):
    return [float(c.count("7")) for c in completions]


def test_values_are_the_mean_reward_of_continuations_from_each_step(tiny):
    model, tok = tiny
    exs = [Example("What is 3 + 4?", "7"), Example("Say 77", "77")]
    r = collect_rollout(model, tok, exs, group_size=2, max_new_tokens=10, temperature=1.0,
                        generator=torch.Generator().manual_seed(3))
    steps = step_ids_for_batch(tok, r.response_ids, r.response_mask, mode="regex", pattern="[ 0-9]")
    terms = [("test_count_sevens", 1.0, {})]
    values, stats = monte_carlo_values(model, tok, r, steps, terms, samples=3, max_new_tokens=10, temperature=0.0)
    P = r.prompt_len
    checked = 0
    for i in range(len(r.completions)):
        for t in range(r.response_mask.shape[1]):
            first_of_step = steps[i, t] >= 0 and (t == 0 or steps[i, t - 1] != steps[i, t])
            if not first_of_step:
                assert values[i, t] == 0
                continue
            prefix = r.input_ids[i, :P][r.attention_mask[i, :P].bool()].tolist() + r.input_ids[i, P:P + t].tolist()
            s = generate(model, [prefix], max_new_tokens=10 - t, temperature=0.0, stop_ids=stop_ids(tok),
                         pad_id=tok.pad_token_id)
            n = int(s.response_mask.sum())
            text = tok.decode(r.input_ids[i, P:P + t].tolist() + s.response_ids[0, :n].tolist(), skip_special_tokens=True)
            assert values[i, t].item() == pytest.approx(score([text], [r.examples[i]], terms).total.item())
            checked += 1
    assert checked == stats["mc_boundaries"] > 0
    assert stats["mc_continuations"] == 3 * stats["mc_boundaries"]


@pytest.mark.parametrize("overrides, message", [
    (["credit.estimator=gae"], "needs values"),
    (["credit.estimator=vineppo", "credit.values=critic", "credit.steps=blank_line"], "no returns"),
    (["credit.estimator=vineppo", "credit.values=monte_carlo"], "segmenter"),
    (["credit.estimator=grpo", "credit.steps=regex"], "step_pattern"),
])
def test_mismatched_credit_sources_fail_before_training(overrides, message):
    with pytest.raises(ValueError, match=message):
        check_credit_sources(load_config(None, overrides))


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_has_consistent_credit_sources(name):
    check_credit_sources(load_config(None, [f"preset={name}"], presets=PRESETS))
