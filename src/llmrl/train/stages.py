"""What credit assignment reads beyond the outcome scores, computed between scoring and credit: the optional
stages of an RL step. Each is one function with one signature,

    stage(r: Recipe, rollout: Rollout) -> (rollout with its field filled, metrics)

and `plan(cfg, ...)` picks the ones a config needs, once, in this order:

| stage               | fills                      | runs when                                                   |
|---------------------|----------------------------|-------------------------------------------------------------|
| engine_logprobs     | logp_old (pi_old), is_weight | another engine sampled and the update cannot take them itself |
| reference_logprobs  | logp_ref                   | there is a KL term (objective.kl_coef > 0)                   |
| segment_steps       | step_ids                   | credit.steps names a segmenter                               |
| step_rewards        | step_scores                | credit.step_reward names a step reward (process rewards)     |
| monte_carlo_values  | values                     | credit.values = monte_carlo (VinePPO)                        |
| critic_values       | values                     | credit.values = critic                                       |
| teacher_logprobs    | extras: logp_teacher, teacher_rewards | there is a `teacher` (on-policy distillation: train/teacher.py) |
"""

from __future__ import annotations

from llmrl.compute.batches import batched_logprobs, batched_values
from llmrl.credit import step_boundaries, step_ids_for_batch
from llmrl.distributed.parallel import full_params
from llmrl.objectives.mismatch import mismatch_stats
from llmrl.rewards import score
from llmrl.rewards.process import score_steps, step_texts
from llmrl.rollout.branch import monte_carlo_values as branched_values
from llmrl.train.teacher import teacher_logprobs


def engine_logprobs(r, rollout):
    """pi_old: the policy's own log-probs of the engine's tokens, and each token's importance weight over the
    engine's mu from the correction rollout.mismatch names (token TIS min(pi_old / mu, rollout.tis_cap) by
    default; objectives/mismatch.py)."""
    logp_engine = rollout.logp_old
    logp_policy = batched_logprobs(r.model, rollout, r.ex)
    stats = mismatch_stats(logp_policy, logp_engine, rollout.response_mask, cap=r.mismatch.cap)
    rollout = rollout.with_(logp_old=logp_policy, is_weight=r.mismatch(logp_policy, logp_engine,
                                                                         rollout.response_mask))
    return rollout, {k: float(v) for k, v in stats.items()}


def reference_logprobs(r, rollout):
    """log pi_ref of the sampled tokens, for the KL term."""
    return rollout.with_(logp_ref=batched_logprobs(r.reference, rollout, r.ex)), {}


def segment_steps(r, rollout):
    """The reasoning step of each response token (credit.steps: blank_line, numbered, regex)."""
    c = r.cfg.credit
    return rollout.with_(step_ids=step_ids_for_batch(r.tokenizer, rollout.response_ids, rollout.response_mask,
                                                     mode=c.steps, pattern=c.step_pattern)), {}


def step_rewards(r, rollout):
    """A score per reasoning step from the step reward credit.step_reward names (process rewards)."""
    c = r.cfg.credit
    texts = step_texts(r.tokenizer, rollout.response_ids, rollout.step_ids)
    scores, failures = score_steps(c.step_reward, rollout.completions, texts, rollout.examples,
                                   c.step_reward_options)
    scored = scores[~scores.isnan()]
    return rollout.with_(step_scores=scores.to(rollout.response_mask.device)), {"step_reward": float(scored.mean()) if scored.numel() else None,
                                                "step_reward_failures": failures, "steps_scored": int(scored.numel())}


def monte_carlo_values(r, rollout):
    """V(step prefix): the mean reward of credit.mc_samples continuations from each step boundary (VinePPO)."""
    c, s = r.cfg.credit, r.cfg.rollout
    terms = r.cfg.reward.terms
    with full_params(r.policy):
        values, stats = branched_values(
            r.model, r.tokenizer, rollout, step_boundaries(rollout.step_ids),
            lambda texts, examples: score(texts, examples, terms).total, samples=c.mc_samples,
            max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
            autocast_dtype=r.ex.autocast_dtype, generator=r.generator)
    return rollout.with_(values=values), stats


def critic_values(r, rollout):
    """V(s_t) of every response position under the critic."""
    return rollout.with_(values=batched_values(r.critic.critic, rollout, r.ex)), {}


def plan(cfg, engine_logprobs_needed: bool) -> list:
    """The stages `cfg` needs, in order (see the module docstring)."""
    c = cfg.credit
    wanted = [
        (engine_logprobs, engine_logprobs_needed),
        (reference_logprobs, cfg.objective.kl_coef > 0),
        (segment_steps, c.steps != "none"),
        (step_rewards, bool(c.step_reward)),
        (monte_carlo_values, c.values == "monte_carlo"),
        (critic_values, c.values == "critic"),
        (teacher_logprobs, getattr(cfg, "teacher", None) is not None),
    ]
    return [stage for stage, on in wanted if on]
