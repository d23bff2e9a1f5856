"""The objectives beside ppo_clip: GSPO, CISPO, DPPO (TV and KL), SAPO — hand-computed values, a slow per-token loop
reference of the value and of the analytic gradient each paper gives (random inputs with mask holes, every
aggregation), the true sequence-level GSPO by autograd, micro-batch invariance, and the on-policy limit where every
one of them is the plain policy gradient."""

import math

import pytest
import torch

from llmrl.objectives.cispo import cispo_objective
from llmrl.objectives.dppo import binary_kl, dppo_objective
from llmrl.objectives.gspo import gspo_objective
from llmrl.objectives.policy import AGGREGATIONS, OBJECTIVES, BatchCounts, ppo_clip_objective
from llmrl.objectives.sapo import sapo_objective


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def grad_of(objective, logp, logp_old, adv, mask, counts, **kw):
    """(loss value, d loss / d logp [N, T], the output) of `objective`."""
    lp = logp.clone().requires_grad_()
    out = objective(lp, logp_old, adv, mask, counts, **kw)
    (g,) = torch.autograd.grad(out.losses["loss_policy"], lp)
    return float(out.losses["loss_policy"].detach()), g, out


# ----------------------------------------------------------------------------- hand-computed

def test_gspo_hand_computed_clips_whole_sequences():
    # both rows: token ratios (2, 1) -> s = sqrt(2); eps 0.2. Row 0 (A = +1) is clipped at 1.2, row 1 (A = -1) not.
    logp_old = torch.zeros(2, 2, dtype=torch.float64)
    logp = t([[math.log(2), 0.0], [math.log(2), 0.0]])
    adv, m = t([[1.0, 1.0], [-1.0, -1.0]]), torch.ones(2, 2, dtype=torch.float64)
    loss, g, out = grad_of(gspo_objective, logp, logp_old, adv, m, BatchCounts.of(m), clip_low=0.2, clip_high=0.2,
                           aggregation="seq-mean-token-mean")
    assert loss == pytest.approx((-1.2 + math.sqrt(2)) / 2)
    # clipped row: no gradient on ANY of its tokens (the token (ratio 1) inside the range included)
    assert torch.equal(g[0], torch.zeros(2, dtype=torch.float64))
    # unclipped row: -(s A) / (N |y|) on every token, the same for both (the sequence ratio moves as one)
    assert torch.allclose(g[1], t([math.sqrt(2) / 4] * 2))
    assert float(out.metrics["clip_fraction"]) == pytest.approx(0.5)


def test_cispo_hand_computed_keeps_every_gradient():
    # ratios 1.5, 0.5, 3 with A = +1, -1, +1; weight bounds [0, 2]: weights 1.5, 0.5, 2 (the last clipped)
    logp = t([[math.log(1.5), math.log(0.5), math.log(3.0)]])
    adv, m = t([[1.0, -1.0, 1.0]]), torch.ones(1, 3, dtype=torch.float64)
    loss, g, out = grad_of(cispo_objective, logp, torch.zeros(1, 3, dtype=torch.float64), adv, m, BatchCounts.of(m),
                           clip_low=1.0, clip_high=1.0)
    assert loss == pytest.approx((-1.5 + 0.5 - 2.0) / 3)
    assert torch.allclose(g, t([[-1.5 / 3, 0.5 / 3, -2.0 / 3]]))
    assert float(out.metrics["clip_fraction"]) == pytest.approx(1 / 3)
    # PPO with the same bounds would give the clipped token (r = 3 > 2, A > 0) no gradient at all
    _, g_ppo, _ = grad_of(ppo_clip_objective, logp, torch.zeros(1, 3, dtype=torch.float64), adv, m,
                          BatchCounts.of(m), clip_low=1.0, clip_high=1.0)
    assert g_ppo[0, 2] == 0 and g[0, 2] != 0


