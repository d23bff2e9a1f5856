"""Shared test helpers: a scripted stand-in for the sampler's `sample_next` (episode and tool tests), and the tiny
model's command-line overrides with a reward its samples differ in (CLI and engine tests)."""

import torch

from llmrl.rewards import REWARDS

TINY = ["preset=grpo", "model.name=tiny", "model.autocast=none", "task.heldout_size=6", "rollout.prompts_per_step=2",
        "rollout.group_size=3", "rollout.max_new_tokens=6", "run.progress=false", "run.eval_every=1"]


@REWARDS.register("test_vowels")
def _vowels(completions, examples):
    """A reward the random tiny model's samples differ in, so advantages are not all zero."""
    return [sum(ch in "aeiou" for ch in c) / max(1, len(c)) for c in completions]


def forced_sample_next(scripts, stopped=lambda script, t: False):
    """sample_next emitting scripts[row][step] (the last token repeated past the end), with the real model's
    log-prob of that token (so drift is measurable). The sampler drops stopped rows from its batch:
    `stopped(script, t)` says whether a row ended at step t."""
    step = {"t": 0, "rows": list(range(len(scripts)))}

    def sample_next(logits, temperature, top_p, generator=None):
        t = step["t"]
        step["t"] += 1
        if logits.shape[0] < len(step["rows"]):           # the batch was compacted to the rows still running
            step["rows"] = [r for r in step["rows"] if not any(stopped(scripts[r], u) for u in range(t))]
        assert logits.shape[0] == len(step["rows"])
        token = torch.tensor([scripts[r][min(t, len(scripts[r]) - 1)] for r in step["rows"]])
        logp_all = torch.log_softmax(logits.float() / (temperature or 1.0), -1)
        return token, logp_all.gather(-1, token[:, None])[:, 0]
    return sample_next


def scripted_turns(monkeypatch, tok, respond, stopped):
    """Patch rollout.turns.TurnSampler so each turn emits, for each row in flight (k-th in the batch), the ids of
    respond(row's whole context so far as text, k) then EOS; `stopped(script, t)` as in forced_sample_next."""
    from llmrl.rollout import sampler, turns

    class Scripted(turns.TurnSampler):
        def __init__(self, model, prompts, *, group_size, **kw):
            super().__init__(model, prompts, group_size=group_size, **kw)
            self.history = {r: list(prompts[r // group_size]) for r in self.rows}

        def sample(self, limits):
            contexts = [tok.decode(self.history[r]) for r in self.rows]
            scripts = [tok(respond(c, k), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                       for k, c in enumerate(contexts)]
            monkeypatch.setattr(sampler, "sample_next", forced_sample_next(scripts, stopped))
            out = super().sample(limits)
            for r, o in out.items():
                self.history[r] += o.ids
            return out

        def extend(self, observations):
            for r, obs in observations.items():
                self.history[r] += list(obs)
            super().extend(observations)

    monkeypatch.setattr(turns, "TurnSampler", Scripted)
