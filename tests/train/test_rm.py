"""The reward-model trainer end to end on the tiny model, and scoring with what it saved (`llmrl rm`; the
`reward_model` reward)."""

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from llmrl.models.heads import load_reward_model
from llmrl.rewards.learned import reward_model_scores
from llmrl.runio.metrics import read_metrics
from llmrl.train.rm import train_rm

from preference_files import PAIRS, config, pairs_file  # noqa: F401  (pairs_file: a fixture)


def test_train_rm_and_score(tmp_path, pairs_file):
    summary = train_rm(config(tmp_path, pairs_file, "run.steps=3", "preference.epochs=2", "lora=null"))
    assert summary["steps"] == 3 and "heldout_preference_accuracy" in summary["after"]
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    final = tmp_path / "r" / "final"
    assert AutoModelForSequenceClassification.from_pretrained(final).config.num_labels == 1
    model, tok = load_reward_model(str(final))
    prompts = ["What is 1 + 1?", "a longer prompt, padded less", [{"role": "user", "content": "hi"}]]
    scores = reward_model_scores(model, tok, prompts, ["2", "x", "hello"], batch_size=3)
    assert scores.shape == (3,) and torch.isfinite(scores).all()
    alone = torch.cat([reward_model_scores(model, tok, [p], [c]) for p, c in zip(prompts, ["2", "x", "hello"])])
    assert torch.allclose(scores, alone, atol=1e-5)                  # left padding does not change a score


def test_train_rm_with_lora_merges_before_saving(tmp_path, pairs_file):
    summary = train_rm(config(tmp_path, pairs_file, "run.steps=1", "lora.r=2"))
    model = AutoModelForSequenceClassification.from_pretrained(summary["checkpoint"])
    assert not any("lora" in k or "modules_to_save" in k for k in model.state_dict())
