"""Episodes of an environment written for another framework (verifiers, OpenEnv), run in-process, token-in/token-out.

An environment adapter turns one episode into a coroutine `play(turn) -> float`: it talks to the environment in the
environment's own protocol and, whenever the environment has something for the model, calls `await turn(text)`,
which returns the model's reply; it returns the environment's own reward. The first `turn` text is the opening
user message. This loop runs B x G such coroutines side by side on one asyncio loop: it lets them all run until each
waits on a turn (or has finished), samples every waiting row's reply in one batch, hands the replies back, and
repeats.

Tokens. A row is its prompt (the chat template applied to the opening message) and then, turn after turn, the ids
the policy sampled (response_mask 1, their log-probs recorded) and each later observation's ids (response_mask 0):
the text the chat template adds between the end of the reply and the next generation prompt (end of turn, the user
message, the assistant header), tokenized on its own. Sampled ids are never decoded and re-encoded. That is only
right when the chat template renders a conversation as a prefix of its continuation; `observation_ids` checks it
at every turn and refuses a template that does not (a ValueError that stops the run, before training).

Failures. An environment that raises, hangs (no turn and no end within `timeout_s`) or gives a malformed
observation scores 0, is counted (`extras["env_errors"]`, logged with its reason) and the run goes on. A row whose
response budget (`max_new_tokens`: sampled plus observation tokens) or `max_turns` runs out gets `Truncated` raised
at its next `turn`; adapters let the environment score what was played.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field, replace

import torch

from llmrl.rollout.collect import stop_ids
from llmrl.rollout.sampler import generate, left_pad
from llmrl.rollout.types import Episode, Rollout

log = logging.getLogger("llmrl.envs")


class Truncated(Exception):
    """Raised inside an environment's coroutine at a `turn` past the row's token budget or turn limit."""


class MalformedObservation(ValueError):
    """An environment gave something that is not an observation this loop can show the model."""


def render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def observation_ids(tokenizer, messages: list[dict], reply: str, observation: str) -> list[int]:
    """The ids that follow a reply's end-of-turn token when `observation` is the next user message: the template's
    text after `render(messages) + reply + eos` in `render(messages + [reply, observation])`. ValueError when the
    template does not render the conversation so far as a prefix (re-tokenising would then be needed)."""
    head = render(tokenizer, messages) + reply + tokenizer.eos_token
    full = render(tokenizer, messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}])
    if not full.startswith(head):
        at = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        raise ValueError(
            "the model's chat template does not keep prefixes: rendering the next user turn changes the text before "
            f"it (at character {at}: {head[at:at + 40]!r} became {full[at:at + 40]!r}), so the sampled tokens would "
            "have to be re-tokenised; environments need a template that appends turns (e.g. ChatML), set "
            "model.chat_template")
    return tokenizer(full[len(head):], add_special_tokens=False)["input_ids"]


def check_template(tokenizer) -> None:
    """Refuse a chat template that does not append turns, before any episode runs."""
    observation_ids(tokenizer, [{"role": "user", "content": "Hi."}], "Hello.", "Go on.")


@dataclass
class _Row:
    play: object                                 # the environment's coroutine function: play(turn) -> reward
    messages: list[dict] = field(default_factory=list)
    prompt: list[int] = field(default_factory=list)
    ids: list[int] = field(default_factory=list)
    chosen: list[float] = field(default_factory=list)
    logp: list[float] = field(default_factory=list)
    turns: int = 0
    request: str | None = None                   # the observation the row waits to answer
    system: str | None = None                    # the environment's system prompt, given with the first turn
    future: asyncio.Future | None = None
    task: asyncio.Task | None = None
    reward: float = 0.0
    error: str | None = None
    truncated: bool = False
    last_reply: str = ""

    @property
    def waiting(self) -> bool:
        return self.future is not None and not self.future.done()


def _turn_fn(row: _Row, loop):
    async def turn(text, system: str | None = None) -> str:
        if not isinstance(text, str) or not isinstance(system, (str, type(None))):
            raise MalformedObservation(f"an observation must be text, got {type(text).__name__}")
        if row.truncated:
            raise Truncated("the row's turn limit or token budget is spent")
        if system is not None and row.turns:
            raise MalformedObservation("a system prompt can only come with the first turn")
        row.request, row.system, row.future = text, system, loop.create_future()
        return await row.future
    return turn


async def _play(row: _Row, turn) -> None:
    try:
        reward = await row.play(turn)
        row.reward = float(reward)
        if row.reward != row.reward:
            raise ValueError("the environment's reward is NaN")
    except Truncated:
        row.reward = 0.0                        # the adapter did not score a truncated episode
    except Exception as e:                      # the environment failed: 0, counted, and the run goes on
        row.reward, row.error = 0.0, f"{type(e).__name__}: {e}"


def _settle(loop, rows: list[_Row], timeout_s: float) -> None:
    """Run the loop until every unfinished row waits on a turn; a row that does neither in time is cancelled."""
    async def until_blocked():
        deadline = time.monotonic() + timeout_s
        for spins in range(1 << 62):
            busy = [r for r in rows if not r.task.done() and not r.waiting]
            if not busy:
                return
            if time.monotonic() > deadline:
                for r in busy:
                    r.error = f"timeout: no turn and no end within {timeout_s:g} s"
                    r.task.cancel()
                await asyncio.gather(*(r.task for r in busy), return_exceptions=True)
                return
            await asyncio.sleep(0 if spins < 100 else 0.002)      # yield first; then wait on real I/O gently
    loop.run_until_complete(until_blocked())


@torch.no_grad()
def collect_env_episodes(
    model,
    tokenizer,
    examples: list,                  # B examples whose meta["env"] is a play(turn) coroutine function factory
    *,
    group_size: int,
    max_new_tokens: int,             # response budget of a row: sampled plus observation tokens
    temperature: float,
    max_turns: int,
    timeout_s: float | None = None,  # None: the examples' meta["timeout_s"], else 30 s
    top_p: float = 1.0,
    chat_template: bool = True,
    system_prompt: str | None = None,
    autocast_dtype: torch.dtype | None = None,
    generator: torch.Generator | None = None,
    keep_cache: bool = True,         # keep each row's KV cache across turns (rollout/turns.py); False: re-prefill
) -> Rollout:
    """Run B x G environment episodes; the same `Rollout` as `collect_rollout`, observations masked out."""
    if not chat_template:
        raise ValueError("environment episodes are conversations: they need the chat template (model.chat_template)")
    check_template(tokenizer)
    if timeout_s is None:
        timeout_s = float(examples[0].meta.get("timeout_s", 30.0)) if examples else 30.0
    G = group_size
    rows = [_Row(play=examples[i // G].meta["env"](i % G)) for i in range(len(examples) * G)]
    sample = dict(temperature=temperature, top_p=top_p, stop_ids=stop_ids(tokenizer), pad_id=tokenizer.pad_token_id,
                  generator=generator, autocast_dtype=autocast_dtype)
    cached = _Cached(model, tokenizer, system_prompt, max_new_tokens, max_turns, sample)
    loop = asyncio.new_event_loop()
    was_training = model.training
    model.eval()
    try:
        for r in rows:
            r.task = loop.create_task(_play(r, _turn_fn(r, loop)))
        while True:
            _settle(loop, rows, timeout_s)
            waiting = [r for r in rows if r.waiting]
            if not waiting:
                break
            if keep_cache:
                cached(waiting)
            else:
                _take_turn(model, tokenizer, waiting, system_prompt, max_new_tokens, max_turns, sample)
    finally:
        for r in rows:
            if not r.task.done():
                r.task.cancel()
        loop.run_until_complete(asyncio.gather(*(r.task for r in rows), return_exceptions=True))
        loop.close()
        model.train(was_training)
    for i, r in enumerate(rows):
        if r.error:
            log.warning("environment episode %d failed (scored 0): %s", i, r.error)
    return _to_rollout(rows, examples, G, tokenizer)


def _open(tokenizer, r: _Row, system_prompt) -> None:
    """A row's first turn: its prompt is the chat template over the (system and) opening user message."""
    system = r.system or system_prompt
    r.messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": r.request}]
    r.prompt = list(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))


