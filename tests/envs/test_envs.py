"""Environments written for verifiers and OpenEnv, run in-process through envs/episodes.py on the tiny model with the
replies forced by a script: the environments' own rewards, observation tokens masked out, no re-tokenisation drift,
failures (raise, hang, malformed observation) scored 0 and counted, and a template that does not keep prefixes
refused."""

import re
import time
from pathlib import Path

import pytest
import torch

from llmrl.data import make_task
from llmrl.envs import episodes
from llmrl.envs.episodes import collect_env_episodes, observation_ids
from llmrl.compute.logprobs import response_logprobs
from llmrl.rollout import sampler
from scripted import forced_sample_next, scripted_turns

ROOT = Path(__file__).resolve().parents[2]
VF_ENV = str(ROOT / "examples" / "envs" / "vf_guess_number.py")
OE_ENV = str(ROOT / "examples" / "envs" / "openenv_arith.py")


def script_policy(monkeypatch, tok, respond):
    """Every generate call emits respond(context text, row k) then EOS."""
    real = episodes.generate

    def generate(model, prompts, *, group_size=1, **kw):
        contexts = [tok.decode(p) for p in prompts for _ in range(group_size)]
        scripts = [tok(respond(c, k), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
                   for k, c in enumerate(contexts)]
        monkeypatch.setattr(sampler, "sample_next", forced_sample_next(scripts, stopped))
        return real(model, prompts, group_size=group_size, **kw)

    def stopped(script, t):
        return script[min(t, len(script) - 1)] == tok.eos_token_id
    monkeypatch.setattr(episodes, "generate", generate)
    scripted_turns(monkeypatch, tok, respond, stopped)        # the same script on the kept-cache path


def collect(tiny, examples, **kw):
    model, tok = tiny
    args = dict(group_size=3, max_new_tokens=200, temperature=1.0, max_turns=4)
    return collect_env_episodes(model, tok, examples, **{**args, **kw})


def assert_no_drift(tiny, r, temperature=1.0):
    model, _ = tiny
    with torch.no_grad():
        logp, _ = response_logprobs(model, r.input_ids, r.attention_mask, r.response_mask.shape[1],
                                    temperature=temperature)
    torch.testing.assert_close(logp * r.response_mask, r.logp_old, atol=1e-5, rtol=0)


def test_openenv_episodes_score_with_the_environment_reward(tiny, monkeypatch):
    _, tok = tiny
    task = make_task("openenv", options={"env": OE_ENV, "env_options": {"tries": 2}})
    ex = task.heldout(1)[0]

    def respond(context, k):                      # row 0 right at once, row 1 at the second try, row 2 never
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", context).groups())
        if "Not quite" not in context:            # the first turn: every row, in order
            return {0: f"{a + b}", 1: f"{a + b + 1}", 2: "I do not know"}[k]
        return "I do not know" if "I do not know" in context else f"{a + b}"

    script_policy(monkeypatch, tok, respond)
    r = collect(tiny, [ex])
    old = collect(tiny, [ex], keep_cache=False)                         # re-prefilled each turn: the same rows
    assert torch.equal(r.input_ids, old.input_ids) and torch.equal(r.response_mask, old.response_mask)
    torch.testing.assert_close(r.logp_old, old.logp_old, atol=1e-5, rtol=0)
    rewards = [e.meta["episode"].reward for e in r.examples]
    assert rewards == [1.0, 0.5, 0.0]
    assert r.extras["turns"].tolist() == [1, 2, 2] and r.extras["env_errors"].tolist() == [0, 0, 0]
    obs = ids = tok("Not quite: try again.", add_special_tokens=False)["input_ids"]
    row1 = r.response_ids[1][r.attention_mask[1, r.prompt_len:].bool()].tolist()
    start = next(i for i in range(len(row1)) if row1[i:i + len(ids)] == obs)
    assert r.response_mask[1, start:start + len(ids)].sum() == 0        # the environment's text: no gradient
    assert r.response_mask[1, :start].sum() > 0 and r.response_mask[1, start + len(ids):].sum() > 0
    assert_no_drift(tiny, r)


def test_verifiers_environment_runs_its_own_loop_and_reward(tiny, monkeypatch):
    _, tok = tiny
    task = make_task("verifiers", options={"env": VF_ENV, "config": {"tries": 3}})
    ex = task.heldout(1)[0]
    secret = task.env.taskset.include(keys=[ex.meta["key"]]).take(1)
    secret = next(iter(secret)).data.secret

    def respond(context, k):                     # row 0 guesses 1, then the secret; row 1 always 0
        if "assistant\n0" in context or (k == 1 and "Higher." not in context):   # row 1 (by its first reply)
            return "0"
        return "1" if "Higher." not in context else str(secret)

    script_policy(monkeypatch, tok, respond)
    r = collect(tiny, [ex], group_size=2)
    assert [e.meta["episode"].reward for e in r.examples] == [1.0, 0.0]
    assert r.extras["turns"].tolist() == [1 if secret == 1 else 2, 3]   # row 1: three wrong guesses, the limit
    assert r.extras["env_errors"].tolist() == [0, 0]
    text = tok.decode(r.response_ids[1][r.response_mask[1] == 0].tolist())
    assert "Higher." in text                                              # hints are observations
    assert_no_drift(tiny, r)


def _broken_env(tmp_path, body: str) -> str:
    path = tmp_path / "broken_env.py"
    path.write_text(Path(OE_ENV).read_text().replace(
        "    def step(self, action: ArithAction, timeout_s=None, **kwargs) -> ArithObservation:\n",
        "    def step(self, action: ArithAction, timeout_s=None, **kwargs) -> ArithObservation:\n" + body))
    return str(path)


@pytest.mark.parametrize("body,reason", [
    ("        raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("        import time; time.sleep(3)\n", "timeout"),
    ("        return {'prompt': 'not an observation'}\n", "MalformedObservation"),
])
def test_a_failing_environment_scores_zero_and_the_others_go_on(tiny, monkeypatch, tmp_path, body, reason):
    _, tok = tiny
    good = make_task("openenv", options={"env": OE_ENV}).heldout(1)[0]
    bad = make_task("openenv", options={"env": _broken_env(tmp_path, body), "timeout_s": 0.5}).heldout(1)[0]

    def respond(context, k):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", context).groups())
        return str(a + b)

    script_policy(monkeypatch, tok, respond)
    t = time.monotonic()
    r = collect(tiny, [good, bad], group_size=1, timeout_s=0.5)
    assert time.monotonic() - t < 30
    eps = [e.meta["episode"] for e in r.examples]
    assert [e.reward for e in eps] == [1.0, 0.0] and r.extras["env_errors"].tolist() == [0, 1]
    assert reason in eps[1].error


def test_a_template_that_rewrites_history_is_refused(tiny):
    _, tok = tiny
    old = tok.chat_template
    try:
        tok.chat_template = old.replace("message['content']", "message['content'] | trim")   # strips past turns
        observation_ids(tok, [{"role": "user", "content": "Hi."}], "Hello.", "Go on.")       # harmless here
        with pytest.raises(ValueError, match="does not keep prefixes"):
            observation_ids(tok, [{"role": "user", "content": "Hi."}], "Hello. ", "Go on.")
    finally:
        tok.chat_template = old


def test_bad_environment_options_are_clear():
    with pytest.raises(ValueError, match="needs options.env"):
        make_task("openenv")
    with pytest.raises(FileNotFoundError, match="nope.py"):
        make_task("openenv", options={"env": "nope.py"})
    with pytest.raises(ValueError, match="unknown option"):
        make_task("verifiers", options={"env": VF_ENV, "turns": 3})
    with pytest.raises(KeyError, match="unknown task 'openenvs'.*openenv.*verifiers"):
        make_task("openenvs")
