"""Everything an RL run chooses once, from its config, before the first step: the `Recipe`.

    r = build(cfg)        # task, models, critic, optimizer, objective, credit estimator, engine, collector, stages
    rl_step(r, prompts)   # train/rl.py: one step that reads top to bottom, with no decision left to make

Every choice that depends on the config is made here (which optional stages run: train/stages.py; which update
rule moves the policy: train/rules.py), so the step itself has nothing to branch on but the data.
"""

from __future__ import annotations

import inspect
import itertools
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from llmrl.compute.fused import fuse_decoder_ops
from llmrl.compute.heap import allocate_adam_state
from llmrl.compute.settings import Execution, resolve_autocast, resolve_device
from llmrl.config import ConfigError, TrainConfig
from llmrl.credit import CREDIT
from llmrl.data import make_task
from llmrl.data.balance import answer_balanced
from llmrl.distributed import runtime as dist
from llmrl.distributed.parallel import check_parallel, wrap_policy
from llmrl.envs.episodes import collect_env_episodes
from llmrl.envs.tasks import ENV_TASKS
from llmrl.models import enable_gradient_checkpointing, load_model, load_reference, resolve_model_path
from llmrl.models.lora import AdapterDisabledReference, add_lora
from llmrl.models.value import Critic
from llmrl.objectives.kl import AdaptiveKLController, FixedKLController
from llmrl.objectives.mismatch import Correction
from llmrl.objectives.policy import OBJECTIVES
from llmrl.objectives.value import clipped_value_loss
from llmrl.rollout.collect import collect_rollout
from llmrl.rollout.episodes import collect_episodes
from llmrl.rollout.tools import demonstration, resolve_tools, system_prompt as tools_system_prompt
from llmrl.runio import checkpoint
from llmrl.runio.metrics import MetricsLog
from llmrl.runio.runs import start_run
from llmrl.runio.sinks import open_metrics
from llmrl.train import stages as stages_mod
from llmrl.train.checks import check_credit_sources, check_engine, check_prompts_fit, check_sampling
from llmrl.train.teacher import make_teacher
from llmrl.train.rules import UPDATES
from llmrl.train.sampling import SAMPLING, Batches, PassRates, SamplingState
from llmrl.train.schedules import lr_multiplier
from llmrl.train.update import CriticTraining, Passes


@dataclass
class Recipe:
    """One RL run's live objects and choices (made by `build`)."""
    cfg: TrainConfig
    run_dir: Path
    config_yaml: str
    generator: torch.Generator
    ex: Execution                       # how forwards run: dtype, packing, micro-batching, temperature, device
    passes: Passes                      # epochs, minibatches, gradient clip, early stop
    heldout: list
    batches: Iterator[list]             # the training prompts, a step's batch at a time
    tokenizer: Any
    model: torch.nn.Module              # the policy (the plain HF model: sampling, evaluation, saving)
    policy: torch.nn.Module             # the same, wrapped for DDP / FSDP under torchrun
    reference: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    beta: Any                           # the KL coefficient's controller
    objective: Callable                 # the policy loss, all but kl_coef bound
    estimator: Callable                 # the credit estimator, hyper-parameters bound
    update: Callable                    # the update rule (train/rules.py)
    critic: CriticTraining | None
    engine: Any                         # None: the native sampler; else a VLLMEngine
    collect: Callable                   # prompts -> Rollout (single-turn, or multi-turn tool episodes)
    sample: Callable                    # how a step's batch is drawn and scored (train/sampling.py)
    stages: list[Callable]              # what credit reads beyond the scores, in order (train/stages.py)
    mismatch: Correction                # the engine / trainer mismatch correction (objectives/mismatch.py)
    tis_in_update: bool                 # the engine's TIS weight comes from the update's own forward
    prompt_kw: dict
    eval_tokens: int
    state: checkpoint.TrainingState
    start: int = 0                      # the step a resumed run continues after
    evals: list = field(default_factory=list)
    metrics_log: MetricsLog | None = None
    samples_log: MetricsLog | None = None
    heldout_log: MetricsLog | None = None      # the first held-out answers of each evaluation
    pass_rates: PassRates | None = None  # sampling=curriculum: the prompts' running pass rates
    teacher: Any = None                 # on-policy distillation's teacher (train/teacher.py), or None


