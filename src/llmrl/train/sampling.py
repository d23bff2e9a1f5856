"""How a step's batch is drawn and scored: the sampling strategies, one registry, one signature,

    strategy(r: Recipe, prompts: list) -> Sampled(rollout, rewards, stats, time_rollout, time_reward)

    plain       the step's prompts, G samples each, scored (the default)
    dynamic     DAPO's dynamic sampling (Yu et al. 2025, arXiv 2503.14476, sec. 3.2): groups whose rewards all
                agree (zero variance: max = min, never judged by the mean, rewards need not be binary) carry no
                gradient and are dropped; more prompts are sampled until the batch again holds prompts_per_step
                groups, at most rollout.dynamic_max_rounds rounds; the batch then takes the first kept groups
    curriculum  a pass-rate curriculum: a bounded pool keeps each prompt's running pass rate; up to
                rollout.curriculum_replay of each batch replays pool prompts whose rate is strictly between 0 and
                1 (the ones that still teach), the rest are the step's fresh prompts; solved prompts retire

Every strategy applies the same shaping to what it draws (`draw`): DAPO's soft overlong penalty as a reward term
(rollout.overlong_buffer > 0; rewards/overlong.py) and truncation masking (rollout.mask_truncated: a response cut at
max_new_tokens leaves the loss). `stats` (global over torchrun's ranks, logged per step): the fraction of drawn
groups with zero reward variance, the fraction of duplicate completions within groups, `sampled_entropy` = the
mean -log p of the sampled tokens under the sampler (a Monte-Carlo estimate of the per-token entropy, E[-log p(x)]
= H, measured even on a step whose advantages are all 0 and whose update computes nothing), and for `dynamic` the
prompts drawn and kept, the wasted fraction and the rounds.

Under torchrun every decision is taken from global counts (`dist.any_rank`, `dist.all_max`), so every rank samples
the same number of rounds and keeps as many groups: no rank waits on a collective the others never reach.
What sampling carries from step to step (`SamplingState`: the batches drawn, which `dynamic` makes more than the
steps, and the curriculum's pool) goes into every checkpoint, so a resumed run draws exactly the prompts an
uninterrupted one would.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from llmrl.distributed import runtime as dist
from llmrl.distributed.parallel import full_params
from llmrl.registry import Registry
from llmrl.rewards import RewardResult, score
from llmrl.rewards.overlong import with_overlong
from llmrl.rollout.types import Rollout, concat_rollouts

SAMPLING: Registry = Registry("sampling strategy")


@dataclass
class Sampled:
    rollout: Rollout
    rewards: RewardResult
    stats: dict
    time_rollout: float
    time_reward: float


def draw(r, prompts: list) -> tuple[Rollout, RewardResult, float, float]:
    """Generate (this rank's share of `prompts`, G samples each), score, shape -> (rollout, rewards, seconds
    generating, seconds scoring)."""
    s = r.cfg.rollout
    t0 = time.perf_counter()
    with full_params(r.policy):
        rollout = r.collect(r.model, r.tokenizer, dist.split_prompts(prompts), group_size=s.group_size,
                            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                            autocast_dtype=r.ex.autocast_dtype, generator=r.generator)
    t1 = time.perf_counter()
    rewards = dist.global_rewards(score(rollout.completions, rollout.examples, r.cfg.reward.terms), r.cfg.reward.terms)
    if s.overlong_buffer:
        lengths = rollout.attention_mask[:, rollout.prompt_len:].sum(-1)   # sampled and tool tokens, as the cap
        rewards = with_overlong(rewards, lengths, max_len=s.max_new_tokens, weight=s.overlong_weight,
                                buffer=max(1, round(s.overlong_buffer * s.max_new_tokens)))
    if s.mask_truncated:
        kept = (~rollout.extras["truncated"].bool()).float()[:, None]
        rollout = rollout.with_(response_mask=rollout.response_mask * kept)
    return rollout, rewards, t1 - t0, time.perf_counter() - t1


def group_counts(rollout: Rollout, rewards: RewardResult) -> tuple[torch.Tensor, dict[str, float]]:
    """(which groups have reward variance [number of groups] bool, this rank's counts: groups, zero-variance
    groups, rows, duplicate rows: a completion equal to an earlier one of its group, chosen tokens and their summed
    -log p under the sampler)."""
    ids = rollout.group_ids.unique(sorted=True)
    varied, dups = [], 0
    for g in ids.tolist():
        rows = (rollout.group_ids == g).nonzero()[:, 0]
        scores = rewards.total[rows]
        varied.append(bool(scores.max() > scores.min()))
        texts = [rollout.completions[i] for i in rows.tolist()]
        dups += len(texts) - len(set(texts))
    varied_t = torch.tensor(varied, dtype=torch.bool, device=rollout.group_ids.device)
    chosen = rollout.response_mask.bool()
    return varied_t, {"groups": float(len(ids)), "zero_variance": float((~varied_t).sum()),
                      "rows": float(len(rollout.completions)), "duplicates": float(dups),
                      "tokens": float(chosen.sum()), "nll": -float(rollout.logp_old[chosen].sum())}


def take_rows(rollout: Rollout, rewards: RewardResult, idx: torch.Tensor) -> tuple[Rollout, RewardResult]:
    """Rows `idx` of a rollout (its [N] extras included) and of its rewards."""
    part = rollout.select(idx).with_(extras={k: v[idx] for k, v in rollout.extras.items()})
    return part, replace(rewards, total=rewards.total[idx], components={k: v[idx] for k, v in
                                                                        rewards.components.items()})


def concat_rewards(parts: list[RewardResult]) -> RewardResult:
    failures = {}
    for p in parts:
        for k, v in p.failures.items():
            failures[k] = failures.get(k, 0) + v
    return RewardResult(total=torch.cat([p.total for p in parts]),
                        components={k: torch.cat([p.components[k] for p in parts]) for k in parts[0].components},
                        failures=failures)


def batch_stats(counts: dict[str, float]) -> dict[str, float]:
    """The logged fractions from global counts."""
    c = dist.sum_values(counts)
    return {"zero_variance_group_fraction": c["zero_variance"] / max(c["groups"], 1.0),
            "duplicate_completion_fraction": c["duplicates"] / max(c["rows"], 1.0),
            "sampled_entropy": c["nll"] / max(c["tokens"], 1.0)}


@SAMPLING.register("plain")
def plain(r, prompts: list) -> Sampled:
    """The step's prompts, as they come."""
    rollout, rewards, t_roll, t_rew = draw(r, prompts)
    _, counts = group_counts(rollout, rewards)
    return Sampled(rollout, rewards, batch_stats(counts), t_roll, t_rew)