def _observe(tokenizer, r: _Row, max_new_tokens: int, max_turns: int) -> list[int] | None:
    """Append a later turn's observation to the row (its ids, masked); None (the turn raises Truncated) when the
    row is out of turns or room."""
    obs = observation_ids(tokenizer, r.messages[:-1], r.last_reply, r.request)
    r.messages.append({"role": "user", "content": r.request})
    if r.turns >= max_turns or len(r.ids) + len(obs) >= max_new_tokens:
        r.truncated = True
        r.future.set_exception(Truncated("turn limit or token budget"))
        return None
    r.ids += obs
    r.chosen += [0.0] * len(obs)
    r.logp += [0.0] * len(obs)
    return obs


def _reply(tokenizer, r: _Row, ids: list[int], logp: list[float], stops: set) -> None:
    """Record a sampled reply and hand its text to the environment."""
    r.ids += ids
    r.chosen += [1.0] * len(ids)
    r.logp += logp
    r.turns += 1
    ended = bool(ids) and ids[-1] in stops
    r.last_reply = tokenizer.decode(ids[:-1] if ended else ids, skip_special_tokens=True)
    r.messages.append({"role": "assistant", "content": r.last_reply})
    if not ended:                      # cut by the budget: the reply has no end of turn, nothing can follow it
        r.truncated = True
    r.future.set_result(r.last_reply)


