"""The process-reward-model recipe, top to bottom: step labels -> BCE at each step's last token -> save.

A process reward model (PRM) gives P(step s is good | question, steps 1..s) for every reasoning step (Uesato et al.
2022; Lightman et al. 2023, "Let's Verify Step by Step", sec. 2.6: read at the last token of each step). Here it is
the causal LM's backbone with a new linear head giving one logit per token (`AutoModelForTokenClassification`,
num_labels=1, no dropout; `LlamaForTokenClassification` for Llama), trained with binary cross-entropy at each
step's LAST token (the token before the next step starts); every other token is ignored. Data, one JSON a line:

    {"prompt": "What is 12 + 34?", "steps": ["12 + 34 = 46\\n\\n", "Answer: 46"], "labels": [1, 0.75]}

Steps are consecutive pieces of the response, separators included ("".join(steps) is the response), each tokenised
on its own (in training and in `prm_step_scores` alike); a label is 0, 1 or a probability. Labels without raters
(Wang et al. 2024, Math-Shepherd, sec. 3.3): from each step's end sample completions of a verifiable task; the label
is the fraction that reach the right answer ("soft", SE) or whether any does ("hard", HE): `build_step_labels`.
CLI: `llmrl prm CONFIG`, `llmrl prm-data ...`; in RL: the `prm` step reward (`llmrl.rewards.process`).
"""

from __future__ import annotations

import copy
import itertools
import json
import math
import time
from dataclasses import dataclass, fields, replace
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
import yaml
from transformers import AutoConfig, AutoModelForTokenClassification, AutoTokenizer

from llmrl.config import (ConfigError, ModelConfig, OptimConfig, RunConfig, TaskConfig, _convert, _default,
                          _parse_override, _read_yaml, config_to_dict, f)
from llmrl.credit.steps import MODES, step_boundaries, step_ids_for_batch
from llmrl.models import load_model, resolve_model_path
from llmrl.models.loading import _fix_tokenizer
from llmrl.preference.common import apply_lora, batches, progress_bar, task_of
from llmrl.preference.config import LoraConfig
from llmrl.preference.data import encode_any_prompt, split_heldout
from llmrl.rewards import score
from llmrl.rewards.process import step_texts
from llmrl.rollout.branch import monte_carlo_values
from llmrl.rollout.collect import collect_rollout
from llmrl.runio.runs import save_checkpoint, start_run
from llmrl.train.schedules import lr_multiplier
from llmrl.runio.sinks import open_metrics


# ----------------------------------------------------------------------------- config

@dataclass
class PrmConfig:
    data_path: str | None = f(None, "JSONL of {prompt, steps, labels} (null = build step labels from `task`)")
    heldout_path: str | None = f(None, "JSONL of held-out step labels (null = hold out heldout_fraction of prompts)")
    heldout_fraction: float = f(0.1, "fraction of prompts held out when heldout_path is null", ge=0, lt=1)
    build_prompts: int = f(64, "building from a task: prompts to sample", ge=1)
    build_samples_per_prompt: int = f(4, "building from a task: responses sampled per prompt", ge=1)
    build_mc_samples: int = f(8, "building from a task: completions sampled from each step's end", ge=1)
    build_temperature: float = f(1.0, "building from a task: sampling temperature", gt=0)
    build_max_new_tokens: int = f(64, "building from a task: maximum tokens per response", ge=1)
    steps: str = f("blank_line", "building from a task: step segmenter", choices=MODES)
    step_pattern: str | None = f(None, "building from a task: regex that starts a step, with steps: regex")
    labels: str = f("soft", "building: soft (the completion rate) | hard (1 if any completion is right)",
                    choices=("soft", "hard"))
    epochs: int = f(1, "passes over the training responses (run.steps > 0 caps the optimizer steps)", ge=1)
    batch_size: int = f(16, "responses per optimizer step (micro-batches of optim.micro_batch_size)", ge=1)
    max_length: int | None = f(None, "prompt + response tokens; steps past it are cut (null = model context)", ge=2)


