"""Run a suite on a model: k samples per problem (greedy when k = 1), scored by the suite, summarised as pass@k and
maj@k.

    result = run_suite(model, tokenizer, make_suite("gsm8k"), EvalOptions(limit=50))
    result["pass@1"], result["n"], result["seconds"]

Problems go through the model in batches of similar prompt length (less padding), with the native sampler
(`rollout/sampler.generate`) or an engine with the same `generate` (`VLLMEngine`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from llmrl.evals.metrics import summarize
from llmrl.evals.suites import Suite
from llmrl.rewards.extract import extract_answer
from llmrl.rollout.collect import stop_ids
from llmrl.rollout.sampler import generate
from llmrl.train.evaluate import answer_counts, collapse_stats


@dataclass(frozen=True)
class EvalOptions:
    k: int = 1                       # samples per problem; 1 = greedy
    temperature: float | None = None  # None: 0 (greedy) for k = 1, else 1.0
    top_p: float = 1.0
    limit: int | None = None         # this many problems, spread evenly over the suite
    batch_size: int = 16             # problems per batch (k rows each)
    max_new_tokens: int | None = None  # None: the suite's own
    chat_template: bool = True
    autocast_dtype: torch.dtype | None = torch.bfloat16
    seed: int = 0
    keep_samples: int = 5            # completions kept in the result, for reading


def spread(examples: list, limit: int | None) -> list:
    """`limit` problems spread evenly over the list (every len/limit-th, so each part of a suite is represented);
    all of them when limit is None or not smaller."""
    if limit is None or limit >= len(examples):
        return list(examples)
    if limit < 1:
        raise ValueError(f"--limit must be >= 1, got {limit}")
    return [examples[i * len(examples) // limit] for i in range(limit)]


def encode_messages(tokenizer, messages: list[dict], chat_template: bool) -> list[int]:
    if not chat_template:
        return tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


def _sample(model, tokenizer, prompts, opts: EvalOptions, max_new: int, temperature: float, engine, gen):
    """k completions per prompt, as text, in row order (prompt b's are rows b*k .. b*k+k-1), and their lengths."""
    kw = dict(group_size=opts.k, max_new_tokens=max_new, temperature=temperature, top_p=opts.top_p,
              stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_token_id)
    if engine is not None:
        s = engine.generate(prompts, **kw, seed=int(torch.randint(2**31 - 1, (1,), generator=gen)))
    else:
        s = generate(model, prompts, **kw, generator=gen, autocast_dtype=opts.autocast_dtype)
    ids = s.response_ids * s.response_mask.long() + tokenizer.pad_token_id * (1 - s.response_mask.long())
    return tokenizer.batch_decode(ids, skip_special_tokens=True), s.response_mask.sum(-1).tolist()


@torch.no_grad()
def run_suite(model, tokenizer, suite: Suite, opts: EvalOptions, *, engine=None, progress: bool = True) -> dict:
    """Evaluate; returns {"suite", "n", "k", "temperature", "pass@1", ..., "maj@k", "response_length", "seconds",
    "top_answer_share" and "constant_answer_accuracy" (`collapse_stats`, over each problem's first sample),
    "samples": the first few (prompt, answer, completion, score)}."""
    from tqdm.auto import tqdm

    examples = spread(suite.examples, opts.limit)
    temperature = opts.temperature if opts.temperature is not None else (0.0 if opts.k == 1 else 1.0)
    if opts.k > 1 and temperature <= 0:
        raise ValueError("k > 1 samples need a temperature > 0 (greedy samples are all the same)")
    max_new = opts.max_new_tokens or suite.max_new_tokens
    prompts = [encode_messages(tokenizer, suite.messages(ex), opts.chat_template) for ex in examples]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))          # similar lengths batch together
    scores: list[list[float]] = [[] for _ in examples]
    keys: list[list] = [[] for _ in examples]
    completions: list[list[str]] = [[] for _ in examples]
    lengths: list[float] = []
    gen = torch.Generator().manual_seed(opts.seed)
    was_training, start = model.training, time.perf_counter()
    model.eval()
    bar = tqdm(total=len(examples), desc=suite.name, disable=not progress, dynamic_ncols=True)
    try:
        for b in range(0, len(order), opts.batch_size):
            idx = order[b:b + opts.batch_size]
            texts, lens = _sample(model, tokenizer, [prompts[i] for i in idx], opts, max_new, temperature, engine, gen)
            rows = [i for i in idx for _ in range(opts.k)]
            for i, text, s in zip(rows, texts, suite.score(texts, [examples[i] for i in rows])):
                scores[i].append(float(s))
                completions[i].append(text)
                keys[i].append(suite.answer_key(text, examples[i]) if suite.answer_key else None)
            lengths += lens
            done = [scores[i][0] for i in order[:b + len(idx)]]
            bar.set_postfix(pass1=f"{sum(done) / len(done):.3f}")
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    ks = sorted({1, opts.k})
    out = {"suite": suite.name, "n": len(examples), "of": len(suite.examples), "k": opts.k,
           "temperature": temperature, "max_new_tokens": max_new,
           **summarize(scores, keys if suite.answer_key else None, ks),
           "response_length": sum(lengths) / max(1, len(lengths)), "seconds": time.perf_counter() - start,
           **collapse_stats({"given_counts": answer_counts(extract_answer(c[0]) for c in completions),
                             "answer_counts": answer_counts(str(ex.answer) for ex in examples)}),
           "source": suite.source}
    out["samples"] = [{"prompt": examples[i].prompt, "answer": examples[i].answer, "completion": completions[i][0],
                       "score": scores[i][0]} for i in range(min(opts.keep_samples, len(examples)))]
    return out
