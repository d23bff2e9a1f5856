"""Tools for multi-turn episodes: the calculator (safe arithmetic), the sandboxed python tool, the call format,
the sampler's stop strings, and the tool reward terms."""

import pytest
import torch

from llmrl.data import Example
from llmrl.rewards import REWARDS
from llmrl.rollout import sampler
from llmrl.rollout.sampler import StopStrings, generate
from llmrl.rollout.collect import encode_prompt
from llmrl.rollout.tools import (TOOLS, calculator, demonstration, observation_text, parse_call, resolve_tools,
                                 run_call, system_prompt)
from llmrl.rollout.types import Episode
from scripted import forced_sample_next


# ---------------------------------------------------------------- calculator

@pytest.mark.parametrize("expr, out", [
    ("12*7", "84"), ("2 + 3 * 4", "14"), ("(2 + 3) * 4", "20"), ("-5 + 2", "-3"), ("--5", "5"), ("+7", "7"),
    ("7 / 2", "3.5"), ("84 / 2", "42"), ("7 // 2", "3"), ("-7 // 2", "-4"), ("7 % 3", "1"), ("2 ** 10", "1024"),
    ("2^3", "8"), ("1.5 * 4", "6"), ("12 * 7 =", "84"), (" 3×4 ", "12"), ("1/3", "0.333333333333"),
    ("2 ** -1", "0.5"), ("10 ** 100", "1" + "0" * 100),
])
def test_calculator_evaluates_arithmetic(expr, out):
    assert calculator(expr) == out


@pytest.mark.parametrize("expr, says", [
    ("__import__('os').system('echo hi')", "not allowed"),
    ("open('/etc/passwd').read()", "not allowed"),
    ("().__class__.__bases__[0].__subclasses__()", "not allowed"),
    ("x + 1", "not allowed: Name"),
    ("lambda: 1", "not allowed"),
    ("[1, 2]", "not allowed"),
    ("'a' * 3", "not allowed"),
    ("True + 1", "not allowed"),
    ("1 < 2", "not allowed"),
    ("9 ** 9 ** 9", "too large"),
    ("2 ** 100000", "exponent too large"),
    ("10 ** 101", "too large"),
    ("(10 ** 60) * (10 ** 60)", "too large"),
    ("1e308 * 10", "not finite"),
    ("(-8) ** 0.5", "complex"),
    ("1 / 0", "division by zero"),
    ("5 % 0", "division by zero"),
    ("1 +", "not an arithmetic expression"),
    ("", "empty"),
    ("1+" * 150 + "1", "longer than"),
    ("+".join(["1"] * 60), "more than"),
])
def test_calculator_refuses_hostile_or_bad_input_with_an_error_string(expr, says):
    out = calculator(expr)
    assert out.startswith("error:") and says in out, out


def test_calculator_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    out = calculator(f"__import__('pathlib').Path({str(marker)!r}).touch()")
    assert out.startswith("error:") and not marker.exists()


# ---------------------------------------------------------------- python (sandboxed)

def test_python_tool_runs_code_and_returns_its_output():
    assert TOOLS.get("python")("print(12 * 7)") == "84"
    assert TOOLS.get("python")("```python\nx = 3\nprint(x ** 2)\n```") == "9"


def test_python_tool_reports_errors_and_is_contained(tmp_path, monkeypatch):
    from llmrl.rollout import tools
    monkeypatch.setattr(tools, "PYTHON_TIMEOUT_S", 1.0)
    py = TOOLS.get("python")
    out = py("print('before')\n1 / 0")
    assert out.startswith("error: ZeroDivisionError") and "before" in out
    marker = tmp_path / "escaped"
    out = py(f"open({str(marker)!r}, 'w').write('x')\nprint('wrote')")
    assert not marker.exists()              # the sandbox's private tmpfs / other uid: the trainer's files are safe
    out = py("import time\nwhile True: pass")
    assert out.startswith("error:") and ("timeout" in out or "CPU" in out)
    assert py("").startswith("error: no code")


# ---------------------------------------------------------------- call format

