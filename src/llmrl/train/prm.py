"""The process-reward-model trainer (`llmrl prm`): step labels -> BCE at each step's last token -> save.

A process reward model (PRM) gives P(step s is good | question, steps 1..s) for every reasoning step (Uesato et al.
2022; Lightman et al. 2023, "Let's Verify Step by Step", sec. 2.6: read at the last token of each step). Here it is
the causal LM's backbone with a new linear head giving one logit per token (`llmrl.models.heads.load_prm`), trained
with binary cross-entropy at each step's LAST token (the token before the next step starts); every other token is
ignored. Data: step-labelled responses (`llmrl.data.step_labels`), each step tokenised on its own, in training and
in scoring alike (`llmrl.rewards.learned.encode_steps`).

Labels without raters (Wang et al. 2024, Math-Shepherd, sec. 3.3): from each step's end sample completions of a
verifiable task; the label is the fraction that reach the right answer ("soft", SE) or whether any does ("hard",
HE): `build_step_labels` (`llmrl prm-data`). In RL the trained model is the `prm` step reward
(`llmrl.rewards.process`). The loop, checkpoints and resuming are the shared supervised loop's.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Sequence

import torch

from llmrl.compute.settings import resolve_autocast
from llmrl.config_supervised import PrmTrainConfig
from llmrl.credit.steps import step_boundaries, step_ids_for_batch
from llmrl.data.step_labels import load_step_labels, save_step_labels, split_by_prompt
from llmrl.models import load_model
from llmrl.models.heads import load_prm, step_logits
from llmrl.models.lora import add_lora
from llmrl.objectives.preference import step_bce_sum, step_metrics
from llmrl.rewards import score
from llmrl.rewards.learned import encode_steps
from llmrl.rewards.process import step_texts
from llmrl.rollout.branch import monte_carlo_values
from llmrl.rollout.collect import collect_rollout
from llmrl.train.pairs import task_of
from llmrl.train.supervised import fit


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
    from tqdm.auto import tqdm

    if labels not in ("soft", "hard"):
        raise ValueError(f"labels={labels!r}; valid: 'soft', 'hard'")
    generator = torch.Generator().manual_seed(seed)
    examples, terms, rows = list(itertools.islice(task.train_stream(seed), n_prompts)), list(reward_terms), []
    bar, outcomes = tqdm(total=len(examples), desc="labelling steps", disable=not progress, dynamic_ncols=True), []
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


def encode_rows(rows: list[dict], tokenizer, limit: int | None, *, chat_template: bool, system_prompt: str | None
                ) -> list[tuple[list[int], list[int], list[float]]]:
    """(token ids, step ends, labels) of each row; steps whose last token lies past `limit` tokens are cut, and a
    row left with none is dropped."""
    out = []
    for row in rows:
        ids, ends = encode_steps(tokenizer, row["prompt"], row["steps"], chat_template=chat_template,
                                 system_prompt=system_prompt)
        kept = [(e, float(y)) for e, y in zip(ends, row["labels"]) if 0 <= e < (limit or len(ids))]
        if kept:
            out.append((ids[:limit], [e for e, _ in kept], [y for _, y in kept]))
    return out


class PrmTask:
    """Process-reward-model training on step-labelled responses, for the supervised loop (`train/supervised.py`)."""
    desc, shown = "process-reward-model steps", ("loss_bce", "step_accuracy")

    def __init__(self, cfg: PrmTrainConfig, run_dir: Path, resuming: bool, progress: bool | None = None):
        p, m = cfg.prm, cfg.model
        self.epochs, self.batch_size, self.micro_batch_size = p.epochs, p.batch_size, cfg.optim.micro_batch_size
        self.amp = resolve_autocast(m.autocast)
        model, self.tokenizer = load_prm(m.name, dtype=getattr(torch, m.dtype))
        built = run_dir / "step_labels.jsonl"
        if p.data_path is not None or (resuming and built.exists()):
            rows = load_step_labels(p.data_path or built)
        else:
            rows = build_step_labels(load_model(m.name)[0], self.tokenizer, task_of(cfg), p.build_prompts,
                                     samples_per_prompt=p.build_samples_per_prompt, mc_samples=p.build_mc_samples,
                                     segmenter=p.steps, pattern=p.step_pattern, labels=p.labels,
                                     temperature=p.build_temperature, max_new_tokens=p.build_max_new_tokens,
                                     seed=cfg.run.seed, chat_template=m.chat_template, system_prompt=m.system_prompt,
                                     autocast_dtype=self.amp,
                                     progress=cfg.run.progress if progress is None else progress)
            save_step_labels(rows, built)
        train_rows, heldout_rows = ((rows, load_step_labels(p.heldout_path)) if p.heldout_path
                                    else split_by_prompt(rows, p.heldout_fraction, cfg.run.seed))
        limit = p.max_length or getattr(model.config, "max_position_embeddings", None)
        encode = dict(chat_template=m.chat_template, system_prompt=m.system_prompt)
        self.train_enc = encode_rows(train_rows, self.tokenizer, limit, **encode)
        self.heldout_enc = encode_rows(heldout_rows, self.tokenizer, limit, **encode)
        if not self.train_enc:
            raise ValueError("no training steps (no response had a labelled step within the length limit)")
        self.n_train = len(self.train_enc)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.lora is not None:    # every linear layer but the head, which peft trains in full (modules_to_save)
            l = cfg.lora
            model = add_lora(model, r=l.r, alpha=l.alpha, dropout=l.dropout, targets=l.target_modules,
                             task_type="TOKEN_CLS")
        self.model = model

    def _logits(self, enc) -> torch.Tensor:    # [K] the logit at every labelled step of `enc`, in order
        mb = self.micro_batch_size
        return torch.cat([torch.cat(step_logits(self.model, [(ids, ends) for ids, ends, _ in enc[s:s + mb]],
                                                self.tokenizer.pad_token_id, autocast_dtype=self.amp))
                          for s in range(0, len(enc), mb)])

    @staticmethod
    def _labels(enc) -> torch.Tensor:          # [K]
        return torch.tensor([y for _, _, labels in enc for y in labels])

    def _rows(self, idx: torch.Tensor) -> list:
        return [self.train_enc[i] for i in idx.tolist()]

    def loss(self, micro: torch.Tensor, batch: torch.Tensor):
        n_labels = sum(len(labels) for _, _, labels in self._rows(batch))   # the mean BCE over the batch's steps
        rows = self._rows(micro)
        logits = self._logits(rows)
        return step_bce_sum(logits, self._labels(rows)) / n_labels, logits.detach()

    def metrics(self, parts: list[torch.Tensor], batch: torch.Tensor) -> dict[str, float]:
        return step_metrics(torch.cat(parts), self._labels(self._rows(batch)))

    def counts(self, batch: torch.Tensor) -> dict[str, int]:
        rows = self._rows(batch)
        return {"responses": len(rows), "labelled_steps": sum(len(labels) for _, _, labels in rows)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.heldout_enc:
            return {}
        was_training = self.model.training
        self.model.eval()
        metrics = step_metrics(self._logits(self.heldout_enc), self._labels(self.heldout_enc))
        self.model.train(was_training)
        return {f"heldout_{k}": v for k, v in metrics.items()}

    def summary(self) -> dict[str, int]:
        return {"train_examples": self.n_train, "heldout_examples": len(self.heldout_enc),
                "train_labelled_steps": len(self._labels(self.train_enc))}


def train_prm(cfg: PrmTrainConfig, *, progress: bool | None = None) -> dict:
    """Train a process reward model. Returns a summary with held-out step accuracy before and after."""
    return fit(cfg, lambda run_dir, resuming: PrmTask(cfg, run_dir, resuming, progress), progress=progress)