def test_dppo_tv_hand_computed_masks_by_probability_shift():
    # p_old -> p: 0.001 -> 0.003 (r = 3, tiny shift: kept), 0.9 -> 0.5 (A < 0, shift -0.4: masked),
    # 0.5 -> 0.7 (A > 0, +0.2: masked), 0.5 -> 0.55 (kept); delta 0.1
    p_old, p = t([[0.001, 0.9, 0.5, 0.5]]), t([[0.003, 0.5, 0.7, 0.55]])
    adv, m = t([[1.0, -1.0, 1.0, 1.0]]), torch.ones(1, 4, dtype=torch.float64)
    loss, g, out = grad_of(dppo_objective, p.log(), p_old.log(), adv, m, BatchCounts.of(m), divergence="tv",
                           delta_low=0.1, delta_high=0.1)
    assert loss == pytest.approx(-(3.0 + 1.1) / 4)
    assert torch.allclose(g, t([[-3.0 / 4, 0.0, 0.0, -1.1 / 4]]))
    assert float(out.metrics["clip_fraction"]) == pytest.approx(0.5)
    # PPO's clip (0.2) gets it the other way round on the first token: r = 3 is clipped there
    _, g_ppo, _ = grad_of(ppo_clip_objective, p.log(), p_old.log(), adv, m, BatchCounts.of(m))
    assert g_ppo[0, 0] == 0


def test_dppo_kl_hand_computed():
    # p_old = 0.5; binary KL of 0.6 is 0.0204 > 0.02 (masked), of 0.59 is 0.0165 (kept); a drop to 0.4 with A > 0
    # moves back toward the region and is kept whatever its divergence
    assert float(binary_kl(t(0.5).log(), t(0.6).log())) == pytest.approx(
        0.5 * math.log(0.5 / 0.6) + 0.5 * math.log(0.5 / 0.4))
    p_old, p = t([[0.5, 0.5, 0.5]]), t([[0.6, 0.59, 0.4]])
    adv, m = torch.ones(1, 3, dtype=torch.float64), torch.ones(1, 3, dtype=torch.float64)
    _, g, out = grad_of(dppo_objective, p.log(), p_old.log(), adv, m, BatchCounts.of(m), divergence="kl",
                        delta_low=0.02, delta_high=0.02)
    assert torch.allclose(g, t([[0.0, -1.18 / 3, -0.8 / 3]]))
    assert float(out.metrics["clip_fraction"]) == pytest.approx(1 / 3)


def test_sapo_hand_computed():
    # r = 1: the gate's slope is exactly the policy gradient; r = 2, tau = 1: value 4 sigma(1), slope 4 s (1 - s) 2
    s = 1 / (1 + math.exp(-1))
    logp = t([[0.0, math.log(2.0)]])
    adv, m = t([[1.0, 1.0]]), torch.ones(1, 2, dtype=torch.float64)
    loss, g, _ = grad_of(sapo_objective, logp, torch.zeros(1, 2, dtype=torch.float64), adv, m, BatchCounts.of(m),
                         aggregation="token-mean")
    assert loss == pytest.approx(-(2.0 + 4 * s) / 2)
    assert torch.allclose(g, t([[-1.0 / 2, -4 * s * (1 - s) * 2 / 2]]))


# ----------------------------------------------------------------------------- slow loop references

def loop_gspo(lp, lpo, A, chosen, i, t_, *, clip_low=0.2, clip_high=0.2, **_):
    toks = [k for k in range(len(chosen[i])) if chosen[i][k]]
    s = math.exp(sum(lp[i][k] - lpo[i][k] for k in toks) / len(toks))
    a = A[i][t_]
    u, c = s * a, min(max(s, 1 - clip_low), 1 + clip_high) * a
    return -min(u, c), (-s * a if u <= c else 0.0)


def loop_cispo(lp, lpo, A, chosen, i, t_, *, clip_low=0.2, clip_high=0.2, **_):
    w = min(max(math.exp(lp[i][t_] - lpo[i][t_]), 1 - clip_low), 1 + clip_high)
    return -w * A[i][t_], -w * A[i][t_]