def _take_turn(model, tokenizer, waiting: list[_Row], system_prompt, max_new_tokens: int, max_turns: int, sample):
    """Re-prefill path: append each waiting row's observation, sample every reply from its whole context."""
    live = []
    for r in waiting:
        if r.turns == 0:
            _open(tokenizer, r, system_prompt)
        elif _observe(tokenizer, r, max_new_tokens, max_turns) is None:
            continue
        live.append(r)
    if not live:
        return
    left = max(max_new_tokens - len(r.ids) for r in live)
    s = generate(model, [r.prompt + r.ids for r in live], max_new_tokens=left, **sample)
    for k, r in enumerate(live):
        n = min(int(s.response_mask[k].sum()), max_new_tokens - len(r.ids))
        _reply(tokenizer, r, s.response_ids[k, :n].tolist(), s.logp[k, :n].tolist(), set(sample["stop_ids"]))


class _Cached:
    """Kept-cache path: one TurnSampler over the rows' prompts, observations appended to each row's cache."""

    def __init__(self, model, tokenizer, system_prompt, max_new_tokens: int, max_turns: int, sample):
        self.model, self.tokenizer, self.system_prompt, self.sample = model, tokenizer, system_prompt, sample
        self.max_new_tokens, self.max_turns, self.turns, self.index = max_new_tokens, max_turns, None, {}

    def __call__(self, waiting: list[_Row]) -> None:
        from llmrl.rollout.turns import TurnSampler

        tok, T = self.tokenizer, self.max_new_tokens
        if self.turns is None:
            if any(r.turns for r in waiting):
                raise AssertionError("the kept-cache loop starts with every row's first turn")
            for k, r in enumerate(waiting):
                _open(tok, r, self.system_prompt)
                self.index[id(r)] = k
            self.turns = TurnSampler(self.model, [r.prompt for r in waiting], group_size=1,
                                     capacity=T * self.max_turns, **self.sample)
            live = waiting
        else:
            if any(r.turns == 0 for r in waiting):
                raise ValueError("an environment gave its first observation after other episodes had started")
            obs = {id(r): _observe(tok, r, T, self.max_turns) for r in waiting}
            live = [r for r in waiting if obs[id(r)] is not None]
            self.turns.extend({self.index[id(r)]: obs[id(r)] for r in live})
        if not live:
            return
        out = self.turns.sample({self.index[id(r)]: T - len(r.ids) for r in live})
        for r in live:
            o = out[self.index[id(r)]]
            _reply(tok, r, o.ids, o.logp, set(self.sample["stop_ids"]))


def _to_rollout(rows: list[_Row], examples: list, G: int, tokenizer) -> Rollout:
    pad, N = tokenizer.pad_token_id, len(rows)
    T = max(1, max(len(r.ids) for r in rows))
    prompt_ids, prompt_mask = left_pad([r.prompt or [pad] for r in rows], pad)           # [N, P]
    response_ids = torch.full((N, T), pad, dtype=torch.long)                               # [N, T]
    present, response_mask, logp = torch.zeros((N, T), dtype=torch.long), torch.zeros((N, T)), torch.zeros((N, T))
    for i, r in enumerate(rows):
        n = len(r.ids)
        response_ids[i, :n] = torch.tensor(r.ids, dtype=torch.long)
        present[i, :n] = 1
        response_mask[i, :n] = torch.tensor(r.chosen)
        logp[i, :n] = torch.tensor(r.logp)
    episodes = [Episode(0, r.turns, 0, r.last_reply, reward=r.reward, error=r.error) for r in rows]
    return Rollout(
        input_ids=torch.cat([prompt_ids, response_ids], 1),
        attention_mask=torch.cat([prompt_mask, present], 1),
        response_mask=response_mask,
        logp_old=logp,
        group_ids=torch.arange(len(examples)).repeat_interleave(G),
        completions=[tokenizer.decode(r.ids, skip_special_tokens=True) for r in rows],
        examples=[replace(examples[i // G], meta={**examples[i // G].meta, "episode": ep}) for i, ep in enumerate(episodes)],
        extras={"truncated": torch.tensor([r.truncated for r in rows]),
                "turns": torch.tensor([r.turns for r in rows]),
                "env_errors": torch.tensor([r.error is not None for r in rows], dtype=torch.long)},
    )
