"""The RL recipe in three parts: `build` (train/build.py: everything chosen once from the config), `rl_step` (one
step, top to bottom: generate -> score -> what credit reads -> credit -> update -> log) and `finish` (the last
evaluation, the final checkpoint, the summary). `train` runs them, with held-out evaluations, checkpoints and the
time limit in between.

It calls the math in `credit/` and `objectives/`; it never re-implements it. Every piece is chosen by name from the
config (see `llmrl presets` for the named compositions). Under torchrun each rank runs this same recipe on its
share of the prompts; the `dist.*` and `full_params` calls make its statistics global and are the identity in one
process (`distributed/`).

With `rollout.engine=vllm` a vLLM engine in this process generates; the policy's own log-probs of the sampled
tokens are pi_old of the PPO ratio, each token's policy-gradient term is weighted by the truncated importance
weight min(pi_old / mu, C) of the policy over the engine (`objectives/mismatch.py`), and after each update the new
weights are pushed into the engine in memory.
"""

from __future__ import annotations

import logging
import time

import yaml

from llmrl.config import TrainConfig
from llmrl.credit import CreditInputs
from llmrl.distributed import runtime as dist
from llmrl.distributed.parallel import full_params
from llmrl.objectives.kl import kl_in_reward
from llmrl.runio import checkpoint
from llmrl.runio.metrics import sample_records
from llmrl.runio.runs import save_checkpoint
from llmrl.train.build import Recipe, build
from llmrl.train.evaluate import collapse_stats, evaluate
from llmrl.train.teacher import token_rewards

log = logging.getLogger("llmrl.train")

# metrics that add up over ranks under torchrun (the others are per-row means, averaged; time_* the slowest rank's)
SUMMED_METRICS = ("reward_failures", "update_rows", "tokens_per_s", "step_reward_failures", "steps_scored",
                  "mc_boundaries", "mc_continuations")


def train(cfg: TrainConfig, *, progress: bool | None = None) -> dict:
    """Run one RL training job described by `cfg`. Returns a summary with held-out accuracy before and after."""
    r = build(cfg)
    try:
        step, interrupted = _loop(r, cfg.run.progress if progress is None else progress)
    except BaseException:
        if r.engine is not None:
            r.engine.close()
        raise
    r.samples_log.close()
    if interrupted:
        r.metrics_log.close()
        r.heldout_log.close()
        if r.engine is not None:
            r.engine.close()
        return {"run_dir": str(r.run_dir), "interrupted": True, "step": step, "before": r.evals[0], "evals": r.evals}
    return finish(r, step)


def rl_step(r: Recipe, prompts: list, step: int) -> dict:
    """One RL step on a batch of prompts; returns its metrics record (written by the caller)."""
    o = r.cfg.objective
    t0 = time.perf_counter()
    # 1-2. generate and score (under torchrun: this rank's share of the prompts; with tools, multi-turn episodes
    #    whose tool outputs sit in the response with response_mask 0), as rollout.sampling draws the batch
    sampled = r.sample(r, prompts)
    rollout, rewards = sampled.rollout, sampled.rewards
    t2 = time.perf_counter()
    # 3. what credit reads beyond the scores: pi_old and the TIS weight, reference log-probs, steps, step scores,
    #    values (the stages this config needs: train/stages.py)
    stage_stats = {}
    for stage in r.stages:
        rollout, stats = stage(r, rollout)
        stage_stats |= stats
    t3 = time.perf_counter()
    # 4. credit (with the KL penalty as a per-token reward when it is placed in the reward), on the global batch
    kl_reward = o.kl_placement == "reward" and r.beta.value > 0
    credit = dist.global_credit(r.estimator, CreditInputs(
        scores=rewards.total.to(r.ex.device), response_mask=rollout.response_mask, group_ids=rollout.group_ids,
        token_rewards=token_rewards(rollout, kl_in_reward(rollout.logp_old, rollout.logp_ref, rollout.response_mask,
                                                          r.beta.value) if kl_reward else None),
        values=rollout.values, step_ids=rollout.step_ids, step_scores=rollout.step_scores))
    # 5. update (the rule objective.update names: train/rules.py), then the engine takes the new weights
    upd = r.update(r, rollout, credit)
    if r.engine is not None:
        t_sync = time.perf_counter()
        r.engine.sync_weights(r.model)
        upd["time_weight_sync"] = time.perf_counter() - t_sync
    if rollout.logp_ref is not None:   # sampled k1 KL per sequence (logp_old: the sampler's), which beta steers
        kl_seq = dist.mean(float(((rollout.logp_old - rollout.logp_ref) * rollout.response_mask).sum(-1).mean()))
        upd.update(kl_sampled_per_seq=kl_seq, kl_beta=r.beta.value)
        r.beta.update(kl_seq, 1)
    t4 = time.perf_counter()
    # 6. log
    n_tokens = float(rollout.response_mask.sum())
    rec = {"kind": "train", "step": step, "reward": float(rewards.total.mean()),
           **{f"reward/{k}": float(v.mean()) for k, v in rewards.components.items()},
           "reward_failures": sum(rewards.failures.values()),
           "response_length": n_tokens / len(rollout.completions),
           "truncated_fraction": float(rollout.extras["truncated"].float().mean()),
           **{k: float(rollout.extras[k].float().mean()) for k in ("tool_calls", "turns", "tool_errors")
              if k in rollout.extras},
           "lr": r.scheduler.get_last_lr()[0], **upd, **stage_stats, **sampled.stats,
           "tokens_per_s": n_tokens / sampled.time_rollout, "time_rollout": sampled.time_rollout,
           "time_reward": sampled.time_reward,
           "time_ref_values": t3 - t2, "time_update": t4 - t3, "time_step": t4 - t0}
    rec = dist.reduce_metrics(rec, sums=SUMMED_METRICS, weights={"step_reward": "steps_scored"})
    if r.cfg.run.samples_every and (step % r.cfg.run.samples_every == 0 or step == 1):
        for row in sample_records(step, rollout, credit.advantages, rewards, r.tokenizer):
            r.samples_log.write(row)
    return rec


