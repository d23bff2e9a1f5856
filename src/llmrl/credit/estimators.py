"""Advantage estimators: pure functions of tensors behind one registry with one signature.

    estimator(inputs: CreditInputs, **hyper_parameters) -> Credit

Every estimator reads the same `CreditInputs` and returns the same `Credit`, so the recipe calls
`CREDIT.get(name)(inputs, **kw)` (`assign_credit`) and never special-cases one. What an estimator reads beyond the
outcome scores is declared where it is registered: `needs` (any of "values", "steps", "step_scores", read from
`CreditInputs`) and `returns` (False: it gives no regression targets a critic could learn); the recipe's checks
and stages read `CREDIT.info(name)`. Notation: N sequences, T response
tokens; `response_mask` [N, T] is 1 on tokens the policy chose and 0 on padding and tool outputs, and
no estimator lets a masked position change any result. Holes in the middle of a row (tool outputs in a
multi-turn episode) are skipped as if absent: every per-token recursion runs over the chosen tokens only.

    outcome baselines   broadcast, batch_mean, grpo, dr_grpo, rloo, reinforce_pp
    critic values       value_baseline, gae
    step-level credit   process (process rewards), vineppo (Monte-Carlo values of step prefixes)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llmrl.registry import Registry


@dataclass(frozen=True)
class CreditInputs:
    scores: torch.Tensor                      # [N] outcome reward of each sequence
    response_mask: torch.Tensor               # [N, T] 1 = token the policy chose
    group_ids: torch.Tensor                   # [N] which prompt each sequence answers
    token_rewards: torch.Tensor | None = None  # [N, T] extra per-token rewards (e.g. -beta * KL, process rewards)
    values: torch.Tensor | None = None        # [N, T] critic values V(s_t)
    step_ids: torch.Tensor | None = None      # [N, T] reasoning-step index of each token (-1 = none)
    step_scores: torch.Tensor | None = None   # [N, S] score of each reasoning step (NaN = no such step)

    def __post_init__(self):
        N, T = self.response_mask.shape
        if self.scores.shape != (N,) or self.group_ids.shape != (N,):
            raise ValueError(f"scores {tuple(self.scores.shape)} and group_ids {tuple(self.group_ids.shape)} "
                             f"must be [N]={N} to match response_mask [N, T]={N, T}")
        for name in ("token_rewards", "values", "step_ids"):
            x = getattr(self, name)
            if x is not None and x.shape != (N, T):
                raise ValueError(f"{name} is {tuple(x.shape)}, expected [N, T]={N, T}")
        if self.step_scores is not None and (self.step_scores.dim() != 2 or self.step_scores.shape[0] != N):
            raise ValueError(f"step_scores is {tuple(self.step_scores.shape)}, expected [N, S] with N={N}")


@dataclass(frozen=True)
class Credit:
    advantages: torch.Tensor                  # [N, T] 0 at masked positions
    returns: torch.Tensor | None = None       # [N, T] regression targets for a critic, when there is one


CREDIT: Registry = Registry("credit estimator")


def assign_credit(name: str, inputs: CreditInputs, **hyper) -> Credit:
    return CREDIT.get(name)(inputs, **hyper)


# ----------------------------------------------------------------------------- helpers


def group_stats(x: torch.Tensor, group_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [N], group_ids [N] -> (mean [N], unbiased std [N], group size [N]) of each element's group."""
    _, idx, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    sums = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, idx, x)
    mean = sums / counts
    sq = torch.zeros(len(counts), dtype=x.dtype, device=x.device).index_add_(0, idx, (x - mean[idx]) ** 2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    return mean[idx], std[idx], counts[idx].to(x.dtype)


def broadcast_to_tokens(per_seq: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """per_seq [N] -> [N, T]: the same value on every chosen token, 0 elsewhere."""
    return per_seq[:, None] * response_mask


def masked(x: torch.Tensor | None, chosen: torch.Tensor) -> torch.Tensor:
    """x [N, T] with 0 wherever chosen [N, T] is False (even if x holds inf or NaN there); None -> zeros."""
    return torch.zeros(chosen.shape, device=chosen.device) if x is None else torch.where(chosen, x, 0.0)


def sequence_returns(inputs: CreditInputs) -> torch.Tensor:
    """Outcome score plus the sum of any per-token rewards over chosen tokens -> [N]."""
    return inputs.scores + masked(inputs.token_rewards, inputs.response_mask > 0).sum(-1)


def per_token_rewards(inputs: CreditInputs, scores: torch.Tensor | None = None) -> torch.Tensor:
    """r_t [N, T]: token rewards on chosen tokens, plus the outcome score (or `scores` [N]) on the last chosen one."""
    chosen = inputs.response_mask > 0                                             # [N, T]
    last = chosen & (chosen.cumsum(-1) == chosen.sum(-1, keepdim=True))           # [N, T] the last chosen token
    score = inputs.scores if scores is None else scores                           # [N]
    return masked(inputs.token_rewards, chosen) + last * score[:, None]


def reverse_discounted_sum(x: torch.Tensor, chosen: torch.Tensor, discount: float) -> torch.Tensor:
    """out_t = x_t + discount * out_(next chosen token) -> [N, T]; masked positions are jumped over, and get 0."""
    out, carry = torch.zeros_like(x), x.new_zeros(x.shape[0])                     # [N, T], [N]
    for t in reversed(range(x.shape[1])):
        carry = torch.where(chosen[:, t], x[:, t] + discount * carry, carry)
        out[:, t] = torch.where(chosen[:, t], carry, 0.0)
    return out


def next_chosen(x: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """x at the next chosen token after t (0 after the last one) -> [N, T]."""
    out, carry = torch.zeros_like(x), x.new_zeros(x.shape[0])                     # [N, T], [N]
    for t in reversed(range(x.shape[1])):
        out[:, t] = carry
        carry = torch.where(chosen[:, t], x[:, t], carry)
    return out


def require(inputs: CreditInputs, estimator: str, *fields: str) -> None:
    missing = [f for f in fields if getattr(inputs, f) is None]
    if missing:
        raise ValueError(f"credit estimator {estimator!r} needs CreditInputs.{', '.join(missing)} (got None)")


def check_choice(option: str, value, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"{option}={value!r}; valid: {', '.join(map(repr, allowed))}")


# ----------------------------------------------------------------------------- estimators


@CREDIT.register("broadcast")
def broadcast(inputs: CreditInputs) -> Credit:
    """The seed's basic approach: the whole episode reward to every token (REINFORCE, Williams 1992)."""
    R = sequence_returns(inputs)                                                  # [N]
    A = broadcast_to_tokens(R, inputs.response_mask)                              # [N, T]
    return Credit(advantages=A, returns=A)


@CREDIT.register("grpo")
def group_baseline(inputs: CreditInputs, *, normalize_std: bool = True, eps: float = 1e-6) -> Credit:
    """GRPO (Shao et al. 2024, eq. 3 outcome supervision): A_i = (R_i - mean_group R) / (std_group R + eps).

    With `normalize_std=False` this is the plain group-mean baseline (Dr. GRPO's advantage).
    A group whose rewards are all equal gets advantage 0 on every token.
    """
    R = sequence_returns(inputs)                                                  # [N]
    mean, std, _ = group_stats(R, inputs.group_ids)
    A = R - mean
    if normalize_std:
        A = A / (std + eps)
    return Credit(advantages=broadcast_to_tokens(A, inputs.response_mask), returns=broadcast_to_tokens(R, inputs.response_mask))


@CREDIT.register("dr_grpo")
def dr_grpo(inputs: CreditInputs) -> Credit:
    """Dr. GRPO (Liu et al. 2025): A_i = R_i - mean_group R, GRPO without the std division. The paper's other
    fix (no 1/|o_i| length normalisation) belongs to the objective's aggregation, not to credit."""
    return group_baseline(inputs, normalize_std=False)


@CREDIT.register("batch_mean")
def batch_mean(inputs: CreditInputs) -> Credit:
    """REINFORCE with a batch baseline (Williams 1992, b = mean reward): A_i = R_i - mean_batch R."""
    R = sequence_returns(inputs)                                                  # [N]
    mask = inputs.response_mask
    return Credit(advantages=broadcast_to_tokens(R - R.mean(), mask), returns=broadcast_to_tokens(R, mask))


@CREDIT.register("rloo")
def rloo(inputs: CreditInputs) -> Credit:
    """RLOO (Ahmadian et al. 2024; Kool et al. 2019): A_i = R_i - mean_{j != i in group} R_j, computed as
    G/(G-1) (R_i - mean_group R); a group of one sample has no baseline and gets 0."""
    R = sequence_returns(inputs)                                                  # [N]
    mean, _, G = group_stats(R, inputs.group_ids)                                 # [N] each
    A = (R - mean) * G / (G - 1).clamp(min=1)                                     # [N] 0 when G = 1
    mask = inputs.response_mask
    return Credit(advantages=broadcast_to_tokens(A, mask), returns=broadcast_to_tokens(R, mask))


@CREDIT.register("reinforce_pp")
def reinforce_pp(inputs: CreditInputs, *, gamma: float = 1.0, baseline: str = "none", eps: float = 1e-8) -> Credit:
    """REINFORCE++ (Hu 2025, arXiv:2501.03262): per-token returns, whitened over the whole batch.

    G_t = sum_{k>=0} gamma^k r_(t+k) over chosen tokens, with r_t = token_rewards (e.g. -beta * KL_t) and the
    outcome score added at the last chosen token; A_t = (G_t - mean) / sqrt(var + eps), mean and unbiased var
    over every chosen token of the batch (as verl's `compute_reinforce_plus_plus_outcome_advantage` and OpenRLHF).
    `baseline="group"` is REINFORCE++-baseline: each score minus its group's mean score first (token rewards
    are not baselined). returns = G, unwhitened."""
    check_choice("baseline", baseline, ("none", "group"))
    chosen = inputs.response_mask > 0                                             # [N, T]
    scores = inputs.scores                                                        # [N]
    if baseline == "group":
        scores = scores - group_stats(scores, inputs.group_ids)[0]
    G = reverse_discounted_sum(per_token_rewards(inputs, scores), chosen, gamma)   # [N, T]
    n = chosen.sum()
    mean = G.sum() / n.clamp(min=1)                                               # G is 0 where not chosen
    var = masked((G - mean) ** 2, chosen).sum() / (n - 1).clamp(min=1)
    return Credit(advantages=masked((G - mean) * torch.rsqrt(var + eps), chosen), returns=G)


@CREDIT.register("value_baseline", needs=("values",))
def value_baseline(inputs: CreditInputs) -> Credit:
    """The seed's "advantage_x = reward - VF_x": A_t = R - V_t, R = score + sum of token rewards; returns = R.

    Deviation from reward-to-go: every token sees the whole R, token rewards earned before it included
    (`gae` with lam=1 is the reward-to-go version G_t - V_t)."""
    require(inputs, "value_baseline", "values")
    chosen = inputs.response_mask > 0                                             # [N, T]
    R = sequence_returns(inputs)                                                  # [N]
    return Credit(advantages=masked(R[:, None] - inputs.values, chosen), returns=broadcast_to_tokens(R, chosen))


@CREDIT.register("gae", needs=("values",))
def gae(inputs: CreditInputs, *, gamma: float = 1.0, lam: float = 0.95) -> Credit:
    """GAE(gamma, lam) (Schulman et al. 2016, Sec. 3, eq. 11-16) over the chosen tokens only.

    r_t = token_rewards + outcome score at the last chosen token; delta_t = r_t + gamma V_(next chosen) - V_t
    with V = 0 after the last chosen token; A_t = sum_k (gamma lam)^k delta_(t+k); returns = A + V.
    Tool outputs and padding are skipped (the recursion steps over them) and get A = returns = 0.
    lam = 1 gives the Monte-Carlo A_t = G_t - V_t; lam = 0 the one-step TD error."""
    require(inputs, "gae", "values")
    chosen = inputs.response_mask > 0                                             # [N, T]
    V = masked(inputs.values, chosen)                                             # [N, T]
    delta = per_token_rewards(inputs) + gamma * next_chosen(V, chosen) - V        # [N, T]
    A = reverse_discounted_sum(delta, chosen, gamma * lam)                        # [N, T]
    return Credit(advantages=A, returns=masked(A + V, chosen))


@CREDIT.register("process", needs=("steps", "step_scores"), returns=False)
def process(inputs: CreditInputs, *, spread: str = "even", outcome: str = "add", normalize: str = "none",
            cumulative: bool = False, eps: float = 1e-6) -> Credit:
    """Process rewards (Lightman et al. 2023; Uesato et al. 2022; the seed's "Process Rewards").

    Step s of row i scores p = step_scores[i, s] (NaN: unscored, counts as 0). normalize="group": p is
    replaced by (p - mean) / (std + eps) over all scored steps of the prompt's group (GRPO process
    supervision, Shao et al. 2024 Sec. 4.1.3). spread="even" gives each chosen token of the step p / (its
    chosen tokens), "full" gives each one p. cumulative=True is GRPO's process advantage: token t gets the
    sum of those per-step values over the steps whose last chosen token is at or after t (a step's own
    included). outcome="add" adds the outcome advantage to every chosen token: the GRPO group-normalised
    R when normalize="group", else R itself (broadcast). No critic: returns = None."""
    require(inputs, "process", "step_ids", "step_scores")
    check_choice("spread", spread, ("even", "full"))
    check_choice("outcome", outcome, ("add", "none"))
    check_choice("normalize", normalize, ("none", "group"))
    chosen = inputs.response_mask > 0                                             # [N, T]
    N, S = inputs.step_scores.shape
    if (chosen & (inputs.step_ids >= S)).any():
        raise ValueError(f"step_ids on chosen tokens reach {S} or more, but step_scores has S={S} steps")
    ids = torch.where(chosen & (inputs.step_ids >= 0), inputs.step_ids, S).long()  # [N, T] S = in no step
    scored = ~torch.isnan(inputs.step_scores)                                     # [N, S]
    p = torch.where(scored, inputs.step_scores, 0.0)                              # [N, S]
    if normalize == "group":  # statistics over the pool of every scored step of the group
        mean, std, _ = group_stats(p[scored], inputs.group_ids[:, None].expand(N, S)[scored])  # [K] each
        p = p.masked_scatter(scored, (p[scored] - mean) / (std + eps))
    per_step = torch.cat([p, torch.zeros(N, 1, dtype=p.dtype, device=p.device)], 1)  # [N, S+1]
    if spread == "even":
        n_tokens = torch.zeros_like(per_step).scatter_add_(1, ids, torch.ones_like(ids, dtype=p.dtype))
        per_step = per_step / n_tokens.clamp(min=1)
    if cumulative:  # place each step's value on its last chosen token, then sum from t to the end
        pos = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)         # [N, T]
        last = torch.full_like(per_step, -1, dtype=torch.long).scatter_reduce_(1, ids, pos, "amax")[:, :S]
        placed = torch.zeros(chosen.shape, dtype=p.dtype, device=p.device).scatter_add_(  # [N, T]
            1, last.clamp(min=0), torch.where(last >= 0, per_step[:, :S], 0.0))
        A = reverse_discounted_sum(placed, chosen, 1.0)                           # [N, T]
    else:
        A = masked(per_step.gather(1, ids), chosen)                               # [N, T]
    if outcome == "add":
        A = A + (group_baseline(inputs, eps=eps) if normalize == "group" else broadcast(inputs)).advantages
    return Credit(advantages=A)


@CREDIT.register("vineppo", needs=("values", "steps"), returns=False)
def vineppo(inputs: CreditInputs) -> Credit:
    """VinePPO (Kazemnejad et al. 2024): step advantages from Monte-Carlo values of step prefixes.

    Layout: `step_ids` [N, T] gives each chosen token its step (-1 = in no step); a step is a run of equal ids
    over the chosen tokens (tool outputs and padding between them are skipped). `values` [N, T] holds, at the
    FIRST chosen token of each step, V(prefix before the step): the mean score of K continuations sampled from
    the response cut just before that token (`step_boundaries` gives the cuts); other tokens' values are unread.
    A_t = token rewards from t to the step's end + V(after the step) - V(before it), with V(after) = V(before
    the next step) and V(after the last step) = the outcome score (gamma = 1). Chosen tokens in no step and
    masked tokens get 0. No critic: returns = None."""
    require(inputs, "vineppo", "values", "step_ids")
    in_step = (inputs.response_mask > 0) & (inputs.step_ids >= 0)                 # [N, T]
    ids, V, r = inputs.step_ids, masked(inputs.values, in_step), masked(inputs.token_rewards, in_step)
    before, A = torch.zeros_like(V), torch.zeros_like(V)                          # [N, T] V(before step), A
    run_id, run_v = ids.new_full(ids.shape[:1], -2), V.new_zeros(V.shape[0])      # [N] each
    for t in range(ids.shape[1]):  # forward: the value at the first token of the current step
        new = in_step[:, t] & (ids[:, t] != run_id)
        run_v, run_id = torch.where(new, V[:, t], run_v), torch.where(in_step[:, t], ids[:, t], run_id)
        before[:, t] = run_v
    run_id, run_v = ids.new_full(ids.shape[:1], -2), inputs.scores.to(V.dtype)    # [N] each
    after, to_go = run_v.clone(), torch.zeros_like(run_v)                         # [N] each
    for t in reversed(range(ids.shape[1])):  # backward: the value after the step, and rewards to go
        on = in_step[:, t]
        new = on & (ids[:, t] != run_id)
        after, to_go = torch.where(new, run_v, after), torch.where(new, 0.0, to_go) + r[:, t]
        run_v, run_id = torch.where(on, before[:, t], run_v), torch.where(on, ids[:, t], run_id)
        A[:, t] = torch.where(on, to_go + after - before[:, t], 0.0)
    return Credit(advantages=A)