@SAMPLING.register("dynamic")
def dynamic(r, prompts: list) -> Sampled:
    """DAPO dynamic sampling (module docstring): rounds of prompts until every rank holds its share of groups
    with reward variance, or rollout.dynamic_max_rounds rounds; then every rank keeps the same number of groups
    (the fewest any rank has). No kept group at all: the last round, unfiltered (its advantages are 0)."""
    need = len(dist.split_prompts(prompts))           # groups per rank in a full batch
    parts, totals, rounds, have, t_roll, t_rew = [], {}, 0, 0, 0.0, 0.0
    while True:
        rollout, rewards, a, b = draw(r, prompts)
        t_roll, t_rew, rounds = t_roll + a, t_rew + b, rounds + 1
        varied, counts = group_counts(rollout, rewards)
        totals = {k: totals.get(k, 0.0) + v for k, v in counts.items()}
        keep_ids = rollout.group_ids.unique(sorted=True)[varied]
        if len(keep_ids):
            parts.append(take_rows(rollout, rewards, torch.isin(rollout.group_ids, keep_ids).nonzero()[:, 0]))
        have += len(keep_ids)
        if not dist.any_rank(have < need) or rounds >= r.cfg.rollout.dynamic_max_rounds:
            break
        prompts = next(r.batches)
    k = min(-dist.all_max(-have), need)               # the fewest kept groups on any rank, at most a full share
    if k == 0:
        batch, batch_rewards = rollout, rewards
    else:
        batch = concat_rollouts([p[0] for p in parts], pad_id=r.tokenizer.pad_token_id)
        batch_rewards = concat_rewards([p[1] for p in parts])
        first = batch.group_ids.unique(sorted=True)[:k]
        batch, batch_rewards = take_rows(batch, batch_rewards, torch.isin(batch.group_ids, first).nonzero()[:, 0])
        batch = batch.with_(group_ids=torch.unique(batch.group_ids, return_inverse=True)[1])   # 0 .. k-1, as drawn
    c = dist.sum_values({"drawn": totals["groups"], "kept": float(k)})
    stats = batch_stats(totals) | {"sampling_rounds": float(rounds), "sampling_prompts_drawn": c["drawn"],
                                   "sampling_prompts_kept": c["kept"],
                                   "sampling_wasted_fraction": 1.0 - c["kept"] / max(c["drawn"], 1.0)}
    return Sampled(batch, batch_rewards, stats, t_roll, t_rew)