def run_eval(r: Recipe, step: int) -> dict:
    """Greedy accuracy on the held-out examples (and the exact KL to the reference), logged; with the samples."""
    t = time.perf_counter()
    with full_params(r.policy):       # under torchrun: each rank evaluates a share, the results are combined
        ev = dist.evaluate_split(lambda examples: evaluate(
            r.model, r.tokenizer, examples, max_new_tokens=r.eval_tokens, autocast_dtype=r.ex.autocast_dtype,
            reference=r.reference, collect=r.collect, **r.prompt_kw), r.heldout)
    rec = {"step": step, "heldout_accuracy": ev["accuracy"], "heldout_exact": ev["exact"],
           "heldout_response_length": ev["response_length"],
           "heldout_kl_to_ref": ev.get("kl_to_ref"),
           **{f"heldout_{k}": v for k, v in collapse_stats(ev).items()}, "time_eval": time.perf_counter() - t}
    if "tool_calls" in ev:
        rec["heldout_tool_calls"] = ev["tool_calls"]
    r.metrics_log.write({"kind": "eval", **rec})
    for row in ev["samples"]:       # the first held-out answers of each evaluation, for `llmrl studio`
        r.heldout_log.write({"step": step, **row})
    log.info("step %d: held-out accuracy %.3f (n=%d)", step, ev["accuracy"], ev["n"])
    return {**rec, "samples": ev["samples"]}


def _loop(r: Recipe, show: bool) -> tuple[int, bool]:
    """Steps start+1 .. run.steps with evaluations and checkpoints between them; stops early at the time limit
    (every rank together) or on Ctrl-C. Returns (the last step taken, interrupted)."""
    cfg = r.cfg.run
    r.evals = r.evals or [run_eval(r, 0)]
    bar = _progress(cfg.steps, show and dist.is_main(), r.start)
    step = r.start
    deadline = time.perf_counter() + 60 * cfg.time_limit_minutes if cfg.time_limit_minutes else None
    try:
        for step in range(r.start + 1, cfg.steps + 1):
            if deadline is not None and dist.any_rank(time.perf_counter() > deadline):
                step -= 1
                log.info("run.time_limit_minutes reached after %d steps", step)
                break
            rec = rl_step(r, next(r.batches), step)
            r.metrics_log.write(rec)
            bar.set_postfix(reward=f"{rec['reward']:.3f}", acc=f"{r.evals[-1]['heldout_accuracy']:.2f}")
            bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                r.evals.append(run_eval(r, step))
                if deadline is not None:     # the time limit counts training, not held-out evaluation
                    deadline += r.evals[-1]["time_eval"]
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint.save(r.run_dir, step, r.state, r.evals, keep=cfg.keep_checkpoints)
    except KeyboardInterrupt:
        log.warning("interrupted at step %d; checkpoints already written are intact", step)
        return step, True
    finally:
        bar.close()
    return step, False


def finish(r: Recipe, step: int) -> dict:
    """The last held-out evaluation (with rollout.engine=vllm the engine generates it too), the final checkpoint
    and summary.yaml."""
    after = run_eval(r, step)
    r.evals.append(after)
    if r.engine is not None:
        r.engine.close()
    final = save_checkpoint(r.model, r.tokenizer, r.run_dir / "final", r.config_yaml)
    r.metrics_log.close()
    r.heldout_log.close()
    before = r.evals[0]
    summary = {"run_dir": str(r.run_dir), "checkpoint": str(final), "steps": step,
               "before": {k: v for k, v in before.items() if k != "samples"},
               "after": {k: v for k, v in after.items() if k != "samples"},
               "samples_after": after["samples"]}
    if dist.is_main():
        (r.run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _progress(total: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="rl steps", disable=not enabled, dynamic_ncols=True)
