"""The truncated importance-sampling (TIS) correction of the training / inference mismatch: the weight and the
logged mismatch against hand-computed values, and the weight threaded through the PPO objective (no change
without it, each token's gradient scaled by it with it)."""

import math

import pytest
import torch

from llmrl.objectives.mismatch import mismatch_stats, truncated_is_weight
from llmrl.objectives.policy import BatchCounts, ppo_clip_objective


def t(x):
    return torch.tensor(x, dtype=torch.float32)


def test_weight_hand_computed():
    # pi / mu = 0.5/0.25, 0.2/0.4, 0.9/0.3, 0.1/0.1, 0.05/0.5 = 2, 0.5, 3, 1, 0.1; cap 2.5 truncates only the 3
    logp_policy = torch.log(t([[0.5, 0.2, 0.9, 0.1, 0.05]]))
    logp_sampler = torch.log(t([[0.25, 0.4, 0.3, 0.1, 0.5]]))
    w = truncated_is_weight(logp_policy, logp_sampler, cap=2.5)
    assert torch.allclose(w, t([[2.0, 0.5, 2.5, 1.0, 0.1]]), atol=1e-6)       # only the upper side is truncated
    assert torch.equal(truncated_is_weight(logp_sampler, logp_sampler, cap=2.0), torch.ones(1, 5))


def test_weight_is_detached_and_the_cap_is_checked():
    logp_policy = torch.zeros(2, 3, requires_grad=True)
    assert not truncated_is_weight(logp_policy, torch.zeros(2, 3), cap=2.0).requires_grad
    with pytest.raises(ValueError, match="cap"):
        truncated_is_weight(logp_policy, torch.zeros(2, 3), cap=0.5)


def test_mismatch_stats_hand_computed_over_chosen_tokens_only():
    logp_policy = t([[-1.0, -2.0, -0.5], [-0.1, -3.0, -9.0]])
    logp_sampler = t([[-1.5, -1.0, -0.5], [-1.1, -3.0, -1.0]])
    mask = t([[1, 1, 1], [1, 1, 0]])                      # the -8 gap sits on padding
    stats = mismatch_stats(logp_policy, logp_sampler, mask, cap=2.0)
    # gaps +0.5, -1, 0, +1, 0 -> |.| mean 2.5/5, max 1; ratios e^0.5=1.65, e^-1, 1, e^1=2.72, 1 -> one above 2
    assert stats["mismatch_logp_abs_mean"].item() == pytest.approx(0.5)
    assert stats["mismatch_logp_abs_max"].item() == pytest.approx(1.0)
    assert stats["tis_truncated_fraction"].item() == pytest.approx(1 / 5)
    empty = mismatch_stats(logp_policy, logp_sampler, torch.zeros(2, 3), cap=2.0)
    assert all(v.item() == 0 for v in empty.values())


def test_no_weight_and_unit_weight_change_nothing():
    g = torch.Generator().manual_seed(0)
    logp_old = -torch.rand(3, 5, generator=g)
    logp = (logp_old + 0.3 * torch.randn(3, 5, generator=g)).requires_grad_()
    adv, mask = torch.randn(3, 5, generator=g), (torch.rand(3, 5, generator=g) > 0.2).float()
    counts = BatchCounts.of(mask)
    kw = dict(logp_ref=logp_old - 0.1, entropy=torch.rand(3, 5, generator=g), kl_coef=0.05, entropy_coef=0.01)
    plain = ppo_clip_objective(logp, logp_old, adv, mask, counts, **kw)
    grad_plain, = torch.autograd.grad(plain.total, logp)
    unit = ppo_clip_objective(logp, logp_old, adv, mask, counts, is_weight=torch.ones(3, 5), **kw)
    grad_unit, = torch.autograd.grad(unit.total, logp)
    assert torch.equal(plain.total, unit.total) and torch.equal(grad_plain, grad_unit)
    assert all(torch.equal(plain.metrics[k], unit.metrics[k]) for k in plain.metrics)


def test_weight_scales_each_tokens_policy_gradient_hand_computed():
    # r = 1 (logp = logp_old), no clip active: d loss / d logp_t = -w_t A_t / #tokens (token-mean)
    logp = torch.zeros(1, 3, requires_grad=True)
    adv, w = t([[1.0, -2.0, 0.5]]), t([[2.0, 0.5, 1.0]])
    out = ppo_clip_objective(logp, logp.detach(), adv, torch.ones(1, 3), BatchCounts.of(torch.ones(1, 3)), is_weight=w)
    out.total.backward()
    assert torch.allclose(logp.grad, t([[-2 / 3, 1 / 3, -1 / 6]]), atol=1e-6)
    assert out.losses["loss_policy"].item() == pytest.approx(-(2 * 1 - 0.5 * 2 + 0.5) / 3)


