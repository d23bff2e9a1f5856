"""Preference pairs: load and save JSONL, build them from a task by sampling the policy, tokenise them.

One JSON object a line, each with `prompt`, `chosen` and `rejected` (other keys are kept in `meta`):

    {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}                                  plain text
    {"prompt": [{"role": "user", "content": "What is 2 + 2?"}],                                   chat messages
     "chosen": [{"role": "assistant", "content": "4"}], "rejected": [{"role": "assistant", "content": "5"}]}

A text prompt is one user message. A chat prompt is the conversation so far; a chat response is the assistant's
continuation: exactly one assistant message (its content is what the policy is scored on).
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from llmrl.rewards import score
from llmrl.rollout.collect import collect_rollout, encode_prompt

Messages = list[dict]


@dataclass(frozen=True)
class PreferencePair:
    prompt: str | Messages       # a user message, or the conversation so far
    chosen: str | Messages       # the preferred response (text, or one assistant message)
    rejected: str | Messages     # the dispreferred response
    meta: dict = field(default_factory=dict)   # provenance (e.g. the task's answer and the two scores)


# ----------------------------------------------------------------------------- reading and writing

def _check_messages(value, key: str, where: str, *, response: bool) -> None:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: {key!r} must be a string or a non-empty list of {{role, content}} messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: {key}[{i}] must be a message {{\"role\": str, \"content\": str}}, got {m!r}")
    if response and (len(value) != 1 or value[0]["role"] != "assistant"):
        raise ValueError(f"{where}: {key!r} as messages must be exactly one assistant message, "
                         f"got roles {[m['role'] for m in value]}")


def load_pairs(path: str | Path) -> list[PreferencePair]:
    """Pairs from a JSONL file (format in the module docstring); every error names file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"preference pairs: no such file: {path}")
    pairs = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: each line must be a JSON object with prompt, chosen, rejected")
            for key in ("prompt", "chosen", "rejected"):
                if key not in row:
                    raise ValueError(f"{where}: missing key {key!r} (need prompt, chosen, rejected)")
                if not isinstance(row[key], str):
                    _check_messages(row[key], key, where, response=key != "prompt")
            pairs.append(PreferencePair(row.pop("prompt"), row.pop("chosen"), row.pop("rejected"), row))
    if not pairs:
        raise ValueError(f"preference pairs: {path} is empty (no JSON lines)")
    return pairs


def save_pairs(pairs: list[PreferencePair], path: str | Path) -> Path:
    """Write pairs as JSONL (`load_pairs` reads them back equal)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for p in pairs:
            fh.write(json.dumps({**p.meta, "prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected}) + "\n")
    return path


# ----------------------------------------------------------------------------- building from a task

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


# ----------------------------------------------------------------------------- tokenising

def encode_pair(tokenizer, pair: PreferencePair, chat_template: bool = True, *, system_prompt: str | None = None
                ) -> tuple[list[int], list[int], list[int]]:
    """(prompt_ids, chosen_ids, rejected_ids). The prompt goes through the chat template with the generation
    prompt (as when sampling); each response is its text's tokens followed by EOS, the token that ends a turn."""
    return (encode_any_prompt(tokenizer, pair.prompt, chat_template, system_prompt=system_prompt),
            encode_response(tokenizer, pair.chosen), encode_response(tokenizer, pair.rejected))


def encode_any_prompt(tokenizer, prompt: str | Messages, chat_template: bool = True, *,
                      system_prompt: str | None = None) -> list[int]:
    """A text prompt (one user message) or the conversation so far -> prompt ids ending in the generation prompt."""
    if isinstance(prompt, str):
        return encode_prompt(tokenizer, prompt, chat_template=chat_template, system_prompt=system_prompt)
    if not chat_template:
        raise ValueError("a chat-message prompt needs chat_template=True")
    if system_prompt and prompt[0]["role"] != "system":
        prompt = [{"role": "system", "content": system_prompt}, *prompt]
    return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=False))


def encode_response(tokenizer, response: str | Messages) -> list[int]:
    """Response text (or one assistant message) -> its token ids + EOS."""
    text = response if isinstance(response, str) else response[0]["content"]
    return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def split_heldout(pairs: list[PreferencePair], fraction: float, seed: int
                  ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): hold out the pairs of a random `fraction` of the distinct prompts (at least one prompt
    when fraction > 0 and there are two or more), so no held-out prompt is ever trained on."""
    prompts = sorted({json.dumps(p.prompt, sort_keys=True) for p in pairs})
    random.Random(seed).shuffle(prompts)
    n_held = 0 if fraction <= 0 or len(prompts) < 2 else max(1, round(fraction * len(prompts)))
    held = set(prompts[:n_held])
    is_held = [json.dumps(p.prompt, sort_keys=True) in held for p in pairs]
    return [p for p, h in zip(pairs, is_held) if not h], [p for p, h in zip(pairs, is_held) if h]
