"""End-to-end: the real CLI on the tiny model — a run's files, bad input, failing rewards, Ctrl-C."""

import itertools
import json
import subprocess
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmrl.cli import main
from llmrl.rewards import REWARDS
from llmrl.runio.metrics import read_metrics
from scripted import TINY  # importing scripted also registers the test_vowels reward


_row_calls = itertools.count()


@REWARDS.register("test_explodes_on_odd_rows")
def _explodes(completions, examples):
    """Fails on a whole batch, so the scorer retries row by row; then every second row it is called on gives NaN
    (a count, not the text's hash: that changes with PYTHONHASHSEED and could give a step without a failure)."""
    if len(completions) > 1:
        raise RuntimeError("batch mode broken")
    return [float("nan")] if next(_row_calls) % 2 else [1.0]




def run(tmp_path, *overrides, steps=2):
    return main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=r", f"run.steps={steps}", *overrides])


def test_train_writes_metrics_checkpoint_and_config(tmp_path, capsys):
    assert run(tmp_path) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "before" in out and "after" in out
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 1, 2]
    for key in ("reward", "reward/correct", "reward_failures", "entropy", "clip_fraction", "response_length",
                "tokens_per_s", "time_rollout", "time_update", "grad_norm", "lr"):
        assert key in train[0], key
    assert "kl_to_ref" in train[0]                      # the grpo preset puts a k3 KL term in the loss
    assert {"heldout_accuracy", "heldout_kl_to_ref"} <= evals[0].keys()
    assert evals[0]["heldout_kl_to_ref"] == pytest.approx(0.0, abs=1e-6)   # the policy starts as the reference
    final = tmp_path / "r" / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert model(torch.tensor([[1, 5, 6]])).logits.shape[-1] == model.config.vocab_size
    assert (final / "llmrl_config.yaml").exists() and (tmp_path / "r" / "config.yaml").exists()


def test_failing_reward_is_counted_and_the_run_goes_on(tmp_path):
    terms = "reward.terms=[{name: correct}, {name: test_explodes_on_odd_rows, weight: 0.5}]"
    assert run(tmp_path, terms, steps=1) == 0
    train = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert "reward/test_explodes_on_odd_rows" in train[0]
    assert train[0]["reward_failures"] > 0


def test_config_typo_names_the_key_and_the_valid_ones(tmp_path, capsys):
    assert run(tmp_path, "rollout.group_sise=4") == 2
    err = capsys.readouterr().err
    assert "rollout.group_sise" in err and "group_size" in err and "max_new_tokens" in err
    assert not (tmp_path / "r").exists()                # nothing started


def test_unknown_estimator_is_a_config_error(tmp_path, capsys):
    assert run(tmp_path, "credit.estimator=gpro") == 2
    assert "grpo" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("", "no examples"),
    ('{"prompt": "hi"}\n', "answer"),
    ("not json\n", ":1"),
])
def test_bad_data_file_fails_before_training(tmp_path, capsys, content, message):
    path = tmp_path / "data.jsonl"
    if content is not None:
        path.write_text(content)
    assert run(tmp_path, "task.name=jsonl", f"task.train_path={path}") == 2
    err = capsys.readouterr().err
    assert message in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_prompt_longer_than_the_context_fails_before_training(tmp_path, capsys):
    path = tmp_path / "long.jsonl"
    path.write_text("".join(json.dumps({"prompt": "x" * 600 + str(i), "answer": "1"}) + "\n" for i in range(20)))
    assert run(tmp_path, "task.name=jsonl", f"task.train_path={path}") == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()


