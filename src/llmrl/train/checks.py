"""Checks the RL recipe runs before it loads anything heavy: a config whose credit pieces do not fit together,
or a prompt that leaves no room in the model's context for the response, fails here with a clear error."""

from __future__ import annotations

from llmrl.config import TrainConfig
from llmrl.credit import CREDIT
from llmrl.rewards.process import STEP_REWARDS
from llmrl.rollout.collect import encode_prompt
from llmrl.train.rules import UPDATES


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


def check_credit_sources(cfg: TrainConfig) -> None:
    """Fail before training when the credit estimator and its value / step sources do not fit together. What an
    estimator needs is declared where it is registered (`CREDIT.info`), what an update rule takes in `UPDATES.info`."""
    c = cfg.credit
    info = CREDIT.info(c.estimator)
    needs = set(info.get("needs", ()))
    if "values" in needs and c.values == "none":
        raise ValueError(f"credit.estimator {c.estimator!r} needs values: set credit.values to critic or monte_carlo")
    if c.values == "critic" and not info.get("returns", True):
        raise ValueError(f"credit.estimator {c.estimator!r} gives no returns to train a critic on; "
                         "use credit.values=monte_carlo or another estimator")
    if "step_scores" in needs and not c.step_reward:
        raise ValueError(f"credit.estimator {c.estimator!r} needs credit.step_reward (equations, step_judge or prm)")
    if c.step_reward and c.step_reward not in STEP_REWARDS:
        raise ValueError(f"credit.step_reward {c.step_reward!r} is not one of: {', '.join(STEP_REWARDS.names())}")
    if ("steps" in needs or c.values == "monte_carlo" or c.step_reward) and c.steps == "none":
        raise ValueError("step-level credit needs a segmenter: set credit.steps to blank_line, numbered or regex")
    if "teacher" in needs and cfg.teacher is None:
        raise ValueError(f"credit.estimator {c.estimator!r} needs a teacher: set teacher.path (a local checkpoint "
                         "with the student's tokenizer) or teacher.source=self")
    if c.steps == "regex" and not c.step_pattern:
        raise ValueError("credit.steps=regex needs credit.step_pattern")
    if cfg.rollout.tools and c.values == "monte_carlo":
        raise ValueError("credit.values=monte_carlo branches single-turn continuations and runs no tools; "
                         "with rollout.tools use credit.values none or critic")
    check_update_rule(cfg)


def check_update_rule(cfg: TrainConfig) -> None:
    o = cfg.objective
    if not UPDATES.info(o.update).get("kl_loss", True) and o.kl_coef > 0 and o.kl_placement == "loss":
        raise ValueError(f"objective.update={o.update} takes no KL loss term (TRPO constrains the step by max_kl): "
                         "set objective.kl_placement=reward or objective.kl_coef=0")
    if o.update == "trpo" and o.kl_estimator == "k1":
        raise ValueError("objective.update=trpo estimates its constraint KL(old || new) with objective.kl_estimator, "
                         "which must be k2 or k3 (k1 can be negative on a sample)")


def check_sampling(cfg: TrainConfig) -> None:
    """Sampling and shaping settings that cannot work together."""
    s = cfg.rollout
    if s.sampling == "dynamic" and s.group_size < 2:
        raise ValueError("rollout.sampling=dynamic drops groups whose rewards have zero variance, and a group of "
                         "one always has none: set rollout.group_size >= 2")


def check_engine(cfg: TrainConfig) -> None:
    """With rollout.engine=vllm: fail before loading anything when vLLM is missing or cannot serve the run."""
    if cfg.rollout.engine != "vllm":
        return
    from llmrl.distributed import runtime as dist
    from llmrl.rollout.vllm_engine import INSTALL_HINT, vllm_available

    from llmrl.envs.tasks import ENV_TASKS

    if cfg.rollout.tools or cfg.task.name in ENV_TASKS:
        raise ValueError("rollout.engine=vllm samples single-turn completions; multi-turn tool episodes "
                         "(rollout.tools) run on the native sampler: set rollout.engine=native")
    if cfg.run.parallel == "fsdp" and dist.world() > 1:
        raise ValueError("rollout.engine=vllm is not supported with run.parallel=fsdp; use ddp")
    if not vllm_available():
        raise ValueError(INSTALL_HINT)
