"""Multi-turn episodes with tools: the model writes, calls a tool, reads its output, goes on, and answers.

One episode per row (B prompts x G samples; rows b*G .. b*G+G-1 answer example b, as in `collect_rollout`).
A turn is one `generate` call; it ends at EOS, at a token that ends a tool call (`tools.CALL_END`, a stop
string of the sampler), or at the row's budget. After a turn that made a call the tool runs, and its
observation (`tools.observation_text`, cut to `max_observation_tokens`) is tokenized on its own and appended:
attention_mask 1 (the model reads it), response_mask 0 and logp_old 0 (the policy did not choose it). The row
then goes on from its whole context, re-prefilled. An episode ends at a turn with no call (its answer), at
`max_turns` turns (a call in the last turn is not run), or when its response (sampled plus observation
tokens) has used `max_new_tokens`.

No re-tokenisation drift: a row's response is exactly the ids it sampled and the observation ids, in order,
and each turn's context is the prompt plus those ids, so each recorded logp_old is the log-prob the policy
gives that token in the final sequence. Text is decoded only for the tools and the rewards, never re-encoded.

Per-row results: `extras` holds `tool_calls`, `turns`, `tool_errors` ([N] long) and `truncated` ([N] bool);
each row's example carries an `Episode` (types.py) at `meta["episode"]` for the reward functions.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import torch

from llmrl.rollout.collect import encode_prompt, stop_ids
from llmrl.rollout.sampler import generate, left_pad
from llmrl.rollout.tools import CALL_END, observation_text, parse_call, run_call
from llmrl.rollout.types import Episode, Rollout


@dataclass
class _Row:
    """One episode as it grows: the prompt, then response ids with their masks and log-probs."""
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)     # 1 = sampled by the policy, 0 = observation
    logp: list[float] = field(default_factory=list)
    tool_calls: int = 0
    turns: int = 0
    tool_errors: int = 0
    answer: str | None = None
    truncated: bool = False

    def add(self, ids: list[int], logp: list[float] | None) -> None:
        self.ids += ids
        self.chosen += [1.0 if logp is not None else 0.0] * len(ids)
        self.logp += logp if logp is not None else [0.0] * len(ids)


def encode_observation(tokenizer, output: str, max_tokens: int) -> tuple[str, list[int]]:
    """(observation text, its ids) with the tool output cut (ending "...") until the ids fit in `max_tokens`.
    The ids are always exactly tokenizer(text) — never a cut of a longer encoding."""
    cut = output
    while True:
        text = observation_text(cut if cut == output else cut + "...")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            return text, ids
        if not cut:
            raise ValueError(f"rollout.max_observation_tokens={max_tokens} is less than the {len(ids)} tokens of an "
                             f"empty observation {text!r}")
        cut = cut[:min(len(cut) - 1, len(cut) * max_tokens // len(ids))]


@torch.no_grad()
def collect_episodes(
    model,
    tokenizer,
    examples: list,                  # B task examples
    *,
    group_size: int,
    max_new_tokens: int,             # response budget of a row: sampled plus observation tokens
    temperature: float,
    tools: dict,                     # name -> tool(arguments: str) -> str  (tools.resolve_tools)
    max_turns: int,
    max_observation_tokens: int,
    top_p: float = 1.0,
    chat_template: bool = True,
    system_prompt: str | None = None,
    demo: list[dict] | None = None,  # a worked exchange shown before each prompt (tools.demonstration)
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    keep_cache: bool = True,         # keep each row's KV cache across turns (rollout/turns.py); False: re-prefill
) -> Rollout:
    """Run B x G tool-using episodes; the same `Rollout` as `collect_rollout`, with observations masked out."""
    encode_observation(tokenizer, "", max_observation_tokens)          # fails early if not even that fits
    G = group_size
    prompts = [encode_prompt(tokenizer, ex.prompt, chat_template=chat_template, system_prompt=system_prompt, demo=demo)
               for ex in examples]
    rows = [_Row(prompt=prompts[i // G]) for i in range(len(examples) * G)]
    sample = dict(temperature=temperature, top_p=top_p, stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                  generator=generator, autocast_dtype=autocast_dtype, stop_strings=(CALL_END,), tokenizer=tokenizer)
    was_training = model.training
    model.eval()
    try:
        if keep_cache:
            _turns_cached(model, tokenizer, rows, prompts, G, sample, tools, max_new_tokens, max_turns,
                          max_observation_tokens)
        else:
            _turns_reprefilled(model, tokenizer, rows, prompts, G, sample, tools, max_new_tokens, max_turns,
                               max_observation_tokens)
    finally:
        model.train(was_training)
    return _to_rollout(rows, examples, G, tokenizer).to(next(model.parameters()).device)


def _record_turn(tokenizer, row: _Row, ids: list[int], logp: list[float], cut: bool, last_turn: bool):
    """Add a turn's sampled ids to `row`; the (name, arguments) of its call to run, else None (an answer, or a
    call in the last turn, which is not run)."""
    row.add(ids, logp)
    row.turns += 1
    text = tokenizer.decode(ids, skip_special_tokens=True)
    call = parse_call(text)
    if call is None:                                                  # an answer (maybe cut by the budget)
        row.answer, row.truncated = text, cut
        return None
    row.tool_calls += 1
    return None if last_turn else call


def _observe(tokenizer, row: _Row, output: str, max_new_tokens: int, max_observation_tokens: int):
    """The observation ids to append after a call's `output`, or None when the row has no room to read it."""
    row.tool_errors += output.startswith("error:")
    _, obs = encode_observation(tokenizer, output, max_observation_tokens)
    if len(row.ids) + len(obs) >= max_new_tokens:                     # no room to read it and go on
        row.truncated = True
        return None
    row.add(obs, None)
    return obs


