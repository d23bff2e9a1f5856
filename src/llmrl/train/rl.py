"""The RL recipe, top to bottom: sample prompts -> generate -> score -> assign credit -> update -> log.

It calls the math in `credit/` and `objectives/`; it never re-implements it. Every piece is chosen by
name from the config (see `llmrl presets` for the named compositions). Under torchrun each rank runs this
same recipe on its share of the prompts; the `dist.*` and `parallel` calls make its statistics global and
are the identity in one process (`train/distributed.py`, `train/parallel.py`).

With `rollout.engine=vllm` a vLLM engine in this process generates; after generation the policy's own log-probs
of the sampled tokens are recomputed (they are pi_old of the PPO ratio), each token's policy-gradient term is
weighted by the truncated importance weight min(pi_old / mu, C) of the policy over the engine
(`objectives/mismatch.py`), and after each update the new weights are pushed into the engine in memory.
"""

from __future__ import annotations

import itertools
import logging
import time
import warnings
from functools import partial

import torch
import yaml

from llmrl.config import TrainConfig
from llmrl.credit import CREDIT, CreditInputs, step_ids_for_batch
from llmrl.data import make_task
from llmrl.models import enable_gradient_checkpointing, fuse_decoder_ops, load_model, load_reference, resolve_model_path
from llmrl.models.lora import AdapterDisabledReference, add_lora
from llmrl.models.value import Critic
from llmrl.objectives.value import clipped_value_loss, explained_variance
from llmrl.objectives.kl import AdaptiveKLController, FixedKLController, kl_in_reward
from llmrl.objectives.mismatch import mismatch_stats, truncated_is_weight
from llmrl.objectives.policy import OBJECTIVES
from llmrl.rewards import score
from llmrl.rewards.process import score_steps, step_texts
from llmrl.rollout.branch import monte_carlo_values
from llmrl.rollout.collect import collect_rollout
from llmrl.rollout.episodes import collect_episodes
from llmrl.envs.episodes import collect_env_episodes
from llmrl.envs.tasks import ENV_TASKS
from llmrl.rollout.tools import demonstration, resolve_tools, system_prompt as tools_system_prompt
from llmrl.train import checkpoint
from llmrl.train.checks import check_credit_sources, check_prompts_fit
from llmrl.train import distributed as dist
from llmrl.train.evaluate import evaluate
from llmrl.train.heap import allocate_adam_state
from llmrl.train.metrics import MetricsLog, sample_records
from llmrl.train.parallel import check_parallel, full_params, wrap_policy
from llmrl.train.runs import save_checkpoint, start_run
from llmrl.train.schedules import lr_multiplier
from llmrl.train.sinks import open_metrics
from llmrl.train.update import batched_logprobs, batched_values, critic_update, policy_update, trpo_update

log = logging.getLogger("llmrl.train")


# metrics that add up over ranks under torchrun (the others are per-row means, averaged; time_* the slowest rank's)
SUMMED_METRICS = ("reward_failures", "update_rows", "tokens_per_s", "step_reward_failures", "steps_scored",
                  "mc_boundaries", "mc_continuations")


def rollout_collector(cfg: TrainConfig, demo: list[dict] | None = None, engine=None):
    """`collect_rollout` (on `engine` when given), or the multi-turn episode loop with its tools (and `demo`
    exchange before each prompt) when `rollout.tools` names any."""
    r = cfg.rollout
    if cfg.task.name in ENV_TASKS:          # an environment's own episodes (llmrl/envs)
        return partial(collect_env_episodes, max_turns=r.max_turns, keep_cache=r.turn_cache)
    if not r.tools:
        return partial(collect_rollout, engine=engine)
    return partial(collect_episodes, tools=resolve_tools(r.tools), max_turns=r.max_turns,
                   max_observation_tokens=r.max_observation_tokens, demo=demo, keep_cache=r.turn_cache)


def make_engine(cfg: TrainConfig):
    """The rollout engine `rollout.engine` names: None for the native sampler, else a `VLLMEngine` on the same
    local weights as the policy, computing in the policy's forward dtype unless `rollout.vllm_options` says."""
    if cfg.rollout.engine == "native":
        return None
    from llmrl.rollout.vllm_engine import VLLMEngine

    dtype = "bfloat16" if cfg.model.autocast == "bfloat16" else cfg.model.dtype
    return VLLMEngine(resolve_model_path(cfg.model.name), dtype=dtype, seed=cfg.run.seed,
                      options=cfg.rollout.vllm_options, rows=cfg.rollout.prompts_per_step * cfg.rollout.group_size,
                      max_new_tokens=max(cfg.rollout.max_new_tokens, cfg.run.eval_max_new_tokens or 0))