def build(cfg: TrainConfig) -> Recipe:
    """The recipe of `cfg`: checks first (before anything heavy loads), then the run folder, the task, the models,
    the optimizer and the pieces, and a resumed run's state. The order is fixed: seeded initialisation (a new
    value head, LoRA) draws from the global RNG in this order."""
    dist.init()                     # joins torchrun's process group; nothing in one process
    check_credit_sources(cfg)
    check_sampling(cfg)
    with dist.main_first():         # rank 0 sweeps or removes old checkpoints before the others look
        resume_from = checkpoint.resume_point(cfg)
    check_parallel(cfg, resume_from)
    check_engine(cfg)
    tools = cfg.rollout.tools
    system_prompt = cfg.model.system_prompt
    if tools and system_prompt is None:                     # with tools, teach the call format
        system_prompt = tools_system_prompt(tools)
    demo = demonstration(tools) if tools and cfg.rollout.tool_demo else None
    run_dir, config_yaml, gen = start_run(cfg)
    ex = Execution.from_config(cfg)
    prompt_kw = dict(chat_template=cfg.model.chat_template, system_prompt=system_prompt)
    eval_tokens = cfg.run.eval_max_new_tokens or cfg.rollout.max_new_tokens
    heldout, batches, first = _task(cfg)
    with dist.main_first():         # rank 0 builds a cached model folder (bundled / tiny) before the others read it
        model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    model = model.to(ex.device)     # run.device: the policy, and from it the reference, critic and every rollout
    check_prompts_fit(tokenizer, model, heldout + first, max_new_tokens=max(cfg.rollout.max_new_tokens, eval_tokens),
                      demo=demo, **prompt_kw)
    model, reference = _policy_and_reference(cfg, model, ex)
    estimator = partial(CREDIT.get(cfg.credit.estimator), **cfg.credit.options)
    critic = _critic(cfg, model, ex)
    policy = wrap_policy(model, cfg.run.parallel)   # DDP / FSDP2 under torchrun (after the critic's copy); else model
    optimizer, scheduler = _optimizer(cfg, policy, model)
    o = cfg.objective
    objective = _objective(o)
    beta = (AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.kl_target and o.kl_coef > 0
            else FixedKLController(o.kl_coef))
    batches, pass_rates = Batches(batches), PassRates(cfg.rollout.curriculum_pool)
    state = checkpoint.TrainingState(model, optimizer, scheduler, gen, beta, critic and critic.critic,
                                     critic and critic.optimizer, SamplingState(batches, pass_rates))
    start, evals = checkpoint.restore(resume_from, state, run_dir) if resume_from else (0, [])   # last: sets RNGs
    rule_uses_optimizer = UPDATES.info(o.update).get("optimizer", True)
    for opt in (optimizer if rule_uses_optimizer else None, critic and critic.optimizer):
        allocate_adam_state(opt)     # the moments now: one that does not fit fails here; less fragmented (heap.py)
    engine = make_engine(cfg)
    if engine is not None and start:
        engine.sync_weights(model)   # resumed: the engine starts from the checkpoint's weights, not the base's
    passes = Passes(o.epochs, o.minibatches, cfg.optim.max_grad_norm, o.early_stop_kl)
    tis_in_update = (engine is not None and rule_uses_optimizer and passes.on_policy
                     and not (o.kl_placement == "reward" and o.kl_coef > 0))
    return Recipe(
        cfg=cfg, run_dir=run_dir, config_yaml=config_yaml, generator=gen, ex=ex, passes=passes, heldout=heldout,
        batches=batches,                # resumed: the batches drawn up to the checkpoint are already skipped
        tokenizer=tokenizer, model=model, policy=policy, reference=reference, optimizer=optimizer,
        scheduler=scheduler, beta=beta, objective=objective, estimator=estimator, update=UPDATES.get(o.update),
        critic=critic, engine=engine, collect=make_collector(cfg, demo, engine, prompt_kw),
        sample=SAMPLING.get(cfg.rollout.sampling), pass_rates=pass_rates,
        stages=stages_mod.plan(cfg, engine is not None and not tis_in_update), tis_in_update=tis_in_update,
        mismatch=Correction(cfg.rollout.mismatch, cfg.rollout.tis_cap, cfg.rollout.mismatch_low),
        prompt_kw=prompt_kw, eval_tokens=eval_tokens, state=state, start=start, evals=evals,
        metrics_log=open_metrics(cfg, run_dir, start=start, enabled=dist.is_main()),
        samples_log=MetricsLog(run_dir / "samples.jsonl", "a" if start else "w", enabled=dist.is_main()),
        heldout_log=MetricsLog(run_dir / "heldout_samples.jsonl", "a" if start else "w", enabled=dist.is_main()),
        teacher=make_teacher(cfg, tokenizer))


def _task(cfg: TrainConfig) -> tuple[list, Iterator[list], list]:
    """(held-out examples, the training batches, the first batch) of the configured task."""
    task = make_task(cfg.task.name, seed=cfg.task.seed, options=cfg.task.options,
                     train_path=cfg.task.train_path, heldout_path=cfg.task.heldout_path)
    heldout = task.heldout(cfg.task.heldout_size)
    stream = task.train_stream(cfg.run.seed)
    if cfg.rollout.balance_answers:
        stream = answer_balanced(stream, seed=cfg.run.seed)
    first = list(itertools.islice(stream, cfg.rollout.prompts_per_step))
    if not heldout or not first:
        raise ValueError(f"task {cfg.task.name!r} produced no examples")
    return heldout, itertools.chain([first], _batches(stream, cfg.rollout.prompts_per_step)), first