def test_ctrl_c_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    import llmrl.train.rules as rules

    real, calls = rules.policy_update, {"n": 0}

    def interrupt_on_second(*a, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(rules, "policy_update", interrupt_on_second)
    assert run(tmp_path, "run.save_every=1", steps=3) == 130
    from llmrl.runio.checkpoint import latest

    assert latest(tmp_path / "r").name == "step-000001"              # complete, and what --resume continues from
    assert not (tmp_path / "r" / "final").exists()


def test_eval_command(capsys):
    assert main(["eval", "--model", "tiny", "--task", "arithmetic", "--n", "4", "--max-new-tokens", "4",
                 "--autocast", "none"]) == 0
    captured = capsys.readouterr()
    assert "accuracy" in captured.out
    assert "evaluating" in captured.err and "acc=0.000" in captured.err and "4/4" in captured.err   # the bar


def test_presets_through_the_installed_entry_point():
    out = subprocess.run([sys.executable, "-m", "llmrl", "presets"], capture_output=True, text=True, check=True).stdout
    assert "grpo" in out and "PPO clip" in out and "reinforce" in out


def test_lora_trains_only_the_adapter_and_saves_a_plain_merged_model(tmp_path):
    from llmrl.models import build_tiny

    terms = "reward.terms=[{name: test_vowels}]"
    assert run(tmp_path, "model.lora_r=4", "optim.lr=0.05", "rollout.temperature=1.5", terms, steps=2) == 0
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals[0]["heldout_kl_to_ref"] == pytest.approx(0.0, abs=1e-6)   # adapter off == policy at the start
    assert evals[-1]["heldout_kl_to_ref"] > 0                               # ... and the adapter moved it
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "r" / "final")
    base, _ = build_tiny(0)
    assert not any("lora" in k for k in merged.state_dict())
    diffs = [not torch.equal(p, base.state_dict()[k]) for k, p in merged.state_dict().items()]
    assert any(diffs)


def test_trpo_with_lora_takes_a_bounded_step(tmp_path):
    terms = "reward.terms=[{name: test_vowels}]"
    assert run(tmp_path, "preset=trpo", "model.lora_r=4", "objective.max_kl=0.005", "rollout.temperature=1.5",
               terms, steps=1) == 0
    train = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert train[0]["trpo_accepted"] == 1.0 and train[0]["trpo_kl"] <= 0.005
    # the same step with Fisher-vector products summed over micro-batches of 1 row (bounded memory)
    assert run(tmp_path / "mb", "preset=trpo", "model.lora_r=4", "objective.max_kl=0.005", "rollout.temperature=1.5",
               terms, "optim.micro_batch_size=1", steps=1) == 0
    split = [r for r in read_metrics(tmp_path / "mb" / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert train[0]["trpo_micro_batches"] == 1 and split[0]["trpo_micro_batches"] > 1
    assert split[0]["trpo_accepted"] == 1.0 and split[0]["trpo_step_fraction"] == train[0]["trpo_step_fraction"]
    assert split[0]["trpo_kl"] == pytest.approx(train[0]["trpo_kl"], rel=1e-3)


def test_time_limit_stops_training_then_evaluates_and_saves(tmp_path):
    assert run(tmp_path, "run.time_limit_minutes=1e-9", "run.eval_every=0", steps=5) == 0
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r for r in rows if r["kind"] == "train"] == []            # the limit had passed before step 1
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 0]  # before, and after at the step reached
    assert (tmp_path / "r" / "final" / "llmrl_config.yaml").exists()


def test_time_limit_does_not_count_held_out_evaluations(tmp_path, monkeypatch):
    """Each held-out evaluation takes 2 minutes of a fake clock against a 1-minute limit: all 3 steps still run,
    because the limit counts training time only. Counting the evaluations would stop the run after step 1."""
    import types

    from llmrl.train import rl

    offset = [0.0]
    real_evaluate = rl.evaluate

    def slow_evaluate(*a, **kw):
        offset[0] += 120.0
        return real_evaluate(*a, **kw)

    monkeypatch.setattr(rl, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
    monkeypatch.setattr(rl, "evaluate", slow_evaluate)
    assert run(tmp_path, "run.time_limit_minutes=1", "run.eval_every=1", steps=3) == 0
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1, 2, 3]
    assert all(r["time_eval"] >= 120 for r in rows if r["kind"] == "eval")