def loop_dppo(lp, lpo, A, chosen, i, t_, *, divergence="tv", delta_low=0.1, delta_high=0.1, ratio_cap=20.0, **_):
    p, po, a = math.exp(lp[i][t_]), math.exp(lpo[i][t_]), A[i][t_]
    if divergence == "tv":
        keep = p - po <= delta_high if a > 0 else p - po >= -delta_low
    else:
        d = po * math.log(po / p) + (1 - po) * math.log((1 - po) / (1 - p))
        keep = (d <= delta_high or p <= po) if a > 0 else (d <= delta_low or p >= po)
    w = min(p / po, ratio_cap) * keep
    return -w * a, -w * a


def loop_sapo(lp, lpo, A, chosen, i, t_, *, tau_pos=1.0, tau_neg=1.0, **_):
    r, a = math.exp(lp[i][t_] - lpo[i][t_]), A[i][t_]
    tau = tau_pos if a > 0 else tau_neg
    s = 1 / (1 + math.exp(-tau * (r - 1)))
    return -(4 / tau) * s * a, -4 * s * (1 - s) * r * a


def agg_weight(mode, chosen, i, max_len):
    """d aggregate / d x_it of a chosen token."""
    n_seqs, n_tok, len_i = len(chosen), sum(map(sum, chosen)), sum(chosen[i])
    return {"token-mean": 1 / n_tok, "seq-mean-token-mean": 1 / (n_seqs * len_i), "seq-mean-token-sum": 1 / n_seqs,
            "seq-mean-token-sum-norm": 1 / (n_seqs * max_len)}[mode]


def random_batch(seed, N=5, T=7):
    """Probabilities in (0.01, 0.95), moved by up to a factor e^0.6 either way; a mask with holes (no empty row)."""
    g = torch.Generator().manual_seed(seed)
    logp_old = torch.empty(N, T, dtype=torch.float64).uniform_(math.log(0.01), math.log(0.95), generator=g)
    logp = (logp_old + 0.6 * (2 * torch.rand(N, T, generator=g, dtype=torch.float64) - 1)).clamp(max=math.log(0.97))
    adv = torch.randn(N, T, generator=g, dtype=torch.float64)
    adv = adv[:, :1].expand(N, T).clone() if seed % 2 else adv        # odd seeds: one advantage per sequence
    mask = (torch.rand(N, T, generator=g) > 0.3).double()
    mask[:, 0] = 1
    return logp, logp_old, adv, mask


CASES = [
    ("gspo", gspo_objective, loop_gspo, {"clip_low": 0.05, "clip_high": 0.08}),
    ("cispo", cispo_objective, loop_cispo, {"clip_low": 1.0, "clip_high": 0.3}),
    ("dppo_tv", dppo_objective, loop_dppo, {"divergence": "tv", "delta_low": 0.05, "delta_high": 0.08}),
    ("dppo_kl", dppo_objective, loop_dppo, {"divergence": "kl", "delta_low": 0.01, "delta_high": 0.02}),
    ("sapo", sapo_objective, loop_sapo, {"tau_pos": 1.0, "tau_neg": 2.0}),
]


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name,objective,loop,kw", CASES, ids=[c[0] for c in CASES])
def test_matches_loop_reference_value_and_analytic_gradient(name, objective, loop, kw, mode, seed):
    logp, logp_old, adv, mask = random_batch(seed)
    counts = BatchCounts.of(mask, max_len=9)
    loss, g, _ = grad_of(objective, logp, logp_old, adv, mask, counts, aggregation=mode, **kw)
    lp, lpo, A, chosen = logp.tolist(), logp_old.tolist(), adv.tolist(), mask.bool().tolist()
    want_loss, want_g = 0.0, torch.zeros_like(logp)
    for i in range(len(chosen)):
        for k in range(len(chosen[i])):
            if chosen[i][k]:
                value, d = loop(lp, lpo, A, chosen, i, k, **kw)
                w = agg_weight(mode, chosen, i, 9)
                want_loss += w * value
                want_g[i, k] = w * d
    assert loss == pytest.approx(want_loss, rel=1e-9, abs=1e-12)
    assert torch.allclose(g, want_g, rtol=1e-9, atol=1e-12)
    assert torch.all(g[mask == 0] == 0)


