"""Setup shared by the DPO and reward-model recipes: the run folder, the pairs, tokenising, LoRA."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from llmrl.data import make_task
from llmrl.preference.batch import Encoded, truncate_pair
from llmrl.preference.config import LoraConfig, PreferenceTrainConfig
from llmrl.runio.runs import start_run  # noqa: F401  (re-exported: every preference recipe starts with it)
from llmrl.preference.data import (PreferencePair, build_pairs_from_task, encode_pair, load_pairs, save_pairs,
                                   split_heldout)

log = logging.getLogger("llmrl.preference")


def task_of(cfg: PreferenceTrainConfig):
    t = cfg.task
    return None if t is None else make_task(t.name, seed=t.seed, options=t.options, train_path=t.train_path,
                                            heldout_path=t.heldout_path)


def pair_sets(cfg: PreferenceTrainConfig, task, sampler_model, tokenizer, run_dir: Path, amp
              ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs: read from preference.data_path, or sampled from the task with `sampler_model`
    (written to RUN_DIR/pairs.jsonl); held out from preference.heldout_path or split off by prompt."""
    p = cfg.preference
    if p.data_path is not None:
        pairs = load_pairs(p.data_path)
    else:
        pairs = build_pairs_from_task(
            sampler_model, tokenizer, task, p.build_prompts, samples_per_prompt=p.build_samples_per_prompt,
            pairs_per_prompt=p.build_pairs_per_prompt, temperature=p.build_temperature,
            max_new_tokens=p.build_max_new_tokens, seed=cfg.run.seed,
            chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt, autocast_dtype=amp,
            progress=cfg.run.progress)
        save_pairs(pairs, run_dir / "pairs.jsonl")
        log.info("built %d pairs from %d prompts of task %s", len(pairs), p.build_prompts, task.name)
    if p.heldout_path is not None:
        train, heldout = pairs, load_pairs(p.heldout_path)
    else:
        train, heldout = split_heldout(pairs, p.heldout_fraction, cfg.run.seed)
    if not train:
        raise ValueError("no training pairs" + (" (no sampled prompt had both a passing and a failing completion; "
                                                "sample more prompts or completions per prompt)"
                                                if p.data_path is None else ""))
    return train, heldout


def encode_all(cfg: PreferenceTrainConfig, tokenizer, pairs: list[PreferencePair], context: int | None
               ) -> list[Encoded]:
    """Tokenise pairs (`encode_pair`), cutting responses to fit preference.max_length or the model's context."""
    limit = cfg.preference.max_length or context
    out = []
    for pair in pairs:
        enc = encode_pair(tokenizer, pair, cfg.model.chat_template, system_prompt=cfg.model.system_prompt)
        out.append(truncate_pair(enc, limit) if limit else enc)
    return out


def apply_lora(model, lora: LoraConfig, task_type: str):
    """Wrap `model` in a peft LoRA adapter (B = 0 at the start, so the wrapped model equals the base)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, task_type=task_type,
        target_modules=lora.target_modules if lora.target_modules is not None else "all-linear"))


def total_steps(cfg: PreferenceTrainConfig, n_train: int) -> int:
    """Optimizer steps: epochs * ceil(pairs / batch_size), capped at run.steps when that is > 0."""
    steps = cfg.preference.epochs * math.ceil(n_train / cfg.preference.batch_size)
    return min(steps, cfg.run.steps) if cfg.run.steps else steps


def batches(n: int, batch_size: int, epochs: int, generator: torch.Generator):
    """(epoch, indices [b]) of shuffled batches: each epoch is a fresh permutation of the n pairs."""
    for epoch in range(epochs):
        for idx in torch.randperm(n, generator=generator).split(batch_size):
            yield epoch, idx


def accumulate(idx: torch.Tensor, micro_batch_size: int, loss_of) -> dict[str, float]:
    """Backward through the mean loss over the pairs `idx` [b], micro-batch by micro-batch: each micro-batch's mean
    is weighted by its share of the batch, so the gradient does not depend on micro_batch_size. `loss_of(micro)`
    returns a PreferenceOutput. Returns the batch means of its losses and metrics."""
    sums: dict[str, float] = {}
    for micro in idx.split(micro_batch_size):
        weight = len(micro) / len(idx)
        out = loss_of(micro)
        (out.total * weight).backward()
        for k, v in {**out.losses, **out.metrics}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach()) * weight
    return sums


def progress_bar(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True)