def train(cfg: TrainConfig, *, progress: bool | None = None) -> dict:
    """Run one RL training job described by `cfg`. Returns a summary with held-out accuracy before and after."""
    # ------------------------------------------------------------------ setup
    dist.init()                     # joins torchrun's process group; nothing in one process
    check_credit_sources(cfg)
    with dist.main_first():         # rank 0 sweeps or removes old checkpoints before the others look
        resume_from = checkpoint.resume_point(cfg)         # a checkpoint to continue from (run.resume), or None
    check_parallel(cfg, resume_from)
    tools, system_prompt = cfg.rollout.tools, cfg.model.system_prompt
    if tools and system_prompt is None:                     # with tools, teach the call format
        system_prompt = tools_system_prompt(tools)
    demo = demonstration(tools) if tools and cfg.rollout.tool_demo else None
    if cfg.rollout.engine == "vllm":   # fail before loading anything when vLLM is missing or cannot serve the run
        from llmrl.rollout.vllm_engine import INSTALL_HINT, vllm_available
        if tools or cfg.task.name in ENV_TASKS:
            raise ValueError("rollout.engine=vllm samples single-turn completions; multi-turn tool episodes "
                             "(rollout.tools) run on the native sampler: set rollout.engine=native")
        if cfg.run.parallel == "fsdp" and dist.world() > 1:
            raise ValueError("rollout.engine=vllm is not supported with run.parallel=fsdp; use ddp")
        if not vllm_available():
            raise ValueError(INSTALL_HINT)
    run_dir, config_yaml, gen = start_run(cfg)
    amp = torch.bfloat16 if cfg.model.autocast == "bfloat16" else None
    pack = cfg.optim.pack_tokens if cfg.optim.packing else None     # padding-free update-phase forwards
    micro = dict(micro_batch_size=cfg.optim.micro_batch_size, micro_batch_tokens=cfg.optim.micro_batch_tokens)
    prompt_kw = dict(chat_template=cfg.model.chat_template, system_prompt=system_prompt)
    eval_tokens = cfg.run.eval_max_new_tokens or cfg.rollout.max_new_tokens

    task = make_task(cfg.task.name, seed=cfg.task.seed, options=cfg.task.options,
                     train_path=cfg.task.train_path, heldout_path=cfg.task.heldout_path)
    heldout = task.heldout(cfg.task.heldout_size)
    stream = task.train_stream(cfg.run.seed)
    first = list(itertools.islice(stream, cfg.rollout.prompts_per_step))
    if not heldout or not first:
        raise ValueError(f"task {cfg.task.name!r} produced no examples")

    with dist.main_first():         # rank 0 builds a cached model folder (bundled / tiny) before the others read it
        model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    check_prompts_fit(tokenizer, model, heldout + first, max_new_tokens=max(cfg.rollout.max_new_tokens, eval_tokens),
                      demo=demo, **prompt_kw)
    if cfg.model.gradient_checkpointing:
        enable_gradient_checkpointing(model)     # train mode, dropout off: HF checkpoints only in train mode
    model.config.use_cache = False
    if cfg.model.lora_r:
        model = add_lora(model, r=cfg.model.lora_r, alpha=cfg.model.lora_alpha, dropout=cfg.model.lora_dropout,
                         targets=cfg.model.lora_targets)
        reference = AdapterDisabledReference(model)       # the base weights: no second copy
    else:
        reference = load_reference(cfg.model.name, dtype=getattr(torch, cfg.model.dtype), linear_dtype=amp)  # as policy
    for m in (model, reference) if cfg.model.fused_ops else ():   # after LoRA: a LoRA down_proj keeps HF's MLP
        fuse_decoder_ops(m)
    estimator = partial(CREDIT.get(cfg.credit.estimator), **cfg.credit.options)
    critic = critic_optimizer = value_objective = None
    if cfg.credit.values == "critic":
        critic = Critic.from_policy(model, shared=cfg.critic.shared_trunk, pack_tokens=pack)
        critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=cfg.critic.lr, betas=tuple(cfg.optim.betas),
                                             eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=True)
        value_objective = partial(clipped_value_loss, clip=cfg.critic.value_clip, coef=cfg.critic.coef,
                                  aggregation=cfg.objective.aggregation)
    policy = wrap_policy(model, cfg.run.parallel)   # DDP / FSDP2 under torchrun (after the critic's copy); else model
    # fused: one kernel per step instead of a dozen passes over the weights (~3x less step time on CPU);
    # FSDP's sharded DTensor parameters keep the default implementation
    fused = policy is model or cfg.run.parallel == "ddp"
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=cfg.optim.lr, betas=tuple(cfg.optim.betas),
                                  eps=cfg.optim.eps, weight_decay=cfg.optim.weight_decay, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=cfg.optim.schedule, warmup=cfg.optim.warmup_steps, total=cfg.run.steps))
    o = cfg.objective
    base_objective = partial(OBJECTIVES.get(o.name), clip_low=o.clip_low, clip_high=o.clip_high,
                             kl_estimator=o.kl_estimator, entropy_coef=o.entropy_coef, aggregation=o.aggregation,
                             dual_clip=o.dual_clip)
    beta = (AdaptiveKLController(o.kl_coef, o.kl_target, o.kl_horizon) if o.kl_target and o.kl_coef > 0
            else FixedKLController(o.kl_coef))
    terms = cfg.reward.terms
    state = checkpoint.TrainingState(model, optimizer, scheduler, gen, beta, critic, critic_optimizer)
    start, evals = checkpoint.restore(resume_from, state, run_dir) if resume_from else (0, [])   # last: sets RNGs
    for opt in (optimizer if o.update == "gradient" else None, critic_optimizer):   # TRPO: the optimizer is idle
        allocate_adam_state(opt)     # the moments now: one that does not fit fails here; less fragmented (heap.py)
    engine = make_engine(cfg)        # None: the native sampler
    if engine is not None and start:
        engine.sync_weights(model)   # resumed: the engine starts from the checkpoint's weights, not the base's
    collect = rollout_collector(cfg, demo, engine)
    metrics_log = open_metrics(cfg, run_dir, start=start, enabled=dist.is_main())
    samples_log = MetricsLog(run_dir / "samples.jsonl", "a" if start else "w", enabled=dist.is_main())

    def run_eval(step: int) -> dict:
        t = time.perf_counter()
        with full_params(policy):       # under torchrun: each rank evaluates a share, the results are combined
            ev = dist.evaluate_split(lambda examples: evaluate(
                model, tokenizer, examples, max_new_tokens=eval_tokens, autocast_dtype=amp, reference=reference,
                collect=collect, **prompt_kw), heldout)
        rec = {"step": step, "heldout_accuracy": ev["accuracy"], "heldout_response_length": ev["response_length"],
               "heldout_kl_to_ref": ev.get("kl_to_ref"), "time_eval": time.perf_counter() - t}
        if "tool_calls" in ev:
            rec["heldout_tool_calls"] = ev["tool_calls"]
        metrics_log.write({"kind": "eval", **rec})
        log.info("step %d: held-out accuracy %.3f (n=%d)", step, ev["accuracy"], ev["n"])
        return {**rec, "samples": ev["samples"]}

    # ------------------------------------------------------------------ loop
    evals = evals or [run_eval(0)]
    before = evals[0]
    show = cfg.run.progress if progress is None else progress
    bar = _progress(cfg.run.steps, show and dist.is_main(), start)
    stream = itertools.chain([first], _batches(stream, cfg.rollout.prompts_per_step))
    stream = itertools.islice(stream, start, None)          # resumed: the batches of steps 1..start were drawn
    step, interrupted = start, False
    deadline = time.perf_counter() + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    try:
        for step in range(start + 1, cfg.run.steps + 1):
            if deadline is not None and dist.any_rank(time.perf_counter() > deadline):   # all ranks stop together
                step -= 1
                log.info("run.time_limit_minutes reached after %d steps", step)
                break
            t0 = time.perf_counter()
            # 1. generate (under torchrun: this rank's share of the prompts; with tools, multi-turn episodes whose
            #    tool outputs sit in the response with response_mask 0)
            with full_params(policy):
                rollout = collect(model, tokenizer, dist.split_prompts(next(stream)),
                                  group_size=cfg.rollout.group_size, max_new_tokens=cfg.rollout.max_new_tokens,
                                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                                  autocast_dtype=amp, generator=gen, **prompt_kw)
            t1 = time.perf_counter()
            # 2. score
            rewards = dist.global_rewards(score(rollout.completions, rollout.examples, terms), terms)
            t2 = time.perf_counter()
            # 3. the policy's log-probs of the engine's tokens (pi_old) and the TIS weight of pi_old over the engine
            stage_stats = {}
            # one on-policy pass with the KL in the loss: the update's own forward gives pi_old and the TIS weight
            tis_in_update = (engine is not None and o.update == "gradient" and o.epochs == 1 and o.minibatches == 1
                             and not (o.kl_placement == "reward" and beta.value > 0))
            if engine is not None and not tis_in_update:
                logp_engine = rollout.logp_old
                logp_policy = batched_logprobs(model, rollout, **micro, temperature=cfg.rollout.temperature or 1.0,
                                               autocast_dtype=amp, pack_tokens=pack)
                rollout = rollout.with_(logp_old=logp_policy, is_weight=truncated_is_weight(
                    logp_policy, logp_engine, cap=cfg.rollout.tis_cap))
                stage_stats = {k: float(v) for k, v in mismatch_stats(logp_policy, logp_engine, rollout.response_mask,
                                                                      cap=cfg.rollout.tis_cap).items()}
            #    reference log-probs, when the objective uses them
            if beta.value > 0:
                rollout = rollout.with_(logp_ref=batched_logprobs(
                    reference, rollout, **micro,
                    temperature=cfg.rollout.temperature or 1.0, autocast_dtype=amp, pack_tokens=pack))
            # 4. reasoning steps and values V(s_t), when credit uses them
            if cfg.credit.steps != "none":
                rollout = rollout.with_(step_ids=step_ids_for_batch(
                    tokenizer, rollout.response_ids, rollout.response_mask, mode=cfg.credit.steps,
                    pattern=cfg.credit.step_pattern))
            step_scores = None
            if cfg.credit.step_reward:   # process rewards: a score per reasoning step
                texts = step_texts(tokenizer, rollout.response_ids, rollout.step_ids)
                step_scores, step_failures = score_steps(cfg.credit.step_reward, rollout.completions, texts,
                                                         rollout.examples, cfg.credit.step_reward_options)
                scored = step_scores[~step_scores.isnan()]
                stage_stats |= {"step_reward": float(scored.mean()) if scored.numel() else None,
                             "step_reward_failures": step_failures, "steps_scored": int(scored.numel())}
            if cfg.credit.values == "monte_carlo":
                with full_params(policy):
                    values, mc = monte_carlo_values(
                        model, tokenizer, rollout, rollout.step_ids, terms, samples=cfg.credit.mc_samples,
                        max_new_tokens=cfg.rollout.max_new_tokens, temperature=cfg.rollout.temperature,
                        top_p=cfg.rollout.top_p, autocast_dtype=amp, generator=gen)
                rollout = rollout.with_(values=values)
                stage_stats |= mc
            if critic is not None:
                rollout = rollout.with_(values=batched_values(critic, rollout, **micro, autocast_dtype=amp))
            t3 = time.perf_counter()
            # 5. credit (with the KL penalty as a per-token reward when it is placed in the reward), on the
            #    global batch under torchrun
            token_rewards = (kl_in_reward(rollout.logp_old, rollout.logp_ref, rollout.response_mask, beta.value)
                             if o.kl_placement == "reward" and beta.value > 0 else None)
            credit = dist.global_credit(estimator, CreditInputs(
                scores=rewards.total, response_mask=rollout.response_mask, group_ids=rollout.group_ids,
                token_rewards=token_rewards, values=rollout.values, step_ids=rollout.step_ids, step_scores=step_scores))
            # 6. update
            kl_in_loss = beta.value if o.kl_placement == "loss" else 0.0
            objective = partial(base_objective, kl_coef=kl_in_loss)
            if o.update == "trpo":
                upd = trpo_update(model, rollout, credit.advantages, max_kl=o.max_kl, cg_iters=o.cg_iters,
                                  cg_damping=o.cg_damping, rows=o.trpo_rows, temperature=cfg.rollout.temperature or 1.0,
                                  generator=gen)
                if critic is not None:
                    upd |= critic_update(critic, critic_optimizer, rollout, credit.returns, value_objective,
                                         **micro, max_len=cfg.rollout.max_new_tokens,
                                         max_grad_norm=cfg.optim.max_grad_norm, autocast_dtype=amp)
            else:
                upd = policy_update(policy, optimizer, rollout, credit.advantages, objective,
                                    epochs=o.epochs, minibatches=o.minibatches, **micro,
                                    max_grad_norm=cfg.optim.max_grad_norm, temperature=cfg.rollout.temperature or 1.0,
                                    autocast_dtype=amp, max_len=cfg.rollout.max_new_tokens, generator=gen,
                                    zero_advantage_is_zero_loss=kl_in_loss == 0 and o.entropy_coef == 0,
                                    critic=critic, critic_optimizer=critic_optimizer, returns=credit.returns,
                                    value_objective=value_objective, early_stop_kl=o.early_stop_kl, pack_tokens=pack,
                                    engine_tis_cap=cfg.rollout.tis_cap if tis_in_update else None)
            if critic is not None:
                upd["value_explained_variance"] = float(explained_variance(*map(dist.gather_rows, (
                    rollout.values, credit.returns, rollout.response_mask))))
            if o.update == "gradient":   # TRPO sets its own step size; the optimizer and its schedule are idle
                with warnings.catch_warnings():   # a step whose advantages were all 0 took no optimizer step;
                    warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
                    scheduler.step()              # the schedule counts training steps all the same
            if engine is not None:             # the engine samples from the updated policy from now on
                t_sync = time.perf_counter()
                engine.sync_weights(model)
                upd["time_weight_sync"] = time.perf_counter() - t_sync
            if rollout.logp_ref is not None:   # sampled k1 KL per sequence (logp_old: the sampler's), which beta steers
                kl_seq = dist.mean(float(((rollout.logp_old - rollout.logp_ref) * rollout.response_mask).sum(-1).mean()))
                upd.update(kl_sampled_per_seq=kl_seq, kl_beta=beta.value)
                beta.update(kl_seq, 1)
            t4 = time.perf_counter()
            # 7. log
            n_tokens = float(rollout.response_mask.sum())
            rec = {"kind": "train", "step": step, "reward": float(rewards.total.mean()),
                   **{f"reward/{k}": float(v.mean()) for k, v in rewards.components.items()},
                   "reward_failures": sum(rewards.failures.values()),
                   "response_length": n_tokens / len(rollout.completions),
                   "truncated_fraction": float(rollout.extras["truncated"].float().mean()),
                   **{k: float(rollout.extras[k].float().mean()) for k in ("tool_calls", "turns", "tool_errors")
                      if k in rollout.extras},
                   "lr": scheduler.get_last_lr()[0], **upd, **stage_stats,
                   "tokens_per_s": n_tokens / (t1 - t0), "time_rollout": t1 - t0, "time_reward": t2 - t1,
                   "time_ref_values": t3 - t2, "time_update": t4 - t3, "time_step": t4 - t0}
            rec = dist.reduce_metrics(rec, sums=SUMMED_METRICS, weights={"step_reward": "steps_scored"})
            metrics_log.write(rec)
            if cfg.run.samples_every and (step % cfg.run.samples_every == 0 or step == 1):
                for row in sample_records(step, rollout, credit.advantages, rewards, tokenizer):
                    samples_log.write(row)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{evals[-1]['heldout_accuracy']:.2f}")
            bar.update(1)
            if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < cfg.run.steps:
                evals.append(run_eval(step))
                if deadline is not None:     # the time limit counts training, not held-out evaluation
                    deadline += evals[-1]["time_eval"]
            if cfg.run.save_every and step % cfg.run.save_every == 0:
                checkpoint.save(run_dir, step, state, evals, keep=cfg.run.keep_checkpoints)
    except KeyboardInterrupt:
        interrupted = True
        log.warning("interrupted at step %d; checkpoints already written are intact", step)
    except BaseException:
        if engine is not None:
            engine.close()
        raise
    finally:
        bar.close()
    samples_log.close()
    if interrupted:
        metrics_log.close()
        if engine is not None:
            engine.close()
        return {"run_dir": str(run_dir), "interrupted": True, "step": step, "before": before, "evals": evals}

    # ------------------------------------------------------------------ finish
    after = run_eval(step)             # with rollout.engine=vllm the engine generates it too
    evals.append(after)
    if engine is not None:
        engine.close()
    final = save_checkpoint(model, tokenizer, run_dir / "final", config_yaml)
    metrics_log.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final), "steps": step,
               "before": {k: v for k, v in before.items() if k != "samples"},
               "after": {k: v for k, v in after.items() if k != "samples"},
               "samples_after": after["samples"]}
    if dist.is_main():
        (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _batches(stream, size: int):
    while True:
        batch = list(itertools.islice(stream, size))
        if not batch:
            return
        yield batch


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="rl steps", disable=not enabled, dynamic_ncols=True)
