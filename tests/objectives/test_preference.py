"""Preference losses: DPO / cDPO / IPO / Bradley-Terry (hand values, slow loops, gradients, input errors) and the
process-reward-model step loss."""

import math

import pytest
import torch
import torch.nn.functional as F

from llmrl.objectives.preference import bradley_terry_loss, dpo_loss, step_bce_sum, step_metrics


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def softplus(x):   # -log sigma(-x)
    return math.log1p(math.exp(x))


# ----------------------------------------------------------------------------- losses

def test_dpo_hand_computed():
    # pair 0: h = (-1 - -1.5) - (-2 - -1.5) = 1;  pair 1: h = (-3 - -2) - (-1 - -1) = -1
    out = dpo_loss(t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0]), beta=0.5)
    expected = [softplus(-0.5), softplus(0.5)]                     # -log sigma(beta h)
    assert torch.allclose(out.per_pair_loss, t(expected), atol=1e-6)
    assert out.losses["loss_preference"].item() == pytest.approx(sum(expected) / 2, abs=1e-6)
    m = {k: v.item() for k, v in out.metrics.items()}
    assert m["preference_accuracy"] == 0.5
    assert m["chosen_reward"] == pytest.approx((0.5 * 0.5 + 0.5 * -1.0) / 2)     # beta * (logp - logp_ref)
    assert m["rejected_reward"] == pytest.approx((0.5 * -0.5 + 0.0) / 2)
    assert m["reward_margin"] == pytest.approx((0.5 * 1 + 0.5 * -1) / 2, abs=1e-7)
    assert m["chosen_logp"] == pytest.approx(-2.0) and m["rejected_logp"] == pytest.approx(-1.5)
    tie = dpo_loss(t([-1.0]), t([-1.0]), t([-1.0]), t([-1.0]), beta=0.5)       # h = 0: log 2, and not ranked right
    assert tie.total.item() == pytest.approx(math.log(2)) and tie.metrics["preference_accuracy"].item() == 0.0


def test_conservative_dpo_and_ipo_hand_computed():
    args = (t([-1.0, -3.0]), t([-2.0, -1.0]), t([-1.5, -2.0]), t([-1.5, -1.0]))     # h = 1, -1
    cdpo = dpo_loss(*args, beta=0.5, label_smoothing=0.1).per_pair_loss
    assert torch.allclose(cdpo, t([0.9 * softplus(-0.5) + 0.1 * softplus(0.5),
                                   0.9 * softplus(0.5) + 0.1 * softplus(-0.5)]), atol=1e-6)
    ipo = dpo_loss(*args, beta=0.5, kind="ipo").per_pair_loss      # (h - 1 / (2 beta))^2 = (h - 1)^2
    assert torch.allclose(ipo, t([0.0, 4.0]), atol=1e-6)


@pytest.mark.parametrize("kind,eps", [("dpo", 0.0), ("dpo", 0.2), ("ipo", 0.0)])
def test_losses_match_slow_loop(kind, eps):
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (torch.randn(7, generator=g, dtype=torch.float64) * 3 for _ in range(4))
    beta = 0.3
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps, kind=kind)
    for i in range(7):
        h = (pc[i].item() - rc[i].item()) - (pr[i].item() - rr[i].item())
        sig = lambda x: 1 / (1 + math.exp(-x))                                       # noqa: E731
        slow = ((h - 1 / (2 * beta)) ** 2 if kind == "ipo"
                else -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h)))
        assert out.per_pair_loss[i].item() == pytest.approx(slow, abs=1e-9)
    assert out.losses["loss_preference"].item() == pytest.approx(out.per_pair_loss.mean().item(), abs=1e-12)