def test_loop_references_exercise_the_clips():
    """The random batches do clip / mask some tokens, and not all (else the references above prove little)."""
    for name, objective, _, kw in CASES[:4]:
        fracs = []
        for seed in range(4):
            logp, logp_old, adv, mask = random_batch(seed)
            fracs.append(float(objective(logp, logp_old, adv, mask, BatchCounts.of(mask), **kw).metrics["clip_fraction"]))
        assert 0 < sum(fracs) / 4 < 1, name


@pytest.mark.parametrize("seed", range(4))
def test_gspo_token_form_is_sequence_level_gspo(seed):
    """With one advantage per sequence and seq-mean-token-mean, the GSPO-token loss has the gradient of the paper's
    sequence objective -(1/N) sum_i min(s_i A_i, clip(s_i) A_i), s_i differentiated through every token."""
    logp, logp_old, adv, mask = random_batch(2 * seed + 1)
    kw = {"clip_low": 0.05, "clip_high": 0.08}
    _, g, _ = grad_of(gspo_objective, logp, logp_old, adv, mask, BatchCounts.of(mask),
                      aggregation="seq-mean-token-mean", **kw)
    lp = logp.clone().requires_grad_()
    s = torch.exp(((lp - logp_old) * mask).sum(-1) / mask.sum(-1))
    a = adv[:, 0]
    seq = -torch.minimum(s * a, s.clamp(1 - kw["clip_low"], 1 + kw["clip_high"]) * a).mean()
    (want,) = torch.autograd.grad(seq, lp)
    assert torch.allclose(g, want, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- batch-level properties

@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name,objective,loop,kw", CASES, ids=[c[0] for c in CASES])
def test_micro_batch_invariance(name, objective, loop, kw, mode):
    logp, logp_old, adv, mask = random_batch(3, N=6)
    ref = logp.clone().requires_grad_()
    counts = BatchCounts.of(mask, max_len=9)
    logp_ref = logp_old - 0.1
    entropy = torch.rand(6, 7, dtype=torch.float64)
    extra = dict(logp_ref=logp_ref, entropy=entropy, kl_coef=0.1, entropy_coef=0.01, aggregation=mode, **kw)
    full = objective(ref, logp_old, adv, mask, counts, **extra)
    (g_full,) = torch.autograd.grad(full.total, ref)
    parts_total, parts_metrics = 0.0, {}
    for rows in (slice(0, 2), slice(2, 3), slice(3, 6)):
        out = objective(ref[rows], logp_old[rows], adv[rows], mask[rows], counts,
                        **{**extra, "logp_ref": logp_ref[rows], "entropy": entropy[rows]})
        parts_total = parts_total + out.total
        for k, v in out.metrics.items():
            parts_metrics[k] = parts_metrics.get(k, 0.0) + float(v)
    (g_parts,) = torch.autograd.grad(parts_total, ref)
    assert float(full.total.detach()) == pytest.approx(float(parts_total.detach()), rel=1e-9)
    assert torch.allclose(g_full, g_parts, rtol=1e-9, atol=1e-12)
    assert parts_metrics["clip_fraction"] == pytest.approx(float(full.metrics["clip_fraction"]), rel=1e-9)


@pytest.mark.parametrize("mode", AGGREGATIONS)
@pytest.mark.parametrize("name", ["gspo", "cispo", "dppo", "sapo"])
def test_on_policy_every_objective_is_the_policy_gradient(name, mode):
    """One on-policy pass (pi_old = sg(pi)): no ratio has moved, nothing is clipped or masked, and each objective's
    gradient is ppo_clip's, the policy gradient of the aggregation, exactly."""
    logp, _, adv, mask = random_batch(5)
    counts = BatchCounts.of(mask)
    kw = dict(logp_ref=logp - 0.2, entropy=torch.rand_like(logp), kl_coef=0.3, entropy_coef=0.02, aggregation=mode)
    lp = logp.clone().requires_grad_()
    out = OBJECTIVES.get(name)(lp, lp.detach(), adv, mask, counts, **kw)
    (g,) = torch.autograd.grad(out.total, lp)
    lp2 = logp.clone().requires_grad_()
    (want,) = torch.autograd.grad(ppo_clip_objective(lp2, lp2.detach(), adv, mask, counts, **kw).total, lp2)
    assert torch.allclose(g, want, rtol=1e-12, atol=1e-15)
    assert float(out.metrics["clip_fraction"]) == 0


def test_descending_raises_good_tokens_and_lowers_bad():
    logp_old = torch.full((2, 3), math.log(0.3), dtype=torch.float64)
    adv, m = t([[1.0] * 3, [-1.0] * 3]), torch.ones(2, 3, dtype=torch.float64)
    for name in ("gspo", "cispo", "dppo", "sapo"):
        _, g, _ = grad_of(OBJECTIVES.get(name), logp_old + 1e-5, logp_old, adv, m, BatchCounts.of(m))
        assert torch.all(g[0] < 0) and torch.all(g[1] > 0), name


@pytest.mark.parametrize("name", ["gspo", "cispo", "dppo", "sapo"])
def test_dual_clip_is_refused(name):
    m = torch.ones(1, 2)
    with pytest.raises(ValueError, match="ppo_clip only"):
        OBJECTIVES.get(name)(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), m, BatchCounts.of(m),
                             dual_clip=3.0)


