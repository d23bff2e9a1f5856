"""How the policy moves once credit is assigned: the update rules, one registry, one signature,

    rule(r: Recipe, rollout: Rollout, credit: Credit) -> metrics

    gradient   the optimizer on the policy loss (objectives/policy.py), epochs x minibatches, the LR schedule
    trpo       one natural-gradient step under KL(old || new) <= objective.max_kl (objectives/trpo.py); the
               optimizer and its schedule stay idle

A rule declares at registration whether it steps the optimizer (`optimizer`) and whether it takes the KL penalty
as a loss term (`kl_loss`); the recipe's build and checks read those (`UPDATES.info(name)`).
A critic, when there is one, is trained by either rule on `credit.returns`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from functools import partial

from llmrl.distributed import runtime as dist
from llmrl.objectives.value import explained_variance
from llmrl.registry import Registry
from llmrl.train.update import critic_update, policy_update, trpo_update

UPDATES: Registry = Registry("update rule")


@UPDATES.register("gradient", optimizer=True, kl_loss=True)
def gradient_rule(r, rollout, credit) -> dict:
    """Epochs over minibatches of the rollout, each one optimizer step on the policy loss (and the critic's)."""
    o = r.cfg.objective
    kl_in_loss = r.beta.value if o.kl_placement == "loss" else 0.0
    critic = r.critic and replace(r.critic, returns=credit.returns)
    teacher_coef = r.teacher.coef if r.teacher is not None and r.teacher.exact else 0.0   # exact distillation
    upd = policy_update(r.policy, r.optimizer, rollout, credit.advantages, partial(r.objective, kl_coef=kl_in_loss),
                        r.ex, r.passes, generator=r.generator, critic=critic,
                        skip_zero_advantage=kl_in_loss == 0 and o.entropy_coef == 0,
                        engine_correction=r.mismatch if r.tis_in_update else None, teacher_coef=teacher_coef)
    with warnings.catch_warnings():   # a step whose advantages were all 0 took no optimizer step;
        warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
        r.scheduler.step()            # the schedule counts training steps all the same
    return upd | _value_fit(critic, rollout)


@UPDATES.register("trpo", optimizer=False, kl_loss=False)
def trpo_rule(r, rollout, credit) -> dict:
    """One TRPO step on the policy (the surrogate aggregated as objective.aggregation, the constraint estimated
    with objective.kl_estimator), then one optimizer step of the critic alone."""
    o = r.cfg.objective
    upd = trpo_update(r.model, rollout, credit.advantages, max_kl=o.max_kl, cg_iters=o.cg_iters,
                      cg_damping=o.cg_damping, rows=o.trpo_rows, ex=r.ex,
                      aggregation=o.aggregation, constraint=o.kl_estimator, generator=r.generator)
    critic = r.critic and replace(r.critic, returns=credit.returns)
    if critic is not None:
        upd |= critic_update(critic, rollout, r.ex, r.cfg.optim.max_grad_norm)
    return upd | _value_fit(critic, rollout)


def _value_fit(critic, rollout) -> dict:
    """How much of the returns' variance the critic's values explained, over all ranks' rows."""
    if critic is None:
        return {}
    return {"value_explained_variance": float(explained_variance(*map(dist.gather_rows, (
        rollout.values, critic.returns, rollout.response_mask))))}