def test_parse_call():
    assert parse_call("Let me compute. <tool>calculator: 12*7</tool>") == ("calculator", "12*7")
    assert parse_call("<tool>python:\nprint(1)\n</tool>") == ("python", "print(1)")
    assert parse_call("<tool>a: 1</tool> then <tool>calculator: 2+2</tool>") == ("calculator", "2+2")
    assert parse_call("Answer: 84") is None
    assert parse_call("oops </tool>") == ("", "")


def test_run_call_answers_every_call_with_text():
    tools = resolve_tools(["calculator"])
    assert run_call("calculator", "2+2", tools) == "4"
    assert run_call("search", "cats", tools).startswith("error: unknown tool 'search'")
    assert run_call("", "", tools).startswith("error: unknown tool")
    assert observation_text("4") == "\n<result>4</result>\n"

    def broken(arguments):
        raise RuntimeError("boom")
    assert run_call("broken", "x", {"broken": broken}) == "error: RuntimeError: boom"
    assert len(run_call("long", "", {"long": lambda a: "9" * 10_000})) <= 400


def test_resolve_tools_names_the_valid_ones():
    assert set(resolve_tools(["calculator", "python"])) == {"calculator", "python"}
    with pytest.raises(ValueError, match="unknown tool.*'calc'.*valid: calculator, python"):
        resolve_tools(["calc"])
    with pytest.raises(ValueError, match="twice"):
        resolve_tools(["calculator", "calculator"])


def test_system_prompt_and_demonstration_teach_the_format_for_each_tool(tiny):
    text = system_prompt(["calculator", "python"])
    assert "<tool>calculator: EXPRESSION</tool>" in text and "<tool>python: CODE</tool>" in text and "<result>" in text
    user, assistant = demonstration(["python", "calculator"])
    assert user["role"] == "user" and assistant["role"] == "assistant"
    assert assistant["content"] == "<tool>python: print(12*7)</tool>\n<result>84</result>\nAnswer: 84"
    for name in ("calculator", "python"):          # the demonstrated call really gives the demonstrated result
        call = demonstration([name])[1]["content"].split("\n")[0]
        assert run_call(*parse_call(call), resolve_tools([name])) == "84"
    assert demonstration([]) == []
    _, tok = tiny
    ids = encode_prompt(tok, "What is 1 + 1?", system_prompt="S", demo=demonstration(["calculator"]))
    assert tok.decode(ids).count("<|im_start|>") == 5 and "<result>84</result>" in tok.decode(ids)


# ---------------------------------------------------------------- stop strings in the sampler

def test_generate_stops_a_row_at_a_stop_string(tiny, monkeypatch):
    model, tok = tiny
    texts = ["ab <tool>calculator: 1+1</tool> never", "no call here at all, just text"]
    scripts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    monkeypatch.setattr(sampler, "sample_next",
                        forced_sample_next(scripts, lambda script, t: "</tool>" in tok.decode(script[:t + 1])))
    prompt = tok("Q:", add_special_tokens=False)["input_ids"]
    s = generate(model, [prompt, prompt], max_new_tokens=40, temperature=1.0, stop_ids=(tok.eos_token_id,),
                 pad_id=tok.pad_token_id, stop_strings=("</tool>",), tokenizer=tok)
    n = s.response_mask.sum(-1).long().tolist()
    assert n[0] == len("ab <tool>calculator: 1+1</tool>") and n[1] == 40
    assert tok.decode(s.response_ids[0, :n[0]].tolist()).endswith("</tool>")
    assert s.truncated.tolist() == [False, True]
    assert (s.response_ids[0, n[0]:] == tok.pad_token_id).all() and (s.logp[0, n[0]:] == 0).all()


def test_stop_strings_match_only_the_recent_tail():
    class Tok:     # one token = one word, decoded joined: a token may hold a whole stop string and more
        vocab = ["x", "</tool>\n", "</to", "ol>", "y"]

        def batch_decode(self, rows):
            return ["".join(self.vocab[i] for i in r) for r in rows]
    stop = StopStrings(Tok(), ("</tool>",))
    assert stop(torch.tensor([[0, 1], [2, 3], [0, 4], [3, 0]])).tolist() == [True, True, False, False]
    with pytest.raises(ValueError):
        StopStrings(Tok(), ("",))


