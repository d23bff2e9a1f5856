"""The reward-model recipe, top to bottom: pairs -> Bradley-Terry steps on a scalar-head model -> save.

A Bradley-Terry reward model (Bradley & Terry 1952; Stiennon et al. 2020; Ouyang et al. 2022, eq. 1) is the causal
LM's backbone with a linear head giving one number r(x, y), trained so that sigma(r(x, y_w) - r(x, y_l)) is the
probability that y_w is preferred. It is `AutoModelForSequenceClassification` with num_labels=1, started from the
causal LM's weights (the head is new), saved with save_pretrained so `load_reward_model` (or transformers) reads it.

The reward is read at the last token of prompt + response + EOS (sequences are left-padded, so that is the last
column). transformers' own pooling picks the last token that is not the pad token, which is the token *before*
EOS when pad == EOS (as in SmolLM2), so score with `reward_model_scores`, which the training used.
"""

from __future__ import annotations

import itertools
import logging
import time
from functools import partial

import torch
import yaml
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from llmrl.models import load_model, resolve_model_path
from llmrl.models.loading import _fix_tokenizer
from llmrl.preference.common import (accumulate, apply_lora, batches, encode_all, pair_sets, progress_bar,
                                     start_run, task_of, total_steps)
from llmrl.preference.config import PreferenceTrainConfig
from llmrl.preference.data import encode_any_prompt, encode_response
from llmrl.preference.losses import bradley_terry_loss
from llmrl.rollout.sampler import left_pad
from llmrl.runio.runs import save_checkpoint
from llmrl.train.schedules import lr_multiplier
from llmrl.runio.sinks import open_metrics

log = logging.getLogger("llmrl.preference")


def load_reward_model(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a scalar-head sequence classifier from a reward-model checkpoint or, to start training,
    from a causal LM (its head is then newly initialised). Never downloads."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, local_files_only=True)
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), name_or_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # [n, L] left-padded
                     *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """r(x, y) [n]: the scalar head applied to the hidden state of the last token of each row."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model     # under a LoRA wrapper
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=positions).last_hidden_state[:, -1]    # [n, H]
        return inner.score(hidden).float()[:, 0]


def pair_rewards(model, encoded, pad_id: int, *, autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w) [P], r(x, y_l) [P]) of P tokenised pairs, in one forward pass of 2P rows."""
    seqs = [p + c for p, c, _ in encoded] + [p + r for p, _, r in encoded]
    ids, mask = left_pad(seqs, pad_id)
    rewards = sequence_rewards(model, ids, mask, autocast_dtype=autocast_dtype)         # [2P]
    return rewards[:len(encoded)], rewards[len(encoded):]


@torch.no_grad()
def reward_model_scores(model, tokenizer, prompts: list, completions: list[str], *, chat_template: bool = True,
                        system_prompt: str | None = None, batch_size: int = 16,
                        autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """r(prompt, completion) [N] for N (prompt, completion) pairs; prompts are text or chat messages."""
    if len(prompts) != len(completions):
        raise ValueError(f"reward_model_scores: {len(prompts)} prompts but {len(completions)} completions")
    was_training = model.training
    model.eval()
    seqs = [encode_any_prompt(tokenizer, p, chat_template, system_prompt=system_prompt) + encode_response(tokenizer, c)
            for p, c in zip(prompts, completions)]
    out = [sequence_rewards(model, *left_pad(seqs[s:s + batch_size], tokenizer.pad_token_id),
                            autocast_dtype=autocast_dtype) for s in range(0, len(seqs), batch_size)]
    model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0)


def train_rm(cfg: PreferenceTrainConfig, *, progress: bool | None = None) -> dict:
    """Train a Bradley-Terry reward model on the config's pairs. Returns a summary with held-out pair accuracy."""
    # ------------------------------------------------------------------ setup and pairs
    run_dir, config_yaml, gen = start_run(cfg)
    p, o = cfg.preference, cfg.optim
    amp = torch.bfloat16 if cfg.model.autocast == "bfloat16" else None
    task = task_of(cfg)
    sampler = load_model(cfg.model.name)[0] if p.data_path is None else None      # only to build pairs from a task
    model, tokenizer = load_reward_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    train_pairs, heldout_pairs = pair_sets(cfg, task, sampler, tokenizer, run_dir, amp)
    del sampler
    context = getattr(model.config, "max_position_embeddings", None)
    train_enc = encode_all(cfg, tokenizer, train_pairs, context)
    heldout_enc = encode_all(cfg, tokenizer, heldout_pairs, context)

    # ------------------------------------------------------------------ model, optimizer
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.lora is not None:
        model = apply_lora(model, cfg.lora, "SEQ_CLS")        # peft also trains the new head in full
    steps = total_steps(cfg, len(train_enc))
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=o.schedule, warmup=o.warmup_steps, total=steps))
    metrics_log = open_metrics(cfg, run_dir)

    @torch.no_grad()
    def run_eval(step: int) -> dict:
        rec = {"kind": "eval", "step": step}
        if heldout_enc:
            model.eval()
            parts = [pair_rewards(model, heldout_enc[s:s + o.micro_batch_size], tokenizer.pad_token_id,
                                  autocast_dtype=amp) for s in range(0, len(heldout_enc), o.micro_batch_size)]
            out = bradley_terry_loss(torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts]))
            rec |= {f"heldout_{k}": float(v) for k, v in {**out.losses, **out.metrics}.items()}
            model.train()
        metrics_log.write(rec)
        return rec

    def micro_loss(micro):
        chosen, rejected = pair_rewards(model, [train_enc[i] for i in micro.tolist()], tokenizer.pad_token_id,
                                        autocast_dtype=amp)
        return bradley_terry_loss(chosen, rejected)

    # ------------------------------------------------------------------ loop
    before = run_eval(0)
    bar = progress_bar(steps, cfg.run.progress if progress is None else progress, "reward-model steps")
    model.train()
    step = 0
    for step, (epoch, idx) in enumerate(itertools.islice(batches(len(train_enc), p.batch_size, p.epochs, gen),
                                                         steps), 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        sums = accumulate(idx, o.micro_batch_size, micro_loss)              # backward, micro-batch by micro-batch
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm))
        optimizer.step()
        scheduler.step()
        metrics_log.write({"kind": "train", "step": step, "epoch": epoch, **sums, "grad_norm": grad_norm,
                           "lr": scheduler.get_last_lr()[0], "pairs": len(idx), "time_step": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{sums['loss_preference']:.3f}", acc=f"{sums['preference_accuracy']:.2f}")
        bar.update(1)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < steps:
            run_eval(step)
    bar.close()

    # ------------------------------------------------------------------ finish
    after = run_eval(step)
    model = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    final = save_checkpoint(model, tokenizer, run_dir / "final", config_yaml)
    metrics_log.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final), "steps": step, "train_pairs": len(train_enc),
               "heldout_pairs": len(heldout_enc), "before": before, "after": after}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary
