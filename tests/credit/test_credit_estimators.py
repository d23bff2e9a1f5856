"""The credit estimators beyond broadcast/grpo: hand-computed values, slow loop references on random inputs
with holes in the mask, masking invariances (padding, garbage, holes) and the sign of the advantage."""

import math

import pytest
import torch

from llmrl.credit import CREDIT, CreditInputs, assign_credit

NAN = float("nan")


def t(x, dtype=torch.float32):
    return torch.tensor(x, dtype=dtype)


def make(scores, mask, groups=None, **kw):
    groups = [0] * len(scores) if groups is None else groups
    kw = {k: t(v, torch.long if k == "step_ids" else torch.float32) for k, v in kw.items()}
    return CreditInputs(scores=t(scores), response_mask=t(mask), group_ids=t(groups, torch.long), **kw)


def close(a, b):
    return torch.allclose(a, torch.as_tensor(b, dtype=torch.float32), atol=1e-5, rtol=1e-5)


def random_inputs(seed, N=12, T=9, G=3):
    """Scores, a mask with holes (and one empty row), token rewards, values, steps and step scores."""
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(N, T, generator=g) > 0.3).float()
    mask[0] = 0.0
    step_ids = torch.full((N, T), -1, dtype=torch.long)
    for i in range(N):
        step, prev_chosen = -1, False
        for j in range(T):
            if mask[i, j] and torch.rand(1, generator=g) < 0.1:
                prev_chosen = False  # a chosen token in no step
            elif mask[i, j]:
                if not prev_chosen or torch.rand(1, generator=g) < 0.35:
                    step += 1
                step_ids[i, j], prev_chosen = step, True
            else:
                prev_chosen = False
    step_scores = torch.rand(N, T, generator=g)
    step_scores[torch.rand(N, T, generator=g) < 0.2] = NAN
    return CreditInputs(scores=torch.rand(N, generator=g), response_mask=mask,
                        group_ids=torch.arange(N) % (N // G), token_rewards=-0.1 * torch.rand(N, T, generator=g),
                        values=torch.rand(N, T, generator=g), step_ids=step_ids, step_scores=step_scores)


def with_fields(x, **kw):
    fields = {k: getattr(x, k) for k in ("scores", "response_mask", "group_ids", "token_rewards", "values",
                                          "step_ids", "step_scores")}
    return CreditInputs(**{**fields, **kw})


CASES = [("broadcast", {}), ("batch_mean", {}), ("grpo", {}), ("dr_grpo", {}), ("rloo", {}),
         ("reinforce_pp", {}), ("reinforce_pp", {"baseline": "group", "gamma": 0.9}),
         ("value_baseline", {}), ("gae", {}), ("gae", {"gamma": 0.9, "lam": 0.5}),
         ("process", {}), ("process", {"spread": "full", "normalize": "group", "cumulative": True}),
         ("process", {"outcome": "none", "cumulative": True}), ("vineppo", {}),
         ("teacher_kl", {}), ("teacher_kl", {"outcome": "grpo", "gamma": 0.9})]


def test_cases_cover_every_registered_estimator():
    assert {name for name, _ in CASES} == set(CREDIT.names())


# ----------------------------------------------------------------------------- invariances, all estimators


@pytest.mark.parametrize("name,opts", CASES)
def test_padding_columns_with_garbage_change_nothing(name, opts):
    x = random_inputs(0)
    N = x.scores.shape[0]
    pad = lambda a, fill: torch.cat([a, torch.full((N, 4), fill, dtype=a.dtype)], 1)  # noqa: E731
    padded = with_fields(x, response_mask=pad(x.response_mask, 0.0), token_rewards=pad(x.token_rewards, 1e6),
                         values=pad(x.values, 1e6), step_ids=pad(x.step_ids, 10**6))
    a, b = assign_credit(name, x, **opts), assign_credit(name, padded, **opts)
    assert close(b.advantages[:, :-4], a.advantages) and torch.all(b.advantages[:, -4:] == 0)
    assert torch.all(a.advantages[x.response_mask == 0] == 0)


@pytest.mark.parametrize("name,opts", CASES)
def test_garbage_at_masked_positions_changes_nothing(name, opts):
    x = random_inputs(1)
    off = x.response_mask == 0
    garbage = with_fields(x, token_rewards=x.token_rewards.masked_fill(off, 1e6),
                          values=x.values.masked_fill(off, -1e6), step_ids=x.step_ids.masked_fill(off, 10**6))
    assert close(assign_credit(name, garbage, **opts).advantages, assign_credit(name, x, **opts).advantages)


@pytest.mark.parametrize("name,opts", CASES)
def test_empty_responses(name, opts):
    x = make([1, 0], [[], []], values=[[], []], step_ids=[[], []], step_scores=[[], []], token_rewards=[[], []])
    assert assign_credit(name, x, **opts).advantages.shape == (2, 0)


def compact(x):
    """Each row's chosen tokens moved to the front, in order: the same episode without its holes."""
    order = torch.sort((x.response_mask == 0).long(), dim=1, stable=True).indices  # chosen first
    mask = x.response_mask.gather(1, order)
    return with_fields(x, response_mask=mask, token_rewards=x.token_rewards.gather(1, order).masked_fill(mask == 0, 0),
                       values=x.values.gather(1, order).masked_fill(mask == 0, 0),
                       step_ids=x.step_ids.gather(1, order).masked_fill(mask == 0, -1)), order


@pytest.mark.parametrize("name,opts", CASES)
def test_holes_in_the_mask_equal_the_compacted_episode(name, opts):
    x = random_inputs(2)
    y, order = compact(x)
    a = assign_credit(name, x, **opts).advantages.gather(1, order)
    assert close(a, assign_credit(name, y, **opts).advantages)


@pytest.mark.parametrize("name,opts", CASES)
def test_a_better_than_average_sequence_gets_positive_advantage_everywhere(name, opts):
    # four samples of one prompt, same mask with a hole, three steps; only sample 0 is right (score 1)
    # values rise over the steps (0.25, 0.5, 0.75), as if each step of sample 0 brought it closer
    if name == "teacher_kl" and "outcome" not in opts:
        pytest.skip("pure distillation reads no outcome: its credit is the teacher's per-token term only")
    mask = [[1, 1, 0, 0, 1, 1, 1]] * 4
    x = make([1, 0, 0, 0], mask, step_ids=[[0, 0, -1, -1, 1, 1, 2]] * 4,
             values=[[0.25, 0.25, 0, 0, 0.5, 0.5, 0.75]] * 4, step_scores=[[1, 1, 1]] + [[0, 0, 0]] * 3,
             token_rewards=[[0.0] * 7] * 4)
    a = assign_credit(name, x, **opts).advantages
    assert torch.all(a[0][t(mask[0]) > 0] > 0)


# ----------------------------------------------------------------------------- outcome baselines


def test_batch_mean_hand_computed():
    # scores 1, 0, 2 -> batch mean 1 -> advantages 0, -1, 1 (groups are ignored)
    c = assign_credit("batch_mean", make([1, 0, 2], [[1, 1], [1, 0], [1, 1]], [0, 1, 2]))
    assert close(c.advantages, [[0, 0], [-1, 0], [1, 1]]) and close(c.returns, [[1, 1], [0, 0], [2, 2]])


def test_dr_grpo_is_grpo_without_std():
    # group 0: 3, 1 -> mean 2 -> +1, -1; group 1: 0, 4 -> mean 2 -> -2, +2
    c = assign_credit("dr_grpo", make([3, 1, 0, 4], [[1]] * 4, [0, 0, 1, 1]))
    assert close(c.advantages, [[1], [-1], [-2], [2]])
    x = random_inputs(3)
    assert torch.equal(assign_credit("dr_grpo", x).advantages, assign_credit("grpo", x, normalize_std=False).advantages)


def test_rloo_hand_computed():
    # group 0 (1, 0, 0, 1): 1 - (0+0+1)/3 = 2/3, 0 - (1+0+1)/3 = -2/3; group 1 (3, 1): +2, -2; group 2 alone: 0
    c = assign_credit("rloo", make([1, 0, 0, 1, 3, 1, 5], [[1, 1]] * 7, [0, 0, 0, 0, 1, 1, 2]))
    assert close(c.advantages[:, 0], [2 / 3, -2 / 3, -2 / 3, 2 / 3, 2, -2, 0])
    assert close(c.advantages[:, 1], c.advantages[:, 0])


def slow_outcome(scores, groups, kind):
    out = []
    for i, s in enumerate(scores):
        if kind == "batch_mean":
            out.append(s - sum(scores) / len(scores))
        else:  # rloo
            others = [scores[j] for j in range(len(scores)) if groups[j] == groups[i] and j != i]
            out.append(s - sum(others) / len(others) if others else 0.0)
    return out


@pytest.mark.parametrize("kind", ["batch_mean", "rloo"])
def test_outcome_baselines_match_slow_loop(kind):
    x = random_inputs(4)
    R = (x.scores + (x.token_rewards * x.response_mask).sum(-1)).tolist()
    ref = t(slow_outcome(R, x.group_ids.tolist(), kind))
    assert close(assign_credit(kind, x).advantages, ref[:, None] * x.response_mask)


def test_reinforce_pp_hand_computed():
    # gamma 0.5; row 0: r = (-0.1, -0.2 + 1) -> G = (-0.1 + 0.5 * 0.8, 0.8) = (0.3, 0.8); row 1: G = (-0.3)
    # chosen G: 0.3, 0.8, -0.3 -> mean 0.8/3; deviations 1/30, 16/30, -17/30; unbiased var = (1+256+289)/900/2
    x = make([1, 0], [[1, 1, 0], [1, 0, 0]], token_rewards=[[-0.1, -0.2, 5.0], [-0.3, 5.0, 5.0]])
    c = assign_credit("reinforce_pp", x, gamma=0.5, eps=0.0)
    std = math.sqrt(546 / 900 / 2)
    assert close(c.returns, [[0.3, 0.8, 0], [-0.3, 0, 0]])
    assert close(c.advantages, [[1 / 30 / std, 16 / 30 / std, 0], [-17 / 30 / std, 0, 0]])


def test_reinforce_pp_group_baseline_hand_computed():
    # groups (0, 0, 1), scores (1, 0, 2) -> baselined 0.5, -0.5, 0; gamma 1 -> G = (0.5, 0.5), (-0.5), (0)
    # mean 0.125; deviations 0.375, 0.375, -0.625, -0.125; unbiased var = 0.6875 / 3
    c = assign_credit("reinforce_pp", make([1, 0, 2], [[1, 1], [1, 0], [1, 0]], [0, 0, 1]), baseline="group", eps=0.0)
    std = math.sqrt(0.6875 / 3)
    assert close(c.advantages, [[0.375 / std, 0.375 / std], [-0.625 / std, 0], [-0.125 / std, 0]])


def chosen_lists(x, i, *fields):
    """Row i's chosen positions and the given [N, T] fields at those positions."""
    pos = [j for j, m in enumerate(x.response_mask[i].tolist()) if m > 0]
    return pos, [[getattr(x, f)[i, j].item() for j in pos] for f in fields]


def slow_reward_to_go(r, gamma):
    out, acc = [0.0] * len(r), 0.0
    for k in reversed(range(len(r))):
        acc = r[k] + gamma * acc
        out[k] = acc
    return out


@pytest.mark.parametrize("baseline,gamma", [("none", 1.0), ("group", 0.9)])
def test_reinforce_pp_matches_slow_loop(baseline, gamma):
    x = random_inputs(5)
    scores, groups = x.scores.tolist(), x.group_ids.tolist()
    if baseline == "group":
        scores = [s - sum(scores[j] for j in range(len(scores)) if groups[j] == groups[i]) / groups.count(groups[i])
                  for i, s in enumerate(scores)]
    G, where = [], []
    for i in range(len(scores)):
        pos, (r,) = chosen_lists(x, i, "token_rewards")
        if pos:
            r[-1] += scores[i]
        G += slow_reward_to_go(r, gamma)
        where += [(i, j) for j in pos]
    mean = sum(G) / len(G)
    std = math.sqrt(sum((g - mean) ** 2 for g in G) / (len(G) - 1) + 1e-8)
    ref = torch.zeros_like(x.values)
    for (i, j), g in zip(where, G):
        ref[i, j] = (g - mean) / std
    assert close(assign_credit("reinforce_pp", x, baseline=baseline, gamma=gamma).advantages, ref)


# ----------------------------------------------------------------------------- critic values


def test_value_baseline_hand_computed():
    # R = 1 - 0.1 - 0.2 = 0.7 (the masked 99 is ignored); A = 0.7 - V
    x = make([1], [[1, 1, 0]], token_rewards=[[-0.1, -0.2, 99]], values=[[0.5, 0.9, 7]])
    c = assign_credit("value_baseline", x)
    assert close(c.advantages, [[0.2, -0.2, 0]]) and close(c.returns, [[0.7, 0.7, 0]])


@pytest.mark.parametrize("name", ["value_baseline", "gae", "vineppo", "process"])
def test_missing_inputs_fail_clearly(name):
    with pytest.raises(ValueError, match=f"{name}.*needs CreditInputs"):
        assign_credit(name, make([1], [[1]]))


def test_gae_hand_computed_and_holes_are_skipped():
    # r = (0, 0, 1), V = (0.5, 0.6, 0.8), gamma 1, lam 0.5: deltas 0.1, 0.2, 1 - 0.8 = 0.2
    # A2 = 0.2, A1 = 0.2 + 0.5 * 0.2 = 0.3, A0 = 0.1 + 0.5 * 0.3 = 0.25; returns = A + V
    c = assign_credit("gae", make([1], [[1, 1, 1]], values=[[0.5, 0.6, 0.8]]), lam=0.5)
    assert close(c.advantages, [[0.25, 0.3, 0.2]]) and close(c.returns, [[0.75, 0.9, 1.0]])
    holes = assign_credit("gae", make([1], [[1, 1, 0, 0, 1]], values=[[0.5, 0.6, 99, 99, 0.8]]), lam=0.5)
    assert close(holes.advantages, [[0.25, 0.3, 0, 0, 0.2]]) and close(holes.returns, [[0.75, 0.9, 0, 0, 1.0]])
    # gamma 0.9, lam 1: reward-to-go (0.81, 0.9, 1) - V = (0.31, 0.3, 0.2)
    c = assign_credit("gae", make([1], [[1, 1, 1]], values=[[0.5, 0.6, 0.8]]), gamma=0.9, lam=1.0)
    assert close(c.advantages, [[0.31, 0.3, 0.2]])


def test_gae_with_lam_1_is_the_monte_carlo_return_minus_value():
    x = with_fields(random_inputs(6), token_rewards=None)
    assert close(assign_credit("gae", x, lam=1.0).advantages, assign_credit("value_baseline", x).advantages)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0), (1.0, 0.0)])
def test_gae_matches_slow_loop(gamma, lam):
    x = random_inputs(7)
    ref_a, ref_ret = torch.zeros_like(x.values), torch.zeros_like(x.values)
    for i in range(x.scores.shape[0]):
        pos, (r, v) = chosen_lists(x, i, "token_rewards", "values")
        if pos:
            r[-1] += x.scores[i].item()
        adv = 0.0
        for k in reversed(range(len(pos))):
            v_next = v[k + 1] if k + 1 < len(pos) else 0.0
            adv = r[k] + gamma * v_next - v[k] + gamma * lam * adv
            ref_a[i, pos[k]], ref_ret[i, pos[k]] = adv, adv + v[k]
    c = assign_credit("gae", x, gamma=gamma, lam=lam)
    assert close(c.advantages, ref_a) and close(c.returns, ref_ret)