def test_bad_options_are_refused():
    m = torch.ones(1, 2)
    args = (torch.zeros(1, 2) - 1, torch.zeros(1, 2) - 1, torch.ones(1, 2), m, BatchCounts.of(m))
    with pytest.raises(ValueError, match="tv, kl"):
        dppo_objective(*args, divergence="js")
    with pytest.raises(ValueError, match="delta_low"):
        dppo_objective(*args, delta_low=0.0)
    with pytest.raises(ValueError, match="tau"):
        sapo_objective(*args, tau_neg=0.0)


def test_is_weight_multiplies_each_token():
    logp, logp_old, adv, mask = random_batch(0)
    w = torch.rand_like(logp) + 0.5
    for name, objective, _, kw in CASES:
        counts = BatchCounts.of(mask)
        _, g, _ = grad_of(objective, logp, logp_old, adv, mask, counts, **kw)
        _, gw, _ = grad_of(objective, logp, logp_old, adv, mask, counts, is_weight=w, **kw)
        assert torch.allclose(gw, g * w), name


def test_registered_with_the_shared_signature():
    import inspect
    base = set(inspect.signature(ppo_clip_objective).parameters)
    for name in ("gspo", "cispo", "dppo", "sapo"):
        assert base <= set(inspect.signature(OBJECTIVES.get(name)).parameters), name


def test_objective_options_are_checked_against_the_objective():
    from llmrl.config import ConfigError
    from llmrl.config_loader import config_from_dict
    from llmrl.train.build import _objective

    fn = _objective(config_from_dict({"objective": {"name": "dppo", "options": {"divergence": "kl"}}}).objective)
    assert fn.func is dppo_objective and fn.keywords["divergence"] == "kl"
    with pytest.raises(ConfigError, match="gspo takes no delta_low; its own options: none"):
        _objective(config_from_dict({"objective": {"name": "gspo", "options": {"delta_low": 0.1}}}).objective)
    with pytest.raises(ConfigError, match="divergence"):
        _objective(config_from_dict({"objective": {"name": "dppo", "options": {"delta": 0.1}}}).objective)
