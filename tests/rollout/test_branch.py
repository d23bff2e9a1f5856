"""Monte-Carlo step values (VinePPO) against a slow one-prefix-at-a-time reference, and the credit-source checks."""

import pytest
import torch

from llmrl.config_loader import load_config
from llmrl.credit import CREDIT, step_boundaries, step_ids_for_batch
from llmrl.data import Example
from llmrl.presets import PRESETS
from llmrl.rewards import REWARDS, score
from llmrl.rollout.branch import monte_carlo_values
from llmrl.rollout.collect import collect_rollout, stop_ids
from llmrl.rollout.sampler import generate
from llmrl.train.checks import check_credit_sources


from llmrl.rewards.process import STEP_REWARDS


@STEP_REWARDS.register("test_step_len")
def _step_len(completions, step_texts, examples):
    return [[float(len(t)) for t in steps] for steps in step_texts]


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
    values, stats = monte_carlo_values(model, tok, r, step_boundaries(steps),
                                       lambda t, e: score(t, e, terms).total, samples=3, max_new_tokens=10, temperature=0.0)
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
    """Each preset passes the checks, and gives its estimator every source it declares it needs."""
    cfg = load_config(None, [f"preset={name}"], presets=PRESETS)
    check_credit_sources(cfg)                              # raises on an inconsistent preset
    needs = set(CREDIT.info(cfg.credit.estimator).get("needs", ()))
    assert "values" not in needs or cfg.credit.values != "none"
    assert ("steps" not in needs) or cfg.credit.steps != "none"


def test_process_rewards_flow_from_the_config_to_step_advantages(tmp_path):
    """credit.step_reward scores each step; the `process` estimator spreads it over the step's tokens."""
    from llmrl.cli import main
    from llmrl.runio.metrics import read_metrics

    args = ["train", "preset=grpo", "model.name=tiny", "model.autocast=none", "task.heldout_size=2",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=8", "run.progress=false",
            "run.steps=1", f"run.output_dir={tmp_path}", "run.name=p", "run.samples_every=1",
            "credit.estimator=process", "credit.options={}", "credit.steps=regex", "credit.step_pattern='[ ]'",
            "credit.step_reward=test_step_len"]
    assert main(args) == 0
    row = [r for r in read_metrics(tmp_path / "p" / "metrics.jsonl") if r["kind"] == "train"][0]
    assert row["steps_scored"] > 0 and row["step_reward_failures"] == 0
    sample = read_metrics(tmp_path / "p" / "samples.jsonl")[0]
    assert sample["step_ids"] is not None and len(sample["step_ids"]) == len(sample["advantages"])


def test_process_without_a_step_reward_fails_before_training():
    with pytest.raises(ValueError, match="step_reward"):
        check_credit_sources(load_config(None, ["credit.estimator=process", "credit.steps=blank_line"]))