def test_weight_keeps_the_gradient_sign_and_the_clip():
    # ratio 1.5 with A > 0 is clipped (eps 0.2): zero gradient whatever the weight; ratio 0.9 is not
    logp_old = torch.zeros(1, 2)
    logp = torch.log(t([[1.5, 0.9]])).requires_grad_()
    adv = t([[1.0, -1.0]])
    out = ppo_clip_objective(logp, logp_old, adv, torch.ones(1, 2), BatchCounts.of(torch.ones(1, 2)),
                             is_weight=t([[2.0, 0.25]]))
    out.total.backward()
    assert logp.grad[0, 0] == 0                                   # clipped token: no gradient
    assert logp.grad[0, 1].item() == pytest.approx(0.25 * 0.9 / 2)   # -w r A / 2, A = -1: pushes the bad token down
    assert out.metrics["clip_fraction"].item() == pytest.approx(0.5)


def test_truncation_bounds_a_token_the_sampler_undersampled():
    # mu gave the token e^-6 of pi's probability: the untruncated weight e^6 would dominate the batch
    w = truncated_is_weight(t([[math.log(0.5), math.log(0.5)]]), t([[math.log(0.5) - 6, math.log(0.5)]]), cap=2.0)
    assert w.tolist() == [[2.0, 1.0]]


# ----------------------------------------------------------------------------- the corrections registry

def batch():
    # r = pi_old / mu per token: row 0: 2, 0.25, 3 (all chosen); row 1: 1.5, 0.5, [8 on padding]
    logp_sampler = torch.zeros(2, 3)
    logp_policy = torch.log(t([[2.0, 0.25, 3.0], [1.5, 0.5, 8.0]]))
    mask = t([[1, 1, 1], [1, 1, 0]])
    return logp_policy, logp_sampler, mask


def test_corrections_hand_computed():
    from llmrl.objectives.mismatch import Correction

    lp, ls, m = batch()
    want = {
        "tis_token": [[2.0, 0.25, 2.5], [1.5, 0.5, 2.5]],
        "mis_token": [[2.0, 0.25, 0.0], [1.5, 0.5, 0.0]],       # r = 3 > 2.5: dropped, not truncated
        "icepop": [[2.0, 0.0, 0.0], [1.5, 0.5, 0.0]],           # outside [0.5, 2.5] either way: dropped
        "tis_seq": [[1.5] * 3, [0.75] * 3],                     # rho = 2 * 0.25 * 3 = 1.5; 1.5 * 0.5 = 0.75
        "mis_seq": [[1.5] * 3, [0.75] * 3],
        "geo_seq": [[1.5 ** (1 / 3)] * 3, [0.75 ** 0.5] * 3],   # the padding's 8 counts in neither
    }
    for name, w in want.items():
        got = Correction(name, cap=2.5, low=0.5)(lp, ls, m)
        assert torch.allclose(got, t(w), atol=1e-6), name
        assert not got.requires_grad
    # a sequence beyond the cap: truncated (tis_seq) or dropped whole (mis_seq)
    assert torch.allclose(Correction("tis_seq", cap=1.2)(lp, ls, m), t([[1.2] * 3, [0.75] * 3]), atol=1e-6)
    assert torch.allclose(Correction("mis_seq", cap=1.2)(lp, ls, m), t([[0.0] * 3, [0.75] * 3]), atol=1e-6)


def test_every_correction_is_one_without_mismatch_and_config_lists_them_all():
    from llmrl.config import RolloutConfig
    from llmrl.objectives.mismatch import MISMATCH, Correction
    import dataclasses

    g = torch.Generator().manual_seed(0)
    lp = -torch.rand(4, 6, generator=g)
    m = (torch.rand(4, 6, generator=g) > 0.3).float()
    for name in MISMATCH.names():
        assert torch.equal(Correction(name)(lp, lp, m), torch.ones(4, 6)), name
    field = next(f for f in dataclasses.fields(RolloutConfig) if f.name == "mismatch")
    assert set(field.metadata["choices"]) == set(MISMATCH.names())


def test_correction_bounds_are_checked():
    from llmrl.objectives.mismatch import Correction

    with pytest.raises(KeyError, match="tis_token"):
        Correction("tis")
    with pytest.raises(ValueError, match="cap >= 1"):
        Correction("icepop", cap=0.9)
    with pytest.raises(ValueError, match="low"):
        Correction("icepop", low=1.5)
