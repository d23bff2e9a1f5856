"""The DPO trainer end to end on the tiny model: LoRA and full fine-tuning, reference log-probs computed once, pairs
built from a task, micro-batch invariance, the config's errors and layers, and the CLI (`llmrl dpo`, `llmrl pairs`).
Checkpointing, resuming and the time limit: tests/train/test_supervised.py."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import llmrl.train.dpo as dpo_module
from llmrl.cli import main
from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.config_supervised import PreferenceTrainConfig
from llmrl.data.pairs import load_pairs
from llmrl.models import build_tiny
from llmrl.rewards import RewardResult
from llmrl.train.dpo import collate_pairs, pair_logps, train_dpo
from llmrl.train.pairs import encode_pair
from llmrl.runio.metrics import read_metrics

from preference_files import PAIRS, config, pairs_file  # noqa: F401  (pairs_file: a fixture)


def weights_differ(path):
    start, _ = build_tiny(0)
    trained = AutoModelForCausalLM.from_pretrained(path)
    assert type(trained).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in trained.state_dict())
    return any(not torch.equal(a, b) for a, b in zip(start.state_dict().values(), trained.state_dict().values()))


@pytest.mark.parametrize("lora", ["lora.r=4", "lora=null"])
def test_train_dpo_two_steps_writes_a_loadable_checkpoint(tmp_path, pairs_file, lora):
    summary = train_dpo(config(tmp_path, pairs_file, lora, "run.steps=2"))
    run = tmp_path / "r"
    assert summary["steps"] == 2 and summary["train_pairs"] + summary["heldout_pairs"] == len(PAIRS)
    assert summary["heldout_pairs"] > 0
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert {"loss_preference", "preference_accuracy", "reward_margin", "grad_norm", "lr"} <= rows[1].keys()
    before = summary["before"]
    assert before["heldout_reward_margin"] == pytest.approx(0.0, abs=1e-5)     # the policy starts as the reference
    assert before["heldout_loss_preference"] == pytest.approx(torch.log(torch.tensor(2.0)).item(), abs=1e-5)
    assert summary["after"]["heldout_chosen_reward"] != 0.0
    assert weights_differ(run / "final")
    assert (run / "final" / "llmrl_config.yaml").exists() and (run / "summary.yaml").exists()


def test_reference_logps_are_computed_once_and_cached(tmp_path, pairs_file, monkeypatch):
    calls = []
    real = dpo_module.reference_logps

    def counting(*args, **kw):
        calls.append(len(args[1]))
        return real(*args, **kw)

    monkeypatch.setattr(dpo_module, "reference_logps", counting)
    summary = train_dpo(config(tmp_path, pairs_file, "preference.epochs=3", "run.eval_every=1"))
    assert calls == [len(PAIRS)] and summary["steps"] == 3 * 2      # 3 epochs of ceil(train pairs / 3) steps
    cache = torch.load(tmp_path / "r" / "ref_logps.pt")
    model, tok = build_tiny(0)                                      # the reference is the untrained model
    train, held = summary["train_pairs"], summary["heldout_pairs"]
    assert cache["n_train"] == train and cache["n_heldout"] == held
    pairs = load_pairs(tmp_path / "pairs.jsonl")
    by_prompt = {json.dumps(p.prompt): p for p in pairs}
    assert len(by_prompt) == len(PAIRS)
    # the cached numbers are the base model's log-probs of some pair, for every pair
    enc = [encode_pair(tok, p) for p in pairs]
    with torch.no_grad():
        c, r = pair_logps(model, collate_pairs(enc, tok.pad_token_id))
    assert sorted(cache["chosen"].tolist()) == pytest.approx(sorted(c.tolist()), abs=1e-4)
    assert sorted(cache["rejected"].tolist()) == pytest.approx(sorted(r.tolist()), abs=1e-4)


def test_train_dpo_builds_pairs_from_a_task_and_measures_task_accuracy(tmp_path, monkeypatch):
    def alternate(completions, examples, terms):   # stand-in scorer: every prompt gets passing and failing samples
        return RewardResult(total=torch.tensor([float(i % 2) for i in range(len(completions))]), components={},
                            failures={})

    monkeypatch.setattr("llmrl.train.pairs.score", alternate)
    cfg = load_config(None, schema=PreferenceTrainConfig, overrides=[
        "model.name=tiny", "model.autocast=none", "task.name=arithmetic", "task.heldout_size=3",
        "preference.build_prompts=4", "preference.build_samples_per_prompt=2", "preference.build_max_new_tokens=4",
        "preference.kind=ipo", "run.steps=1", "run.progress=false", f"run.output_dir={tmp_path}", "run.name=r"])
    summary = train_dpo(cfg)
    assert len(load_pairs(tmp_path / "r" / "pairs.jsonl")) == 4
    assert summary["train_pairs"] == 3 and summary["heldout_pairs"] == 1
    assert summary["before"]["heldout_accuracy"] == 0.0 and "heldout_accuracy" in summary["after"]
    assert summary["before"]["heldout_kl_to_ref"] == pytest.approx(0.0, abs=1e-6)   # the policy starts as the reference
    assert summary["after"]["heldout_kl_to_ref"] >= 0.0
    assert torch.load(tmp_path / "r" / "ref_logps.pt")["per_token_mean"] is True     # ipo averages per token


# ----------------------------------------------------------------------------- config and CLI

@pytest.mark.parametrize("overrides,message", [
    (["preference.bogus=1"], r"unknown key 'preference.bogus'; valid keys in 'preference': batch_size, beta"),
    (["bogus.x=1"], r"unknown key 'bogus'; valid top-level keys: lora, model, optim, preference, run, task"),
    (["preference.kind=kto", "preference.data_path=x"], r"preference.kind 'kto' is not one of: dpo, ipo"),
    (["preference.beta=0", "preference.data_path=x"], r"preference.beta must be > 0"),
    (["lora.r=0", "preference.data_path=x"], r"lora.r must be >= 1"),
    ([], r"preference.data_path is required unless `task`"),
    (["task.name=jsonl"], r"task.train_path is required"),
    (["preference.kind=ipo", "preference.label_smoothing=0.1", "preference.data_path=x"], "'dpo' only"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides, schema=PreferenceTrainConfig)


def test_config_layers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: {name: arithmetic}\nrun: {threads: 1}\nlora: null\n")
    cfg = load_config(path, ["task.options.digits=3", "lora.r=8"], schema=PreferenceTrainConfig)
    assert cfg.task.options == {"digits": 3} and cfg.run.threads == 1
    assert cfg.run.name == "dpo" and cfg.run.steps == 0           # the section keeps this config's own defaults
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32.0
    assert load_config(path, schema=PreferenceTrainConfig).lora is None


def test_cli_dpo_and_errors(tmp_path, pairs_file, capsys):
    args = ["model.name=tiny", "model.autocast=none", f"preference.data_path={pairs_file}", "run.steps=1",
            "run.progress=false", f"run.output_dir={tmp_path}", "run.name=c", "preference.heldout_fraction=0.3"]
    assert main(["dpo", *args]) == 0
    out = capsys.readouterr().out
    assert "heldout_preference_accuracy" in out and "checkpoint:" in out
    assert main(["dpo", *args, "preference.nope=1"]) == 2
    assert "config error: unknown key 'preference.nope'" in capsys.readouterr().err
    assert main(["rm", *args, "preference.data_path=/no/such.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_cli_pairs(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("llmrl.train.pairs.score", lambda c, e, t: RewardResult(
        total=torch.tensor([float(i % 2) for i in range(len(c))]), components={}, failures={}))
    out = tmp_path / "p.jsonl"
    assert main(["pairs", "--model", "tiny", "--task", "arithmetic", "--n", "3", "--out", str(out),
                 "--samples-per-prompt", "2", "--max-new-tokens", "3", "--autocast", "none"]) == 0
    captured = capsys.readouterr()
    assert len(load_pairs(out)) == 3 and "3 pairs from 3 prompts" in captured.out
    assert "sampling pairs" in captured.err and "pass_rate=0.500" in captured.err     # the progress bar