def _batches(stream, size: int):
    while True:
        batch = list(itertools.islice(stream, size))
        if not batch:
            return
        yield batch


def _policy_and_reference(cfg: TrainConfig, model, ex: Execution):
    """The trainable policy (gradient checkpointing, LoRA) and the frozen reference: with LoRA, the base weights
    with the adapter disabled (no second copy); else a second copy stored as the forward computes."""
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)     # train mode, dropout off: HF checkpoints only in train mode
    model.config.use_cache = False
    if cfg.model.lora_r:
        model = add_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout,
                         targets=cfg.model.lora_targets)
        reference = AdapterDisabledReference(model)
    else:
        reference = load_reference(cfg.model.name, dtype=getattr(torch, cfg.model.dtype),
                                   linear_dtype=ex.autocast_dtype).to(ex.device)
    for m in (model, reference) if cfg.model.fused_ops else ():   # after LoRA: a LoRA down_proj keeps HF's MLP
        fuse_decoder_ops(m)
    return model, reference


def _objective(o) -> Callable:
    """The policy loss objective.name names, every hyper-parameter but kl_coef bound (objective.options: its own)."""
    fn = OBJECTIVES.get(o.name)
    own = set(inspect.signature(fn).parameters) - set(inspect.signature(OBJECTIVES.get("ppo_clip")).parameters)
    unknown = sorted(set(o.options) - own)
    if unknown:
        raise ConfigError(f"objective.options: {o.name} takes no {', '.join(unknown)}; "
                          f"its own options: {', '.join(sorted(own)) or 'none'}")
    return partial(fn, clip_low=o.clip_low, clip_high=o.clip_high, kl_estimator=o.kl_estimator,
                   entropy_coef=o.entropy_coef, aggregation=o.aggregation, dual_clip=o.dual_clip, **o.options)


def _critic(cfg: TrainConfig, model, ex: Execution) -> CriticTraining | None:
    if cfg.credit.values != "critic":
        return None
    critic = Critic.from_policy(model, shared=cfg.critic.shared_trunk, pack_tokens=ex.pack_tokens)
    optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
    objective = partial(clipped_value_loss, clip=cfg.critic.value_clip, coef=cfg.critic.coef,
                        aggregation=cfg.objective.aggregation)
    return CriticTraining(critic, optimizer, objective)


def _optimizer(cfg: TrainConfig, policy, model):
    """AdamW over the trainable parameters, fused (one kernel a step instead of a dozen passes over the weights,
    ~3x less step time on CPU) except for FSDP's sharded DTensors; and its LR schedule."""
    fused = policy is model or cfg.run.parallel == "ddp"
    o = cfg.optim
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=o.lr,
                                  betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=o.schedule, warmup=o.warmup_steps, total=cfg.run.steps))
    return optimizer, scheduler


def make_engine(cfg: TrainConfig):
    """The rollout engine `rollout.engine` names: None for the native sampler, else a `VLLMEngine` on the same
    local weights as the policy, computing in the policy's forward dtype unless `rollout.vllm_options` says."""
    if cfg.rollout.engine == "native":
        return None
    from llmrl.rollout.vllm_engine import VLLMEngine

    amp = resolve_autocast(cfg.model.autocast, resolve_device(cfg.run.device))   # the trainer's device decides auto
    dtype = "bfloat16" if amp is not None else cfg.model.dtype
    return VLLMEngine(resolve_model_path(cfg.model.name), dtype=dtype, seed=cfg.run.seed,
                      options=cfg.rollout.vllm_options, rows=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
                      max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.run.eval_max_new_tokens or 0))


def make_collector(cfg: TrainConfig, demo, engine, prompt_kw: dict) -> Callable:
    """collect(model, tokenizer, examples, **sampling) -> Rollout: `collect_rollout` (on `engine` when given), or
    the multi-turn episode loop with its tools (and the `demo` exchange before each prompt) when `rollout.tools`
    names any, or an environment's own episode loop for a verifiers / OpenEnv task (llmrl/envs); the chat template
    and system prompt bound."""
    r = cfg.rollout
    if cfg.task.name in ENV_TASKS:          # an environment's own episodes (llmrl/envs)
        return partial(collect_env_episodes, max_turns=r.max_turns, keep_cache=r.turn_cache, **prompt_kw)
    if not r.tools:
        return partial(collect_rollout, engine=engine, **prompt_kw)
    return partial(collect_episodes, tools=resolve_tools(r.tools), max_turns=r.max_turns,
                   max_observation_tokens=r.max_observation_tokens, demo=demo, keep_cache=r.turn_cache, **prompt_kw)
