"""The DPO recipe, top to bottom: pairs -> reference log-probs (once) -> epochs of preference-loss steps -> save.

Direct Preference Optimization (Rafailov et al. 2023) fits the policy to preference pairs with a classification
loss on the implicit reward beta * log(pi / pi_ref); its optimum is the optimum of KL-regularised RL under a
Bradley-Terry reward (eq. 4-7; `examples/dpo_equivalence.py` shows it on a small problem). The reference never
changes, so its log-probs of every pair are computed once before training and cached (RUN_DIR/ref_logps.pt).

With LoRA the reference is the same model with the adapter disabled (no second copy); with full fine-tuning it
is a frozen copy, freed once the cache is filled. The final checkpoint is a plain model (LoRA merged).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from functools import partial

import torch
import yaml

from llmrl.models import load_model, load_reference
from llmrl.models.lora import AdapterDisabledReference
from llmrl.preference.batch import collate_pairs, pair_logps
from llmrl.preference.common import (accumulate, apply_lora, batches, encode_all, pair_sets, progress_bar,
                                     start_run, task_of, total_steps)
from llmrl.preference.config import PreferenceTrainConfig
from llmrl.preference.losses import dpo_loss
from llmrl.train.evaluate import evaluate
from llmrl.runio.runs import save_checkpoint
from llmrl.train.schedules import lr_multiplier
from llmrl.runio.sinks import open_metrics

log = logging.getLogger("llmrl.preference")


@torch.no_grad()
def all_pair_logps(model, encoded, *, pad_id: int, micro_batch_size: int, autocast_dtype, per_token_mean: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) sequence log-probs of every pair under `model`, micro-batch by micro-batch."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for s in range(0, len(encoded), micro_batch_size):
        c, r = pair_logps(model, collate_pairs(encoded[s:s + micro_batch_size], pad_id),
                          autocast_dtype=autocast_dtype, per_token_mean=per_token_mean)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(reference, encoded, *, disable_adapter: bool, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_pair_logps` under the reference policy: a frozen model, or the LoRA model with its adapter off."""
    with reference.disable_adapter() if disable_adapter else contextlib.nullcontext():
        return all_pair_logps(reference, encoded, **kw)


