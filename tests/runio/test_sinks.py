"""Metric sinks: every numeric field of every record reaches TensorBoard (read back with its EventAccumulator) and
Weights & Biases (offline); a resumed run leaves no duplicate events; a sink whose package is missing is a clear
error; the supervised trainers (dpo, rm, prm) get the same `run` fields."""

import sys

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from llmrl.cli import main
from llmrl.config_loader import load_config
from llmrl.config_supervised import PreferenceTrainConfig, PrmTrainConfig
from llmrl.data.pairs import PreferencePair, save_pairs
from llmrl.train.dpo import train_dpo
from llmrl.runio.metrics import read_metrics
from llmrl.runio.sinks import open_metrics, scalars

TINY = ["preset=grpo", "model.name=tiny", "model.autocast=none", "task.heldout_size=6", "rollout.prompts_per_step=2",
        "rollout.group_size=3", "rollout.max_new_tokens=6", "run.progress=false", "run.eval_every=1",
        "run.threads=1", "reward.terms=[{name: format, options: {pattern: '[aeiou]'}}]", "optim.lr=1e-3"]


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def train(tmp_path, *overrides, steps=2):
    return main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=r", f"run.steps={steps}", *overrides])


def events(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_scalars_are_kind_slash_field_at_the_records_step():
    step, values = scalars({"kind": "train", "step": 3, "reward": 0.5, "reward/correct": 1, "ok": True,
                            "note": "x", "kl": float("nan"), "missing": None})
    assert step == 3 and values == {"train/reward": 0.5, "train/reward/correct": 1.0}


def test_tensorboard_gets_every_numeric_field_of_the_metrics(tmp_path):
    assert train(tmp_path, "run.tensorboard=true") == 0
    ev = events(tmp_path / "r")
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    for row in rows:
        step, values = scalars(row)
        for tag, v in values.items():
            assert (step, pytest.approx(v, rel=1e-5, abs=1e-6)) in ev[tag], tag
    assert [s for s, _ in ev["train/reward"]] == [1, 2]
    assert [s for s, _ in ev["eval/heldout_accuracy"]] == [0, 1, 2]


def test_a_resumed_run_leaves_no_duplicate_events(tmp_path):
    assert train(tmp_path, "run.tensorboard=true", "run.save_every=2", steps=3) == 0
    assert train(tmp_path, "run.tensorboard=true", "run.save_every=2", "--resume", steps=3) == 0   # again from 2
    ev = events(tmp_path / "r")
    assert [s for s, _ in ev["train/reward"]] == [1, 2, 3]
    assert [s for s, _ in ev["eval/heldout_accuracy"]] == [0, 1, 2, 3]


def test_tensorboard_off(tmp_path):
    assert train(tmp_path, "run.tensorboard=false", steps=1) == 0
    assert not (tmp_path / "r" / "tensorboard").exists()


def test_wandb_offline_run_holds_the_history(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    assert train(tmp_path, "run.tensorboard=false", "run.wandb_project=llmrl-test", steps=1) == 0
    run_id = (tmp_path / "r" / "wandb_run_id").read_text()
    [log] = (tmp_path / "r" / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")
    data = log.read_bytes()
    for key in (b"train/reward", b"train/loss_policy", b"eval/heldout_accuracy", b"llmrl-test", b"rollout"):
        assert key in data, key                        # history keys, the project, the resolved config


@pytest.mark.parametrize("field, module, message", [
    ("run.wandb_project=p", "wandb", "pip install wandb"),
    ("run.tensorboard=true", "torch.utils.tensorboard", "pip install tensorboard"),
])
def test_a_missing_sink_package_is_a_clear_error(tmp_path, monkeypatch, capsys, field, module, message):
    monkeypatch.setitem(sys.modules, module, None)                      # import fails
    cfg = load_config(None, [*TINY[1:], field, f"run.output_dir={tmp_path}"])
    with pytest.raises(ValueError, match=message):
        open_metrics(cfg, tmp_path)
    assert train(tmp_path, field, steps=1) == 2
    assert message in capsys.readouterr().err


def test_tensorboard_null_means_when_installed(tmp_path, monkeypatch):
    cfg = load_config(None, [*TINY[1:], f"run.output_dir={tmp_path}"])
    assert cfg.run.tensorboard is None
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)   # as if not installed
    log = open_metrics(cfg, tmp_path)
    log.close()
    assert log.sinks == [] and not (tmp_path / "tensorboard").exists()


def test_preference_recipes_take_the_same_run_fields_and_log_to_tensorboard(tmp_path):
    pairs = save_pairs([PreferencePair(f"What is {i} + {i}?", str(2 * i), str(2 * i + 1)) for i in range(6)],
                       tmp_path / "pairs.jsonl")
    cfg = load_config(None, schema=PreferenceTrainConfig, overrides=[
        "model.name=tiny", "model.autocast=none", f"preference.data_path={pairs}", "preference.batch_size=3",
        "preference.heldout_fraction=0.3", "optim.micro_batch_size=3", "run.progress=false", "run.steps=2",
        f"run.output_dir={tmp_path}", "run.name=dpo", "run.tensorboard=true", "run.wandb_project=null"])
    train_dpo(cfg)
    ev = events(tmp_path / "dpo")
    assert [s for s, _ in ev["train/loss_preference"]] == [1, 2] and "eval/heldout_loss_preference" in ev
    prm = load_config(None, ["prm.data_path=x.jsonl", "run.tensorboard=false", "run.wandb_project=p"],
                      schema=PrmTrainConfig)
    assert prm.run.wandb_project == "p" and prm.run.tensorboard is False