class PassRates:
    """A bounded pool of prompts with their running pass rates: rate <- (rate + group pass rate) / 2 (the first
    visit sets it). Over `size` prompts, the least recently updated leave; a prompt at rate 1 (solved) retires."""

    def __init__(self, size: int):
        self.size = size
        self.pool: OrderedDict[str, tuple[float, object]] = OrderedDict()   # prompt -> (rate, example)

    def update(self, examples: list, rates: list[float]) -> int:
        """Fold in one pass rate per example; returns how many retired (solved)."""
        retired = 0
        for ex, rate in zip(examples, rates):
            old = self.pool.pop(ex.prompt, None)
            new = rate if old is None else 0.5 * (old[0] + rate)
            if new >= 1.0:
                retired += 1
                continue
            self.pool[ex.prompt] = (new, ex)
        while len(self.pool) > self.size:
            self.pool.popitem(last=False)
        return retired

    def learnable(self, n: int) -> list:
        """Up to n pool examples with 0 < rate < 1, least recently updated first."""
        return [ex for rate, ex in self.pool.values() if 0.0 < rate < 1.0][:n]


class Batches:
    """The training prompts, a step's batch at a time, counting the batches drawn."""

    def __init__(self, batches: Iterator[list]):
        self._it, self.drawn = batches, 0

    def __iter__(self) -> "Batches":
        return self

    def __next__(self) -> list:
        batch = next(self._it)
        self.drawn += 1
        return batch


@dataclass
class SamplingState:
    """What sampling carries between steps, as a checkpoint saves it (JSON): how many batches were drawn and the
    curriculum pool as (prompt, rate) pairs. Restoring draws the batches again (the stream is seeded) and finds
    the pool's examples among them, so a resumed run goes on from the same prompts and rates."""
    batches: Batches
    pass_rates: PassRates

    def state_dict(self) -> dict:
        return {"batches_drawn": self.batches.drawn,
                "pass_rates": [[prompt, rate] for prompt, (rate, _) in self.pass_rates.pool.items()]}

    def load_state_dict(self, state: dict) -> None:
        wanted, seen = {prompt for prompt, _ in state["pass_rates"]}, {}
        while self.batches.drawn < state["batches_drawn"]:
            for ex in next(self.batches):
                if ex.prompt in wanted:
                    seen[ex.prompt] = ex
        missing = wanted - seen.keys()
        if missing:
            raise ValueError(f"the checkpoint's curriculum pool names {len(missing)} prompt(s) the task's training "
                             f"stream did not produce again, e.g. {next(iter(missing))!r}: was the task changed?")
        self.pass_rates.pool = OrderedDict((prompt, (rate, seen[prompt])) for prompt, rate in state["pass_rates"])


@SAMPLING.register("curriculum")
def curriculum(r, prompts: list) -> Sampled:
    """The pass-rate curriculum (module docstring). The pool lives on the recipe (`r.pass_rates`) and is the same
    on every rank: the pass rates are gathered from all ranks before it is updated."""
    s = r.cfg.rollout
    pool = r.pass_rates
    replay = pool.learnable(int(s.curriculum_replay * len(prompts)))
    replayed = {ex.prompt for ex in replay}
    batch = replay + [ex for ex in prompts if ex.prompt not in replayed][:len(prompts) - len(replay)]
    batch += prompts[:len(prompts) - len(batch)]      # the same size whatever the overlap
    rollout, rewards, t_roll, t_rew = draw(r, batch)
    _, counts = group_counts(rollout, rewards)
    passed = (rewards.total >= s.curriculum_pass).float()
    ids = rollout.group_ids.unique(sorted=True).tolist()
    mine = [(rollout.examples[int((rollout.group_ids == g).nonzero()[0, 0])],
             float(passed[rollout.group_ids == g].mean())) for g in ids]
    every = [pair for rank_pairs in dist.gather_objects(mine) for pair in rank_pairs]
    retired = pool.update([ex for ex, _ in every], [rate for _, rate in every])
    stats = batch_stats(counts) | {"curriculum_replayed": float(len(replay)), "curriculum_retired": float(retired),
                                   "curriculum_pool": float(len(pool.pool))}
    return Sampled(rollout, rewards, stats, t_roll, t_rew)