def _turns_cached(model, tokenizer, rows, prompts, G, sample, tools, max_new_tokens, max_turns, max_obs):
    """The episode loop on a TurnSampler: each row's cache is kept, observations are appended to it."""
    from llmrl.rollout import turns as turns_module

    # A row's whole response fits in max_new_tokens; the shared write pointer can run further (each turn lasts as
    # long as its longest row, observation blocks are padded), and the cache then grows by copy.
    turns = turns_module.TurnSampler(model, prompts, group_size=G, capacity=max_new_tokens, **sample)
    active = list(range(len(rows)))
    for turn in range(max_turns):
        out = turns.sample({i: max_new_tokens - len(rows[i].ids) for i in active})
        calls = []
        for i in active:
            o = out[i]
            call = _record_turn(tokenizer, rows[i], o.ids, o.logp, o.truncated, turn + 1 == max_turns)
            if call is not None:
                calls.append((i, *call))
        going = {}
        for (i, _, _), output in zip(calls, _run_tools(calls, tools)):
            obs = _observe(tokenizer, rows[i], output, max_new_tokens, max_obs)
            if obs is not None:
                going[i] = obs
        turns.extend(going)
        active = list(going)
        if not active:
            break


def _turns_reprefilled(model, tokenizer, rows, prompts, G, sample, tools, max_new_tokens, max_turns, max_obs):
    """The episode loop that re-prefills each continuing row's whole context every turn (the pre-cache path, kept
    for comparison: bench/multiturn_cache.py)."""
    active = list(range(len(rows)))
    for turn in range(max_turns):
        if not active:
            break
        if turn == 0:   # one prefill per prompt, shared by its G rows
            s = generate(model, prompts, group_size=G, max_new_tokens=max_new_tokens, **sample)
        else:           # each continuing row from its whole context
            left = max(max_new_tokens - len(rows[i].ids) for i in active)
            s = generate(model, [rows[i].prompt + rows[i].ids for i in active], max_new_tokens=left, **sample)
        calls = []
        for k, i in enumerate(active):
            n_turn = int(s.response_mask[k].sum())
            n = min(n_turn, max_new_tokens - len(rows[i].ids))                # a later turn may overrun this row
            call = _record_turn(tokenizer, rows[i], s.response_ids[k, :n].tolist(), s.logp[k, :n].tolist(),
                                bool(s.truncated[k]) or n < n_turn, turn + 1 == max_turns)
            if call is not None:
                calls.append((i, *call))
        active = [i for (i, _, _), output in zip(calls, _run_tools(calls, tools))
                  if _observe(tokenizer, rows[i], output, max_new_tokens, max_obs) is not None]


def _run_tools(calls: list[tuple[int, str, str]], tools: dict) -> list[str]:
    """The outputs of one turn's calls, run side by side (the python tool waits on a sandboxed process)."""
    if len(calls) <= 1:
        return [run_call(name, args, tools) for _, name, args in calls]
    with ThreadPoolExecutor(max_workers=min(8, len(calls))) as pool:
        return list(pool.map(lambda c: run_call(c[1], c[2], tools), calls))


def _to_rollout(rows: list[_Row], examples: list, G: int, tokenizer) -> Rollout:
    """Rows -> a `Rollout`: prompts left-padded, responses right-padded to the longest."""
    pad, N = tokenizer.pad_token_id, len(rows)
    T = max(1, max(len(r.ids) for r in rows))
    prompt_ids, prompt_mask = left_pad([r.prompt for r in rows], pad)          # [N, P]
    response_ids = torch.full((N, T), pad, dtype=torch.long)                   # [N, T]
    present = torch.zeros((N, T), dtype=torch.long)                            # sampled or observation
    response_mask, logp = torch.zeros((N, T)), torch.zeros((N, T))
    for i, r in enumerate(rows):
        n = len(r.ids)
        response_ids[i, :n] = torch.tensor(r.ids, dtype=torch.long)
        present[i, :n] = 1
        response_mask[i, :n] = torch.tensor(r.chosen)
        logp[i, :n] = torch.tensor(r.logp)
    episodes = [Episode(r.tool_calls, r.turns, r.tool_errors, r.answer) for r in rows]
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], 1),
        attention_mask=torch.cat([prompt_mask, present], 1),
        response_mask=response_mask,
        logp_old=logp,
        group_ids=torch.arange(len(examples)).repeat_interleave(G),
        completions=[tokenizer.decode(r.ids, skip_special_tokens=True) for r in rows],
        examples=[replace(examples[i // G], meta={**examples[i // G].meta, "episode": ep}) for i, ep in enumerate(episodes)],
        extras={"truncated": torch.tensor([r.truncated for r in rows]),
                **{k: torch.tensor([getattr(e, k) for e in episodes]) for k in ("tool_calls", "turns", "tool_errors")}},
    )