@dataclass
class PrmTrainConfig:
    model: ModelConfig = f(ModelConfig(), "the causal LM the PRM starts from (and that samples, when building)")
    task: TaskConfig | None = f(None, "task to build step labels from (null = prm.data_path)")
    prm: PrmConfig = f(PrmConfig(), "step labels and training")
    lora: LoraConfig | None = f(None, "LoRA adapter (null = full fine-tuning; the head is always trained in full)")
    optim: OptimConfig = f(OptimConfig(lr=1e-5, micro_batch_size=8), "optimizer (micro_batch_size counts responses)")
    run: RunConfig = f(RunConfig(name="prm", steps=0, eval_every=0), "run bookkeeping (steps: cap, 0 = none)")


def _put(merged: dict, keys: tuple, value) -> None:
    """Set one dotted key; a section given a mapping sets each key it names, keeping the others."""
    if len(keys) == 1 and isinstance(value, Mapping):
        merged[keys[0]] = merged[keys[0]] if isinstance(merged.get(keys[0]), dict) else {}
        for k, v in value.items():
            _put(merged, (keys[0], k), v)
        return
    for part in keys[:-1]:                                          # e.g. task.options.digits=3
        merged[part] = merged[part] if isinstance(merged.get(part), dict) else {}
        merged = merged[part]
    merged[keys[-1]] = copy.deepcopy(value)


def load_prm_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> PrmTrainConfig:
    """Defaults <- YAML file <- `section.key=value` overrides, validated like `load_preference_config`: a section
    changes only the keys it names, `task=null` / `lora=null` clears one, every error names the dotted key."""
    merged: dict[str, Any] = {}
    file_data = _read_yaml(Path(path)) if path is not None else {}
    for keys, value in [((k,), v) for k, v in file_data.items()] + [_parse_override(o) for o in overrides]:
        _put(merged, keys, value)
    defaults = {fd.name: _default(fd) for fd in fields(PrmTrainConfig)}
    full = {k: (config_to_dict(defaults.get(k)) or {}) | v if isinstance(v, Mapping) else v for k, v in merged.items()}
    cfg = _convert(full, PrmTrainConfig, "")
    if cfg.prm.data_path is None and cfg.task is None:
        raise ConfigError("prm.data_path is required unless `task` names a task to build step labels from")
    if cfg.task is not None and cfg.task.name == "jsonl" and not cfg.task.train_path:
        raise ConfigError("task.train_path is required when task.name is 'jsonl'")
    if cfg.prm.steps == "regex" and not cfg.prm.step_pattern:
        raise ConfigError("prm.steps=regex needs prm.step_pattern")
    if cfg.run.resume == "must":
        raise ConfigError("run.resume=must: only `llmrl train` runs resume; prm runs start over")
    return cfg


# ----------------------------------------------------------------------------- step-labelled data

def _check_row(row, where: str) -> dict:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: each line must be a JSON object with prompt, steps, labels")
    for key in ("prompt", "steps", "labels"):
        if key not in row:
            raise ValueError(f"{where}: missing key {key!r} (need prompt, steps, labels)")
    steps, labels = row["steps"], row["labels"]
    if not isinstance(row["prompt"], str):
        raise ValueError(f"{where}: 'prompt' must be a string, got {type(row['prompt']).__name__}")
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise ValueError(f"{where}: 'steps' must be a non-empty list of non-empty strings")
    if not isinstance(labels, list) or len(labels) != len(steps):
        n = len(labels) if isinstance(labels, list) else type(labels).__name__
        raise ValueError(f"{where}: 'steps' and 'labels' lengths differ ({len(steps)} steps, labels: {n})")
    for i, y in enumerate(labels):
        if isinstance(y, bool) or not isinstance(y, (int, float)) or not 0 <= y <= 1:
            raise ValueError(f"{where}: labels[{i}] must be 0, 1 or a probability in [0, 1], got {y!r}")
    return row


def load_step_labels(path: str | Path) -> list[dict]:
    """Step-labelled responses from a JSONL file (format in the module docstring); every error names file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"step labels: no such file: {path}")
    rows = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(_check_row(json.loads(line), f"{path}:{lineno}"))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ValueError(f"step labels: {path} is empty (no JSON lines)")
    return rows


def save_step_labels(rows: list[dict], path: str | Path) -> Path:
    """Write step-labelled responses as JSONL (`load_step_labels` reads them back equal)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            first = {k: row[k] for k in ("prompt", "steps", "labels")}
            fh.write(json.dumps(first | row) + "\n")
    return path


