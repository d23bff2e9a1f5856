"""The multi-turn episode loop on the tiny model, with the sampled tokens forced by a script (a random model never
calls a tool): calls parsed and run, observations appended with the right masks, no re-tokenisation drift, turn
and token limits, the rewards that read the episode, and a 2-step `llmrl train` with tools."""

import json
import re

import pytest
import torch

from llmrl.cli import main
from llmrl.data import Example
from llmrl.compute.logprobs import response_logprobs
from llmrl.rewards import score
from llmrl.rollout import episodes, sampler
from llmrl.rollout.episodes import collect_episodes, encode_observation
from llmrl.rollout.tools import resolve_tools
from llmrl.runio.metrics import read_metrics, sample_records
from scripted import forced_sample_next, scripted_turns


def script_policy(monkeypatch, tok, respond):
    """Every generate call of the episode loop emits respond(context text, row k of the call) then EOS."""
    real = episodes.generate

    def generate(model, prompts, *, group_size=1, **kw):
        contexts = [tok.decode(p) for p in prompts for _ in range(group_size)]
        texts = [respond(c, k) for k, c in enumerate(contexts)]
        scripts = [tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for t in texts]
        def stopped(script, t):                            # EOS, or the text so far completes a tool call
            return script[min(t, len(script) - 1)] == tok.eos_token_id or episodes.CALL_END in tok.decode(script[:t + 1])
        monkeypatch.setattr(sampler, "sample_next", forced_sample_next(scripts, stopped))
        return real(model, prompts, group_size=group_size, **kw)
    monkeypatch.setattr(episodes, "generate", generate)

    def stopped(script, t):
        return script[min(t, len(script) - 1)] == tok.eos_token_id or episodes.CALL_END in tok.decode(script[:t + 1])
    scripted_turns(monkeypatch, tok, respond, stopped)         # the same script on the kept-cache path


# one row per list: the text of each turn (a row is recognised in later turns by its first turn's text)
SCRIPTS = [
    ["I will compute. <tool>calculator: 12*7</tool>", "Answer: 84"],
    ["Answer: 84"],
    ["<tool>calculator: 1/0</tool>", "<tool>calculator: 12*7</tool>", "<tool>calculator: 1+1</tool>"],
    ["<tool>search: 12*7</tool>", "Answer: 85"],
]


def respond(context: str, k: int) -> str:
    turn = context.count("</result>")
    if turn == 0:
        return SCRIPTS[k][0]
    return next(s for s in SCRIPTS if s[0] in context)[turn]


def run_episodes(tiny, monkeypatch, **kw):
    model, tok = tiny
    script_policy(monkeypatch, tok, respond)
    args = dict(group_size=4, max_new_tokens=200, temperature=1.0, tools=resolve_tools(["calculator"]), max_turns=3,
                max_observation_tokens=64)
    return collect_episodes(model, tok, [Example("What is 12 * 7?", "84")], **{**args, **kw})


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_a_scripted_episode_runs_the_tool_and_masks_its_output(tiny, monkeypatch):
    _, tok = tiny
    r = run_episodes(tiny, monkeypatch)
    assert r.extras["tool_calls"].tolist() == [1, 0, 3, 1]
    assert r.extras["turns"].tolist() == [2, 1, 3, 2]
    assert r.extras["tool_errors"].tolist() == [0, 0, 1, 1]          # 1/0, and the unknown tool 'search'
    assert r.extras["truncated"].tolist() == [False] * 4
    assert [e.meta["episode"].answer for e in r.examples] == ["Answer: 84", "Answer: 84", None, "Answer: 85"]
    # row 0: sampled call | observation (tokenized on its own) | sampled answer + EOS
    call, obs, answer = ids(tok, SCRIPTS[0][0]), ids(tok, "\n<result>84</result>\n"), ids(tok, "Answer: 84")
    expected = call + obs + answer + [tok.eos_token_id]
    n, P = len(expected), r.prompt_len
    assert r.response_ids[0, :n].tolist() == expected
    assert r.response_mask[0, :n].tolist() == [1.0] * len(call) + [0.0] * len(obs) + [1.0] * (len(answer) + 1)
    assert r.attention_mask[0, P:P + n].tolist() == [1] * n and r.attention_mask[0, P + n:].sum() == 0
    assert (r.logp_old[0][r.response_mask[0] == 0] == 0).all() and (r.logp_old[0, :len(call)] < 0).all()
    assert r.completions[0] == SCRIPTS[0][0] + "\n<result>84</result>\n" + "Answer: 84"
    # row 2: error observation, then a call cut by the turn limit — not run, nothing appended after it
    text2 = tok.decode(r.response_ids[2][r.attention_mask[2, P:] == 1].tolist())
    assert text2 == ("<tool>calculator: 1/0</tool>\n<result>error: division by zero</result>\n"
                     "<tool>calculator: 12*7</tool>\n<result>84</result>\n<tool>calculator: 1+1</tool>")
    assert "unknown tool 'search'" in r.completions[3]


