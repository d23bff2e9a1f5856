"""The critic: clipped value loss by hand, shared vs separate trunk, and that regression on returns learns."""

import copy

import pytest
import torch

from llmrl.models.value import Critic
from llmrl.objectives.policy import BatchCounts
from llmrl.objectives.value import clipped_value_loss, explained_variance
from llmrl.rollout.sampler import left_pad


def test_clipped_value_loss_hand_computed():
    v, v_old, R = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, -1.0]])
    m = torch.ones(1, 2)
    out = clipped_value_loss(v, v_old, R, m, BatchCounts.of(m), clip=0.5, coef=1.0)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.5-2)^2 = 2.25 -> max 2.25; token 1: 1 and 1 -> 1
    assert out.losses["loss_value"].item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert out.metrics["value_clip_fraction"].item() == pytest.approx(0.5)
    no_clip = clipped_value_loss(v, v_old, R, m, BatchCounts.of(m), clip=None, coef=1.0)
    assert no_clip.losses["loss_value"].item() == pytest.approx(0.5 * (1.0 + 1.0) / 2)


def test_explained_variance():
    R = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    assert explained_variance(R, R, m).item() == pytest.approx(1.0)
    assert explained_variance(torch.full_like(R, 2.0), R, m).item() == pytest.approx(0.0)


def test_shared_trunk_is_the_policys_and_not_in_critic_parameters(tiny):
    policy, _ = tiny
    shared = Critic.from_policy(policy, shared=True)
    own = Critic.from_policy(policy, shared=False)
    assert {id(p) for p in shared.parameters()} == {id(shared.head.weight), id(shared.head.bias)}
    policy_ids = {id(p) for p in policy.parameters()}
    assert not policy_ids & {id(p) for p in own.parameters()}
    assert len(list(own.parameters())) > 2


@pytest.mark.parametrize("shared", [True, False])
def test_critic_regresses_onto_returns(tiny, shared):
    policy, tok = tiny
    policy = copy.deepcopy(policy)
    critic = Critic.from_policy(policy, shared=shared)
    ids, mask = left_pad([tok("abc")["input_ids"], tok("hello there")["input_ids"]], tok.pad_token_id)
    T, R = 3, torch.tensor([[1.0] * 3, [-1.0] * 3])
    resp = torch.ones(2, T)
    params = list(critic.parameters()) + (list(policy.parameters()) if shared else [])
    opt = torch.optim.Adam(params, lr=1e-2)
    first = None
    for _ in range(100):
        v = critic(ids, mask, T)
        assert v.shape == (2, T)
        loss = clipped_value_loss(v, v.detach(), R, resp, BatchCounts.of(resp), clip=None).total
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first