def test_generate_without_stop_strings_is_unchanged(tiny):
    model, tok = tiny
    kw = dict(max_new_tokens=12, temperature=1.0, stop_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id)
    a = generate(model, [[5, 6, 7]], group_size=2, generator=torch.Generator().manual_seed(3), **kw)
    b = generate(model, [[5, 6, 7]], group_size=2, generator=torch.Generator().manual_seed(3),
                 stop_strings=("\x00never",), tokenizer=tok, **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.equal(a.logp, b.logp)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[5]], stop_strings=("x",), **kw)


# ---------------------------------------------------------------- rewards that read the episode

def row(answer_text: str | None, calls: int, errors: int = 0, gold: str = "84") -> Example:
    return Example("What is 12 * 7?", gold, {"episode": Episode(calls, calls + 1, errors, answer_text)})


def test_correct_judges_the_final_answer_not_a_tool_output():
    transcript = "<tool>calculator: 12*7</tool>\n<result>84</result>\n"
    correct = REWARDS.get("correct")
    # the transcript's last number is the tool's 84, but the model never answered (it ended on a call)
    assert correct([transcript], [row(None, 1)]) == [0.0]
    assert correct([transcript + "I am not sure."], [row("I am not sure.", 1)]) == [0.0]
    assert correct([transcript + "Answer: 84"], [row("Answer: 84", 1)]) == [1.0]
    assert correct(["Answer: 84"], [Example("q", "84")]) == [1.0]                  # single-turn: unchanged
    assert REWARDS.get("format")([transcript], [row(None, 1)]) == [0.0]


def test_tool_efficiency_rewards_solving_with_few_calls():
    eff = REWARDS.get("tool_efficiency")
    rows = [row("Answer: 84", 0), row("Answer: 84", 1), row("Answer: 84", 2), row("Answer: 84", 3),
            row("Answer: 84", 9), row("Answer: 5", 0), row(None, 1), row("Answer: 84", 2, errors=1)]
    assert eff([""] * 8, rows) == [1.0, 1.0, 0.75, 0.5, 0.0, 0.0, 0.0, 0.75]
    assert eff([""] * 2, rows[2:4], free_calls=0, cost_per_call=0.1) == pytest.approx([0.8, 0.7])
    assert eff([""], rows[7:], cost_per_error=0.5) == [0.25]
    assert eff(["Answer: 84"], [Example("q", "84")]) == [1.0]                      # single-turn: 0 calls
    with pytest.raises(ValueError):
        eff([""], rows[:1], cost_per_call=-1)


# ---------------------------------------------------------------- config

def test_tool_config_fields_are_checked():
    from llmrl.config import ConfigError, validate_names
    from llmrl.config_loader import load_config

    cfg = load_config(None, ["rollout.tools=[calculator, python]", "rollout.max_turns=2"])
    assert cfg.rollout.tools == ["calculator", "python"] and cfg.rollout.max_turns == 2
    assert load_config(None).rollout.tools == []                               # single-turn by default
    names = dict(rewards=["correct"], credit=["grpo"], objectives=["ppo_clip"], tools=TOOLS.names())
    validate_names(cfg, **names)
    with pytest.raises(ConfigError, match=r"rollout.tools\[1\] 'pyton' is not one of: calculator, python"):
        validate_names(load_config(None, ["rollout.tools=[calculator, pyton]"]), **names)
    with pytest.raises(ConfigError, match="twice"):
        load_config(None, ["rollout.tools=[calculator, calculator]"])
    with pytest.raises(ConfigError, match="rollout.max_turns must be >= 1"):
        load_config(None, ["rollout.max_turns=0"])
    with pytest.raises(ConfigError, match="rollout.tools must be a list"):
        load_config(None, ["rollout.tools=calculator"])