def train_dpo(cfg: PreferenceTrainConfig, *, progress: bool | None = None) -> dict:
    """Run one DPO (or IPO / conservative DPO) job. Returns a summary: held-out pair and task metrics before/after."""
    # ------------------------------------------------------------------ setup
    run_dir, config_yaml, gen = start_run(cfg)
    p, o = cfg.preference, cfg.optim
    amp = torch.bfloat16 if cfg.model.autocast == "bfloat16" else None
    per_token_mean = p.per_token_mean if p.per_token_mean is not None else p.kind == "ipo"
    task = task_of(cfg)
    model, tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    model.config.use_cache = False

    # ------------------------------------------------------------------ pairs (sampled from the initial policy)
    train_pairs, heldout_pairs = pair_sets(cfg, task, model, tokenizer, run_dir, amp)
    context = getattr(model.config, "max_position_embeddings", None)
    train_enc = encode_all(cfg, tokenizer, train_pairs, context)
    heldout_enc = encode_all(cfg, tokenizer, heldout_pairs, context)
    n_train, n_held = len(train_enc), len(heldout_enc)

    # ------------------------------------------------------------------ policy and reference
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, "CAUSAL_LM")
        reference = model
    else:
        reference = load_reference(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    logp_kw = dict(pad_id=tokenizer.pad_token_id, micro_batch_size=o.micro_batch_size, autocast_dtype=amp,
                   per_token_mean=per_token_mean)

    # ------------------------------------------------------------------ reference log-probs, once
    t0 = time.perf_counter()
    ref_chosen, ref_rejected = reference_logps(reference, train_enc + heldout_enc,     # [n_train + n_held] each
                                               disable_adapter=cfg.lora is not None, **logp_kw)
    torch.save({"chosen": ref_chosen, "rejected": ref_rejected, "per_token_mean": per_token_mean,
                "n_train": n_train, "n_heldout": n_held}, run_dir / "ref_logps.pt")
    # The exact KL(policy || reference) of held-out answers is reported at evaluation: LoRA reads the reference
    # through the disabled adapter; full fine-tuning keeps the frozen copy for that only.
    eval_reference = AdapterDisabledReference(model) if cfg.lora is not None else reference
    del reference
    log.info("reference log-probs of %d pairs in %.1f s", n_train + n_held, time.perf_counter() - t0)

    # ------------------------------------------------------------------ optimizer, evaluation
    steps = total_steps(cfg, n_train)
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=o.schedule, warmup=o.warmup_steps, total=steps))
    loss_fn = partial(dpo_loss, beta=p.beta, label_smoothing=p.label_smoothing, kind=p.kind)
    metrics_log = open_metrics(cfg, run_dir)
    heldout_examples = task.heldout(cfg.task.heldout_size) if task is not None else []
    eval_tokens = cfg.run.eval_max_new_tokens or p.build_max_new_tokens

    def run_eval(step: int) -> dict:
        t = time.perf_counter()
        rec = {"kind": "eval", "step": step}
        if n_held:
            c, r = all_pair_logps(model, heldout_enc, **logp_kw)
            out = loss_fn(c, r, ref_chosen[n_train:], ref_rejected[n_train:])
            rec |= {f"heldout_{k}": float(v) for k, v in {**out.losses, **out.metrics}.items()}
        if heldout_examples:
            ev = evaluate(model, tokenizer, heldout_examples, max_new_tokens=eval_tokens, autocast_dtype=amp,
                          chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt,
                          reference=eval_reference)
            rec |= {"heldout_accuracy": ev["accuracy"], "heldout_response_length": ev["response_length"],
                    "heldout_kl_to_ref": ev.get("kl_to_ref")}
        rec["time_eval"] = time.perf_counter() - t
        metrics_log.write(rec)
        return rec

    def micro_loss(micro):
        batch = collate_pairs([train_enc[i] for i in micro.tolist()], tokenizer.pad_token_id)
        chosen, rejected = pair_logps(model, batch, autocast_dtype=amp, per_token_mean=per_token_mean)
        return loss_fn(chosen, rejected, ref_chosen[micro], ref_rejected[micro])

    # ------------------------------------------------------------------ loop
    before = run_eval(0)
    bar = progress_bar(steps, cfg.run.progress if progress is None else progress, f"{p.kind} steps")
    model.train()
    step = 0
    deadline = time.perf_counter() + 60 * cfg.run.time_limit_minutes if cfg.run.time_limit_minutes else None
    for step, (epoch, idx) in enumerate(itertools.islice(batches(n_train, p.batch_size, p.epochs, gen), steps), 1):
        if deadline is not None and time.perf_counter() > deadline:
            step -= 1
            log.info("run.time_limit_minutes reached after %d steps", step)
            break
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums = accumulate(idx, o.micro_batch_size, micro_loss)              # backward, micro-batch by micro-batch
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm))
        optimizer.step()
        scheduler.step()
        rec = {"kind": "train", "step": step, "epoch": epoch, **sums, "grad_norm": grad_norm,
               "lr": scheduler.get_last_lr()[0], "pairs": len(idx), "time_step": time.perf_counter() - t0}
        metrics_log.write(rec)
        bar.set_postfix(loss=f"{sums['loss_preference']:.3f}", acc=f"{sums['preference_accuracy']:.2f}")
        bar.update(1)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < steps:
            run_eval(step)
        if cfg.run.save_every and step % cfg.run.save_every == 0:
            save_checkpoint(_plain(model, copy=True), tokenizer, run_dir / "checkpoint-last", config_yaml)
    bar.close()

    # ------------------------------------------------------------------ finish
    after = run_eval(step)
    final = save_checkpoint(_plain(model, copy=False), tokenizer, run_dir / "final", config_yaml)
    metrics_log.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final), "steps": step, "train_pairs": n_train,
               "heldout_pairs": n_held, "before": before, "after": after}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary


def _plain(model, *, copy: bool):
    """A model transformers loads back as is: LoRA merged into the weights (into a copy mid-run)."""
    if not hasattr(model, "merge_and_unload"):
        return model
    if copy:
        import copy as _copy
        model = _copy.deepcopy(model)
    return model.merge_and_unload()