def test_no_retokenisation_drift(tiny, monkeypatch):
    model, _ = tiny
    r = run_episodes(tiny, monkeypatch, temperature=0.7)
    with torch.no_grad():
        logp, _ = response_logprobs(model, r.input_ids, r.attention_mask, r.response_mask.shape[1], temperature=0.7)
    assert r.response_mask.sum() > 0 and (r.response_mask == 0).logical_and(r.attention_mask[:, r.prompt_len:] == 1).any()
    torch.testing.assert_close(logp * r.response_mask, r.logp_old, atol=1e-5, rtol=0)


def test_rewards_judge_the_final_turn_and_count_calls(tiny, monkeypatch):
    r = run_episodes(tiny, monkeypatch)
    result = score(r.completions, r.examples, [("correct", 1.0, {}), ("tool_efficiency", 0.5, {"free_calls": 0})])
    assert result.components["correct"].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert result.components["tool_efficiency"].tolist() == [0.75, 1.0, 0.0, 0.0]


def test_turn_limit_ends_the_episode_on_a_call(tiny, monkeypatch):
    r = run_episodes(tiny, monkeypatch, max_turns=1)
    assert r.extras["turns"].tolist() == [1, 1, 1, 1] and r.extras["tool_calls"].tolist() == [1, 0, 1, 1]
    assert r.extras["tool_errors"].tolist() == [0, 0, 0, 0]                 # calls past the limit are not run
    assert "<result>" not in "".join(r.completions)
    assert [e.meta["episode"].answer for e in r.examples] == [None, "Answer: 84", None, None]


def test_token_budget_counts_observations(tiny, monkeypatch):
    _, tok = tiny
    r = run_episodes(tiny, monkeypatch, max_new_tokens=50)
    n_call = len(SCRIPTS[0][0])                                               # the 21-token result does not fit
    assert r.response_mask.shape[1] <= 50 and int(r.attention_mask[0, r.prompt_len:].sum()) == n_call
    assert r.extras["truncated"].tolist() == [True, False, True, True]
    r = run_episodes(tiny, monkeypatch, max_new_tokens=10)                   # the first turn itself is cut
    assert r.response_mask.sum(-1).tolist() == [10.0] * 4 and r.extras["truncated"].all()
    assert r.examples[0].meta["episode"].answer == SCRIPTS[0][0][:10]


def test_observation_is_cut_to_fit_and_tokenized_whole(tiny):
    _, tok = tiny
    text, obs = encode_observation(tok, "1234567890" * 10, 40)
    assert len(obs) <= 40 and obs == ids(tok, text) and text.endswith("...</result>\n")
    assert encode_observation(tok, "84", 40)[0] == "\n<result>84</result>\n"
    with pytest.raises(ValueError, match="max_observation_tokens"):
        encode_observation(tok, "84", 10)


