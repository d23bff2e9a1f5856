"""Credit estimators: hand-computed values, a slow loop reference, and masking invariance."""

import math

import pytest
import torch

from llmrl.credit import CREDIT, CreditInputs, assign_credit


def inputs(scores, mask, groups, **kw):
    return CreditInputs(scores=torch.tensor(scores, dtype=torch.float32), response_mask=torch.tensor(mask, dtype=torch.float32),
                        group_ids=torch.tensor(groups), **kw)


def test_broadcast_hand_computed():
    c = assign_credit("broadcast", inputs([1.0, 0.0], [[1, 1, 0], [1, 0, 0]], [0, 0]))
    assert torch.equal(c.advantages, torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_broadcast_adds_token_rewards_to_the_return():
    x = inputs([1.0], [[1, 1, 0]], [0], token_rewards=torch.tensor([[-0.1, -0.2, -5.0]]))
    c = assign_credit("broadcast", x)
    assert torch.allclose(c.advantages, torch.tensor([[0.7, 0.7, 0.0]]))  # the masked -5.0 is ignored


def test_grpo_hand_computed():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3); group 1: all equal -> 0
    c = assign_credit("grpo", inputs([1, 0, 0, 1, 2, 2], [[1, 1]] * 6, [0, 0, 0, 0, 1, 1]), eps=1e-8)
    a = 0.5 / math.sqrt(1 / 3)
    expected = torch.tensor([a, -a, -a, a, 0.0, 0.0])
    assert torch.allclose(c.advantages[:, 0], expected, atol=1e-6)
    assert torch.allclose(c.advantages[:, 1], expected, atol=1e-6)


def test_grpo_without_std_is_the_group_mean_baseline():
    c = assign_credit("grpo", inputs([3.0, 1.0, 0.0, 4.0], [[1]] * 4, [0, 0, 1, 1]), normalize_std=False)
    assert torch.allclose(c.advantages[:, 0], torch.tensor([1.0, -1.0, -2.0, 2.0]))


def slow_grpo(scores, groups, normalize_std, eps):
    out = []
    for i, s in enumerate(scores):
        members = [scores[j] for j in range(len(scores)) if groups[j] == groups[i]]
        mean = sum(members) / len(members)
        var = sum((m - mean) ** 2 for m in members) / max(1, len(members) - 1)
        out.append((s - mean) / (math.sqrt(var) + eps) if normalize_std else s - mean)
    return out


@pytest.mark.parametrize("normalize_std", [True, False])
def test_grpo_matches_slow_loop(normalize_std):
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(24, generator=g).tolist()
    groups = torch.randint(0, 5, (24,), generator=g).tolist()
    mask = (torch.rand(24, 7, generator=g) > 0.3).float()
    c = assign_credit("grpo", CreditInputs(torch.tensor(scores), mask, torch.tensor(groups)),
                      normalize_std=normalize_std, eps=1e-6)
    ref = torch.tensor(slow_grpo(scores, groups, normalize_std, 1e-6))
    assert torch.allclose(c.advantages, ref[:, None] * mask, atol=1e-5)


@pytest.mark.parametrize("name", CREDIT.names())
def test_padding_columns_do_not_change_advantages(name):
    g = torch.Generator().manual_seed(1)
    scores, groups = torch.rand(8, generator=g), torch.arange(4).repeat_interleave(2)
    mask = (torch.rand(8, 5, generator=g) > 0.2).float()
    # values and steps for the estimators that read them (one step per 2 tokens, a score per step)
    steps = dict(values=torch.rand(8, 5, generator=g), step_ids=torch.arange(5).repeat(8, 1) // 2,
                 step_scores=torch.rand(8, 3, generator=g), token_rewards=-torch.rand(8, 5, generator=g))
    base = assign_credit(name, CreditInputs(scores, mask, groups, **steps))
    padded_mask = torch.cat([mask, torch.zeros(8, 3)], 1)
    pad = lambda x: torch.cat([x, torch.zeros(8, 3, dtype=x.dtype)], 1)  # noqa: E731
    padded = assign_credit(name, CreditInputs(scores, padded_mask, groups, values=pad(steps["values"]),
                                              step_ids=pad(steps["step_ids"]), step_scores=steps["step_scores"],
                                              token_rewards=pad(steps["token_rewards"])))
    assert torch.allclose(padded.advantages[:, :5], base.advantages)
    assert torch.all(padded.advantages[:, 5:] == 0)
    assert torch.all(base.advantages[mask == 0] == 0)


def test_shape_mismatch_fails_loudly():
    with pytest.raises(ValueError, match="scores"):
        CreditInputs(torch.zeros(3), torch.ones(4, 2), torch.zeros(4, dtype=torch.long))


def test_unknown_estimator_lists_valid_names():
    with pytest.raises(KeyError, match="valid: .*grpo"):
        assign_credit("gpro", inputs([1.0], [[1]], [0]))
