"""Preference pairs for the DPO and reward-model trainers: built from a task by sampling the policy, read from
files, split into training and held-out pairs, and tokenised.

    pairs = build_pairs_from_task(model, tokenizer, task, 64)          # `llmrl pairs`
    train, heldout = pair_sets(cfg, task, model, tokenizer, run_dir, amp)
    encoded = encode_all(cfg, tokenizer, train, context)               # [(prompt_ids, chosen_ids, rejected_ids)]
"""

from __future__ import annotations

import itertools
import logging
import random
from pathlib import Path

import torch

from llmrl.data import make_task
from llmrl.data.pairs import PreferencePair, load_pairs, save_pairs, split_heldout
from llmrl.rewards import score
from llmrl.rewards.learned import encode_any_prompt, encode_response
from llmrl.rollout.collect import collect_rollout

log = logging.getLogger("llmrl.train")

Encoded = tuple[list[int], list[int], list[int]]     # (prompt_ids, chosen_ids, rejected_ids) from `encode_pair`


def task_of(cfg):
    """The task a supervised config names (`task`), or None."""
    t = cfg.task
    return None if t is None else make_task(t.name, seed=t.seed, options=t.options, train_path=t.train_path,
                                            heldout_path=t.heldout_path)


@torch.no_grad()
def build_pairs_from_task(
    model,
    tokenizer,
    task,
    n_prompts: int,
    *,
    samples_per_prompt: int = 8,
    pairs_per_prompt: int = 1,
    temperature: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_prompts: int = 8,
    chat_template: bool = True,
    system_prompt: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> list[PreferencePair]:
    """Sample G completions for each of `n_prompts` training prompts, score them with the task's `correct` reward,
    and pair passing (score 1) with failing (score < 1) completions of the same prompt: up to `pairs_per_prompt`
    distinct (passing, failing) combinations, drawn at random. A prompt whose samples all pass or all fail gives no
    pair. The same seed gives the same pairs.

    A completion cut off at `max_new_tokens` is kept: `encode_pair` appends EOS to it, as to every response.
    `progress`: a bar over the prompts with the pass rate of the samples so far and the pairs found.
    """
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    examples = list(itertools.islice(task.train_stream(seed), n_prompts))
    pairs, passed = [], []
    bar = tqdm(total=len(examples), desc="sampling pairs", disable=not progress, dynamic_ncols=True)
    for start in range(0, len(examples), batch_prompts):
        batch = examples[start:start + batch_prompts]
        rollout = collect_rollout(model, tokenizer, batch, group_size=samples_per_prompt,
                                  max_new_tokens=max_new_tokens, temperature=temperature, chat_template=chat_template,
                                  system_prompt=system_prompt, autocast_dtype=autocast_dtype, generator=generator)
        scores = score(rollout.completions, rollout.examples, [("correct", 1.0, {})]).total.tolist()   # [B*G]
        for b, ex in enumerate(batch):
            rows = range(b * samples_per_prompt, (b + 1) * samples_per_prompt)
            passing = [i for i in rows if scores[i] >= 1.0]
            failing = [i for i in rows if scores[i] < 1.0]
            if not passing or not failing:
                continue
            combos = [(w, l) for w in passing for l in failing]
            for w, l in rng.sample(combos, min(pairs_per_prompt, len(combos))):
                pairs.append(PreferencePair(ex.prompt, rollout.completions[w], rollout.completions[l],
                                            {"answer": ex.answer, "chosen_score": scores[w],
                                             "rejected_score": scores[l]}))
        passed += [s >= 1.0 for s in scores]
        bar.set_postfix(pass_rate=f"{sum(passed) / len(passed):.3f}", pairs=len(pairs))
        bar.update(len(batch))
    bar.close()
    return pairs


def pair_sets(cfg, task, sampler, tokenizer, run_dir: Path, amp, *, resuming: bool = False
              ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out) pairs: read from preference.data_path, or sampled from the task with the causal LM
    `sampler()` returns (called only then; the pairs are written to RUN_DIR/pairs.jsonl, and read back from there
    when resuming); held out from preference.heldout_path or split off by prompt."""
    p = cfg.preference
    built = Path(run_dir) / "pairs.jsonl"
    if p.data_path is not None:
        pairs = load_pairs(p.data_path)
    elif resuming and built.exists():
        pairs = load_pairs(built)
    else:
        pairs = build_pairs_from_task(
            sampler(), tokenizer, task, p.build_prompts, samples_per_prompt=p.build_samples_per_prompt,
            pairs_per_prompt=p.build_pairs_per_prompt, temperature=p.build_temperature,
            max_new_tokens=p.build_max_new_tokens, seed=cfg.run.seed,
            chat_template=cfg.model.chat_template, system_prompt=cfg.model.system_prompt, autocast_dtype=amp,
            progress=cfg.run.progress)
        save_pairs(pairs, built)
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


def encode_pair(tokenizer, pair: PreferencePair, chat_template: bool = True, *, system_prompt: str | None = None
                ) -> Encoded:
    """(prompt_ids, chosen_ids, rejected_ids). The prompt goes through the chat template with the generation
    prompt (as when sampling); each response is its text's tokens followed by EOS, the token that ends a turn."""
    return (encode_any_prompt(tokenizer, pair.prompt, chat_template, system_prompt=system_prompt),
            encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected))


def truncate_pair(encoded: Encoded, max_length: int) -> Encoded:
    """Cut each response's tail so that prompt + response fits in `max_length` tokens (the prompt is kept whole)."""
    prompt, chosen, rejected = encoded
    room = max_length - len(prompt)
    if room < 1:
        raise ValueError(f"a prompt of {len(prompt)} tokens leaves no room for a response within max_length "
                         f"{max_length}")
    return prompt, chosen[:room], rejected[:room]


def encode_all(cfg, tokenizer, pairs: list[PreferencePair], context: int | None) -> list[Encoded]:
    """Tokenise pairs (`encode_pair`), cutting responses to fit preference.max_length or the model's context."""
    limit = cfg.preference.max_length or context
    out = []
    for pair in pairs:
        enc = encode_pair(tokenizer, pair, cfg.model.chat_template, system_prompt=cfg.model.system_prompt)
        out.append(truncate_pair(enc, limit) if limit else enc)
    return out