def test_dpo_gradient_closed_form_and_finite_differences():
    g = torch.Generator().manual_seed(1)
    pc, pr = (torch.randn(5, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    rc, rr = (torch.randn(5, generator=g, dtype=torch.float64) for _ in range(2))
    beta = 0.7
    dpo_loss(pc, pr, rc, rr, beta=beta).per_pair_loss.sum().backward()
    h = (pc - rc) - (pr - rr)
    closed = beta * torch.sigmoid(-beta * h.detach())                # d(-log sigma(beta h)) / dh = -beta sigma(-beta h)
    assert torch.allclose(pc.grad, -closed, atol=1e-12) and torch.allclose(pr.grad, closed, atol=1e-12)
    for x, grad in ((pc, pc.grad), (pr, pr.grad)):                   # central differences, one coordinate at a time
        for i in range(5):
            e = torch.zeros(5, dtype=torch.float64)
            e[i] = 1e-6
            with torch.no_grad():
                plus = dpo_loss(*[v + e if v is x else v for v in (pc, pr, rc, rr)], beta=beta).per_pair_loss.sum()
                minus = dpo_loss(*[v - e if v is x else v for v in (pc, pr, rc, rr)], beta=beta).per_pair_loss.sum()
            assert ((plus - minus) / 2e-6).item() == pytest.approx(grad[i].item(), abs=1e-7)


def test_ipo_gradient_closed_form():
    pc, pr = t([0.2], torch.float64).requires_grad_(), t([-0.4], torch.float64).requires_grad_()
    dpo_loss(pc, pr, t([0.0], torch.float64), t([0.0], torch.float64), beta=0.25, kind="ipo").total.backward()
    assert pc.grad.item() == pytest.approx(2 * (0.6 - 2.0)) and pr.grad.item() == pytest.approx(-2 * (0.6 - 2.0))


def test_bradley_terry_hand_computed():
    out = bradley_terry_loss(t([1.0, 0.0]), t([0.0, 2.0]))
    assert torch.allclose(out.per_pair_loss, t([softplus(-1.0), softplus(2.0)]), atol=1e-6)
    assert out.metrics["preference_accuracy"].item() == 0.5
    assert out.metrics["reward_margin"].item() == pytest.approx(-0.5)


def test_loss_input_errors():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(t([1.0, 2.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1)
    with pytest.raises(ValueError, match="same shape"):
        bradley_terry_loss(t([[1.0]]), t([[1.0]]))
    with pytest.raises(KeyError, match="valid: dpo, ipo"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1, kind="kto")
    with pytest.raises(ValueError, match="label_smoothing"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.1, kind="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="beta > 0"):
        dpo_loss(t([1.0]), t([1.0]), t([1.0]), t([1.0]), beta=0.0)


def test_step_bce_sum_hand_computed_and_step_metrics():
    logits, labels = t([0.0, 2.0, -1.0]), t([1.0, 0.25, 0.0])
    bce = [math.log(2), 0.25 * softplus(-2.0) + 0.75 * softplus(2.0), softplus(-1.0)]   # -y log s(z) - (1-y) log s(-z)
    assert step_bce_sum(logits, labels).item() == pytest.approx(sum(bce), rel=1e-6)
    m = step_metrics(logits, labels)
    assert m["loss_bce"] == pytest.approx(sum(bce) / 3, rel=1e-6)
    # good: label >= 0.5 (step 0 only); predicted good: P >= 0.5 (steps 0, 1): right on steps 0 and 2
    assert m["step_accuracy"] == pytest.approx(2 / 3) and m["good_fraction"] == pytest.approx(1 / 3)
    assert m["p_good_steps"] == pytest.approx(0.5) and m["p_bad_steps"] == pytest.approx(
        (torch.sigmoid(t(2.0)) + torch.sigmoid(t(-1.0))).item() / 2)
    assert math.isnan(step_metrics(t([1.0]), t([1.0]))["p_bad_steps"])          # no bad step: NaN, not an error
    with pytest.raises(ValueError, match="same shape"):
        step_bce_sum(t([1.0, 2.0]), t([1.0]))
    x = t([0.3, -0.7], dtype=torch.float64).requires_grad_()
    step_bce_sum(x, t([1.0, 0.0], dtype=torch.float64)).backward()                 # d/dz = sigma(z) - y
    assert torch.allclose(x.grad, torch.sigmoid(x.detach()) - t([1.0, 0.0], dtype=torch.float64))