def test_sample_records_mark_tool_output_tokens(tiny, monkeypatch):
    _, tok = tiny
    r = run_episodes(tiny, monkeypatch)
    rewards = score(r.completions, r.examples, [("correct", 1.0, {})])
    rows = sample_records(1, r, torch.ones_like(r.response_mask), rewards, tok, groups=1)
    row0 = rows[0]
    assert "".join(row0["tokens"]).startswith(SCRIPTS[0][0] + "\n<result>84</result>\n")
    assert 0 in row0["response_mask"] and row0["response_mask"][-1] == 1
    assert row0["tool_calls"] == 1 and rows[2]["tool_calls"] == 3 and rows[2]["turns"] == 3
    json.dumps(rows)
    # row 2 ends on a call: its last token is the policy's, the observation before it is masked
    assert rows[2]["response_mask"][-1] == 1 and "".join(rows[2]["tokens"]).endswith("</tool>")
    from llmrl.report.html import sample_tokens
    html = sample_tokens(row0, 1.0)                          # the report greys the tool output's tokens
    assert html.count('class="tok obs"') == row0["response_mask"].count(0) > 0


def test_train_two_steps_with_the_calculator(tiny, monkeypatch, tmp_path):
    _, tok = tiny

    def solve(context: str, k: int) -> str:     # calls the calculator on the prompt; even rows then read out its result
        results = re.findall(r"<result>(.*?)</result>", context.rsplit("assistant\n", 1)[-1])   # not the demo's
        if results:
            return f"Answer: {results[-1] if k % 2 == 0 else 0}"
        expression = re.findall(r"What is (.*?)\?", context)[-1]
        return f"<tool>calculator: {expression}</tool>"
    script_policy(monkeypatch, tok, solve)
    code = main(["train", "preset=grpo", "model.name=tiny", "model.autocast=none", "model.system_prompt=Use tools.",
                 "task.heldout_size=4", "rollout.prompts_per_step=2", "rollout.group_size=2",
                 "rollout.max_new_tokens=80", "rollout.tools=[calculator]", "rollout.max_turns=2",
                 "reward.terms=[correct, {name: tool_efficiency, weight: 0.5}]", "run.progress=false",
                 "run.samples_every=1", f"run.output_dir={tmp_path}", "run.name=r", "run.steps=2", "run.eval_every=0"])
    assert code == 0
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    train = [x for x in rows if x["kind"] == "train"]
    evals = [x for x in rows if x["kind"] == "eval"]
    assert len(train) == 2
    for key in ("reward/correct", "reward/tool_efficiency", "tool_calls", "turns", "tool_errors"):
        assert key in train[0], key
    assert train[0]["tool_calls"] == 1.0 and train[0]["turns"] == 2.0 and train[0]["tool_errors"] == 0.0
    assert 0 < train[0]["reward/correct"] < 1                          # the odd rows answer 0
    assert evals[0]["heldout_accuracy"] == 0.5 and evals[0]["heldout_tool_calls"] == 1.0
    samples = [json.loads(line) for line in (tmp_path / "r" / "samples.jsonl").read_text().splitlines()]
    assert samples and all(0 in s["response_mask"] for s in samples)


def test_unknown_tool_is_a_config_error(tmp_path, capsys):
    code = main(["train", "model.name=tiny", "rollout.tools=[calculater]", f"run.output_dir={tmp_path}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rollout.tools[0]" in err and "calculator" in err


def test_eval_with_tools_on_the_command_line(capsys):
    args = ["eval", "--model", "tiny", "--n", "2", "--max-new-tokens", "8", "--autocast", "none"]
    assert main([*args, "--tools", "calculator", "--max-turns", "2"]) == 0
    assert "tool calls per episode 0.00" in capsys.readouterr().out      # the random model never calls
    assert main([*args, "--tools", "calculater"]) == 2
    assert "unknown tool" in capsys.readouterr().err


def test_kept_cache_and_reprefill_give_the_same_episodes(tiny, monkeypatch):
    """The KV cache kept across turns (observations appended to it) gives the rows, masks and log-probs that
    re-prefilling each turn's whole context gives."""
    new = run_episodes(tiny, monkeypatch, temperature=0.7)
    old = run_episodes(tiny, monkeypatch, temperature=0.7, keep_cache=False)
    assert torch.equal(new.input_ids, old.input_ids) and torch.equal(new.response_mask, old.response_mask)
    assert torch.equal(new.attention_mask, old.attention_mask) and new.completions == old.completions
    torch.testing.assert_close(new.logp_old, old.logp_old, atol=1e-5, rtol=0)
    assert new.extras["turns"].tolist() == old.extras["turns"].tolist() == [2, 1, 3, 2]