@torch.no_grad()
def build_step_labels(model, tokenizer, task, n_prompts: int, *, samples_per_prompt: int = 4, mc_samples: int = 8,
                      segmenter: str = "blank_line", pattern: str | None = None, labels: str = "soft",
                      temperature: float = 1.0, max_new_tokens: int = 64, seed: int = 0, batch_prompts: int = 8,
                      reward_terms: Sequence = (("correct", 1.0, {}),), chat_template: bool = True,
                      system_prompt: str | None = None, autocast_dtype: torch.dtype | None = None,
                      progress: bool = False) -> list[dict]:
    """Math-Shepherd labels: sample `samples_per_prompt` responses to each of `n_prompts` training prompts, segment
    them (`step_ids_for_batch`), and estimate each step prefix's completion rate with `monte_carlo_values` (mean
    reward of `mc_samples` completions). It gives V(before step s) at step s's first token, so the rate AFTER step
    s is V(before step s+1), and after the last step the response's own score. label = rate ("soft") or rate > 0
    ("hard"); `reward_terms` must score in [0, 1]. A step whose text is empty (only special tokens, e.g. EOS after
    a blank line) is dropped. `progress`: a bar over the prompts with the mean outcome reward so far."""
    if labels not in ("soft", "hard"):
        raise ValueError(f"labels={labels!r}; valid: 'soft', 'hard'")
    generator = torch.Generator().manual_seed(seed)
    examples, terms, rows = list(itertools.islice(task.train_stream(seed), n_prompts)), list(reward_terms), []
    bar, outcomes = progress_bar(len(examples), progress, "labelling steps"), []
    for start in range(0, len(examples), batch_prompts):
        r = collect_rollout(model, tokenizer, examples[start:start + batch_prompts], group_size=samples_per_prompt,
                            max_new_tokens=max_new_tokens, temperature=temperature, chat_template=chat_template,
                            system_prompt=system_prompt, autocast_dtype=autocast_dtype, generator=generator)
        step_ids = step_ids_for_batch(tokenizer, r.response_ids, r.response_mask, mode=segmenter, pattern=pattern)
        outcome = score(r.completions, r.examples, terms).total                                        # [N]
        values, _ = monte_carlo_values(model, tokenizer, r, step_boundaries(step_ids),                  # [N, T]
                                       lambda texts, exs: score(texts, exs, terms).total, samples=mc_samples,
                                       max_new_tokens=max_new_tokens, temperature=temperature,
                                       autocast_dtype=autocast_dtype, generator=generator)
        for i, (texts, starts) in enumerate(zip(step_texts(tokenizer, r.response_ids, step_ids),
                                                step_boundaries(step_ids))):
            rates = [float(values[i, t]) for t in starts[1:]] + [float(outcome[i])] if starts else []
            kept = [(text, rate) for text, rate in zip(texts, rates) if text]
            if kept:
                ex = r.examples[i]
                rows.append({"prompt": ex.prompt, "steps": [t for t, _ in kept],
                             "labels": [rate if labels == "soft" else float(rate > 0) for _, rate in kept],
                             "completion_rates": [rate for _, rate in kept], "answer": ex.answer})
        outcomes += outcome.tolist()
        bar.set_postfix(reward=f"{sum(outcomes) / len(outcomes):.3f}", responses=len(rows))
        bar.update(len(r.examples) // samples_per_prompt)
    bar.close()
    return rows


def split_by_prompt(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, held-out) as `split_heldout` splits pairs: a random `fraction` of the prompts is held out whole."""
    train, held = split_heldout([SimpleNamespace(prompt=r["prompt"], row=r) for r in rows], fraction, seed)
    return [x.row for x in train], [x.row for x in held]


# ----------------------------------------------------------------------------- the model

def load_prm(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a one-logit token classifier from a PRM checkpoint or, to start training, from a causal
    LM (its head is then newly initialised). No dropout before the head. Never downloads."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, num_labels=1, local_files_only=True)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), name_or_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def encode_steps(tokenizer, prompt, steps: list[str], *, chat_template: bool = True,
                 system_prompt: str | None = None) -> tuple[list[int], list[int]]:
    """(prompt + step token ids, index of each step's last token; -1 for a step with no tokens)."""
    ids = encode_any_prompt(tokenizer, prompt, chat_template, system_prompt=system_prompt)
    ends = []
    for text in steps:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids += piece
        ends.append(len(ids) - 1 if piece else -1)
    return ids, ends


def step_logits(model, rows: list[tuple[list[int], list[int]]], pad_id: int, *,
                autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """rows: (token ids, step ends) -> per row, the logit of "good" at each step end [S_i] (NaN where the end is -1).
    Rows are right-padded: a causal model's logits at real tokens do not depend on the padding after them."""
    device = next(model.parameters()).device
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r, _ in rows], batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r, _ in rows], batch_first=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits  # [n, L, 1]
    logits = logits.float()[..., 0]                                                                      # [n, L]
    out = []
    for i, (_, ends) in enumerate(rows):
        e = torch.tensor(ends, dtype=torch.long, device=device)
        out.append(torch.where(e >= 0, logits[i, e.clamp(min=0)], float("nan")))
    return out


@torch.no_grad()
def prm_step_scores(model, tokenizer, prompts: list, step_texts: list[list[str]], *, chat_template: bool = True,
                    system_prompt: str | None = None, batch_size: int = 16,
                    autocast_dtype: torch.dtype | None = None) -> list[list[float]]:
    """P(good) = sigmoid(logit at the step's last token) for each step of each (prompt, steps); NaN for an empty
    step. Prompts are text or chat messages, encoded as in training."""
    if len(prompts) != len(step_texts):
        raise ValueError(f"prm_step_scores: {len(prompts)} prompts but {len(step_texts)} step lists")
    was_training = model.training
    model.eval()
    rows = [encode_steps(tokenizer, p, s, chat_template=chat_template, system_prompt=system_prompt)
            for p, s in zip(prompts, step_texts)]
    out = [torch.sigmoid(x).tolist() for s in range(0, len(rows), batch_size)
           for x in step_logits(model, rows[s:s + batch_size], tokenizer.pad_token_id, autocast_dtype=autocast_dtype)]
    model.train(was_training)
    return out


def step_metrics(logits: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:   # [K], [K]
    """Mean BCE; step accuracy at threshold 0.5 (predicted good: P >= 0.5; good: label >= 0.5); the share of good
    steps (always answering the majority class scores max(share, 1 - share)); the mean P on good and on bad steps."""
    p, good = torch.sigmoid(logits), labels >= 0.5
    mean = lambda x: float(x.mean()) if x.numel() else float("nan")  # noqa: E731
    return {"loss_bce": float(F.binary_cross_entropy_with_logits(logits, labels)),
            "step_accuracy": mean(((p >= 0.5) == good).float()), "good_fraction": mean(good.float()),
            "p_good_steps": mean(p[good]), "p_bad_steps": mean(p[~good])}


# ----------------------------------------------------------------------------- the recipe

def train_prm(cfg: PrmTrainConfig, *, progress: bool | None = None) -> dict:
    """Train a process reward model. Returns a summary with held-out step accuracy before and after."""
    # ------------------------------------------------------------------ setup and step labels
    run_dir, config_yaml, gen = start_run(cfg)
    p, o = cfg.prm, cfg.optim
    amp = torch.bfloat16 if cfg.model.autocast == "bfloat16" else None
    model, tokenizer = load_prm(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
    if p.data_path is not None:
        rows = load_step_labels(p.data_path)
    else:
        rows = build_step_labels(load_model(cfg.model.name)[0], tokenizer, task_of(cfg), p.build_prompts,
                                 samples_per_prompt=p.build_samples_per_prompt, mc_samples=p.build_mc_samples,
                                 segmenter=p.steps, pattern=p.step_pattern, labels=p.labels,
                                 temperature=p.build_temperature, max_new_tokens=p.build_max_new_tokens,
                                 seed=cfg.run.seed, chat_template=cfg.model.chat_template,
                                 system_prompt=cfg.model.system_prompt, autocast_dtype=amp,
                                 progress=cfg.run.progress if progress is None else progress)
        save_step_labels(rows, run_dir / "step_labels.jsonl")
    train_rows, heldout_rows = ((rows, load_step_labels(p.heldout_path)) if p.heldout_path
                                else split_by_prompt(rows, p.heldout_fraction, cfg.run.seed))
    limit = p.max_length or getattr(model.config, "max_position_embeddings", None)

    def encode(rows):   # (ids, step ends, labels), steps past `limit` tokens cut
        out = []
        for row in rows:
            ids, ends = encode_steps(tokenizer, row["prompt"], row["steps"], chat_template=cfg.model.chat_template,
                                     system_prompt=cfg.model.system_prompt)
            kept = [(e, float(y)) for e, y in zip(ends, row["labels"]) if 0 <= e < (limit or len(ids))]
            if kept:
                out.append((ids[:limit], [e for e, _ in kept], [y for _, y in kept]))
        return out

    train_enc, heldout_enc = encode(train_rows), encode(heldout_rows)
    if not train_enc:
        raise ValueError("no training steps (no response had a labelled step within the length limit)")

    # ------------------------------------------------------------------ model, optimizer
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if cfg.lora is not None:    # every linear layer but the head, which peft trains in full (modules_to_save)
        linear = sorted({n.rpartition(".")[2] for n, m in model.named_modules()
                         if isinstance(m, torch.nn.Linear) and not n.startswith("score")})
        model = apply_lora(model, replace(cfg.lora, target_modules=cfg.lora.target_modules or linear), "TOKEN_CLS")
    steps = p.epochs * math.ceil(len(train_enc) / p.batch_size)
    steps = min(steps, cfg.run.steps) if cfg.run.steps else steps
    params = [q for q in model.parameters() if q.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, partial(
        lr_multiplier, schedule=o.schedule, warmup=o.warmup_steps, total=steps))
    metrics_log = open_metrics(cfg, run_dir)

    def logits_of(enc) -> torch.Tensor:    # [K] the logit at every labelled step of `enc`, in order
        return torch.cat([torch.cat(step_logits(model, [(ids, ends) for ids, ends, _ in enc[s:s + o.micro_batch_size]],
                                                tokenizer.pad_token_id, autocast_dtype=amp))
                          for s in range(0, len(enc), o.micro_batch_size)])

    def labels_of(enc) -> torch.Tensor:    # [K]
        return torch.tensor([y for _, _, labels in enc for y in labels])

    @torch.no_grad()
    def run_eval(step: int) -> dict:
        rec = {"kind": "eval", "step": step}
        if heldout_enc:
            model.eval()
            rec |= {f"heldout_{k}": v for k, v in step_metrics(logits_of(heldout_enc), labels_of(heldout_enc)).items()}
            model.train()
        metrics_log.write(rec)
        return rec

    # ------------------------------------------------------------------ loop
    before = run_eval(0)
    bar = progress_bar(steps, cfg.run.progress if progress is None else progress, "process-reward-model steps")
    model.train()
    step = 0
    for step, (epoch, idx) in enumerate(itertools.islice(batches(len(train_enc), p.batch_size, p.epochs, gen),
                                                         steps), 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        batch = [train_enc[i] for i in idx.tolist()]
        n_labels = sum(len(labels) for _, _, labels in batch)
        logits = []
        for s in range(0, len(batch), o.micro_batch_size):     # the mean BCE over the batch's steps, accumulated
            micro = batch[s:s + o.micro_batch_size]
            x = logits_of(micro)
            (F.binary_cross_entropy_with_logits(x, labels_of(micro), reduction="sum") / n_labels).backward()
            logits.append(x.detach())
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm))
        optimizer.step()
        scheduler.step()
        m = step_metrics(torch.cat(logits), labels_of(batch))
        metrics_log.write({"kind": "train", "step": step, "epoch": epoch, **m, "grad_norm": grad_norm,
                           "lr": scheduler.get_last_lr()[0], "responses": len(batch), "labelled_steps": n_labels,
                           "time_step": time.perf_counter() - t0})
        bar.set_postfix(loss=f"{m['loss_bce']:.3f}", acc=f"{m['step_accuracy']:.2f}")
        bar.update(1)
        if cfg.run.eval_every and step % cfg.run.eval_every == 0 and step < steps:
            run_eval(step)
    bar.close()

    # ------------------------------------------------------------------ finish
    after = run_eval(step)
    final = save_checkpoint(model, tokenizer, run_dir / "final", config_yaml)
    metrics_log.close()
    summary = {"run_dir": str(run_dir), "checkpoint": str(final), "steps": step, "train_examples": len(train_enc),
               "heldout_examples": len(heldout_enc), "train_labelled_steps": len(labels_of(train_enc)),
               "before": before, "after": after}
    (run_dir / "summary.yaml").write_text(yaml.safe_dump(summary, sort_keys=False))
    return summary
