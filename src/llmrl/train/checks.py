"""Checks the RL recipe runs before it loads anything heavy: a config whose credit pieces do not fit together,
or a prompt that leaves no room in the model's context for the response, fails here with a clear error."""

from __future__ import annotations

from llmrl.config import TrainConfig
from llmrl.rewards.process import STEP_REWARDS
from llmrl.rollout.collect import encode_prompt


def check_prompts_fit(tokenizer, model, examples, *, max_new_tokens: int, chat_template: bool, system_prompt,
                      demo: list[dict] | None = None) -> None:
    """Fail before training if a prompt plus the response budget exceeds the model's context."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if not limit:
        return
    for ex in examples:
        n = len(encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt, demo=demo))
        if n + max_new_tokens > limit:
            raise ValueError(f"prompt of {n} tokens + max_new_tokens {max_new_tokens} exceeds the model's context "
                             f"of {limit} tokens: {ex.prompt[:80]!r}...")


NEEDS_VALUES = {"value_baseline", "gae", "vineppo"}      # estimators that read V(s_t)
NO_RETURNS = {"process", "vineppo"}                     # estimators that give no regression targets for a critic
NEEDS_STEPS = {"process", "vineppo"}


def check_credit_sources(cfg: TrainConfig) -> None:
    """Fail before training when the credit estimator and its value / step sources do not fit together."""
    c = cfg.credit
    if c.estimator in NEEDS_VALUES and c.values == "none":
        raise ValueError(f"credit.estimator {c.estimator!r} needs values: set credit.values to critic or monte_carlo")
    if c.values == "critic" and c.estimator in NO_RETURNS:
        raise ValueError(f"credit.estimator {c.estimator!r} gives no returns to train a critic on; "
                         "use credit.values=monte_carlo or another estimator")
    if c.estimator == "process" and not c.step_reward:
        raise ValueError("credit.estimator 'process' needs credit.step_reward (equations, step_judge or prm)")
    if c.step_reward and c.step_reward not in STEP_REWARDS:
        raise ValueError(f"credit.step_reward {c.step_reward!r} is not one of: {', '.join(STEP_REWARDS.names())}")
    if (c.estimator in NEEDS_STEPS or c.values == "monte_carlo" or c.step_reward) and c.steps == "none":
        raise ValueError("step-level credit needs a segmenter: set credit.steps to blank_line, numbered or regex")
    o = cfg.objective
    if o.update == "trpo" and o.kl_coef > 0 and o.kl_placement == "loss":
        raise ValueError("objective.update=trpo constrains the step by max_kl and takes no KL loss term: "
                         "set objective.kl_placement=reward or objective.kl_coef=0")
    if c.steps == "regex" and not c.step_pattern:
        raise ValueError("credit.steps=regex needs credit.step_pattern")
    if cfg.rollout.tools and c.values == "monte_carlo":
        raise ValueError("credit.values=monte_carlo branches single-turn continuations and runs no tools; "
                         "with rollout.tools use credit.values none or critic")
