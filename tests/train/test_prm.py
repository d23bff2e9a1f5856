"""Process reward models (llmrl.train.prm, models.heads, data.step_labels, rewards.learned): step-labelled data and its
errors, Math-Shepherd labels, the loss at each step's last token, training on a learnable toy rule, save/load, the
`prm` step reward, the config, the CLI. Checkpointing, resuming and the time limit: tests/train/test_supervised.py."""

import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForTokenClassification

import llmrl.train.prm as prm_module
from llmrl.cli import main
from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.config_supervised import PrmTrainConfig
from llmrl.data import make_task
from llmrl.data.step_labels import load_step_labels, save_step_labels
from llmrl.models import save_pretrained_model
from llmrl.models.heads import load_prm, step_logits
from llmrl.rewards.learned import encode_steps, prm_step_scores
from llmrl.rewards import REWARDS, RewardResult
from llmrl.rewards.process import score_steps
from llmrl.runio.metrics import read_metrics
from llmrl.train.prm import build_step_labels, train_prm


def load_prm_config(path=None, overrides=()):
    return load_config(path, overrides, schema=PrmTrainConfig)


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these tiny models run faster so, and on a shared machine far faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


ROWS = [{"prompt": "What is 2 + 2?", "steps": ["2 + 2 = 4\n\n", "Answer: 4"], "labels": [1, 1]},
        {"prompt": "What is 3 * 3?", "steps": ["3 * 3 = 6\n\n", "Answer: 6"], "labels": [0, 0.25], "source": "hand"}]


def z_rows(n: int, seed: int = 0) -> list[dict]:
    """A learnable toy rule: a step is good iff it contains the letter z."""
    rng = random.Random(seed)

    def step(good):      # e.g. "bzfa " (good) or "cdah " (bad)
        w = [rng.choice("abcdefgh") for _ in range(rng.randint(3, 6))]
        if good:
            w.insert(rng.randrange(len(w) + 1), "z")
        return "".join(w) + " "

    out = []
    for i in range(n):
        good = [rng.random() < 0.5 for _ in range(rng.randint(2, 4))]
        out.append({"prompt": f"q{i}", "steps": [step(g) for g in good], "labels": [int(g) for g in good]})
    return out


def config(tmp_path, data, *overrides):
    return load_prm_config(None, [
        "model.name=tiny", "model.autocast=none", f"prm.data_path={data}", "prm.heldout_fraction=0.25",
        "prm.batch_size=8", "optim.micro_batch_size=8", "optim.lr=3e-3", "run.progress=false",
        f"run.output_dir={tmp_path}", "run.name=r", *overrides])


# ----------------------------------------------------------------------------- data

def test_step_labels_round_trip_and_empty_or_missing_files(tmp_path):
    path = save_step_labels(ROWS, tmp_path / "d" / "labels.jsonl")
    assert load_step_labels(path) == ROWS
    assert list(json.loads(path.read_text().splitlines()[1])) == ["prompt", "steps", "labels", "source"]
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.jsonl is empty"):
        load_step_labels(tmp_path / "empty.jsonl")
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_step_labels(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("line, message", [
    ("{not json", r":2: not valid JSON"),
    ("[1, 2]", r":2: each line must be a JSON object"),
    ('{"prompt": "p", "steps": ["a"]}', r":2: missing key 'labels'"),
    ('{"steps": ["a"], "labels": [1]}', r":2: missing key 'prompt'"),
    ('{"prompt": 3, "steps": ["a"], "labels": [1]}', r":2: 'prompt' must be a string"),
    ('{"prompt": "p", "steps": [], "labels": []}', r":2: 'steps' must be a non-empty list of non-empty strings"),
    ('{"prompt": "p", "steps": ["a", ""], "labels": [1, 1]}', r":2: 'steps' must be a non-empty list"),
    ('{"prompt": "p", "steps": "a", "labels": [1]}', r":2: 'steps' must be a non-empty list"),
    ('{"prompt": "p", "steps": ["a", "b"], "labels": [1]}', r":2: 'steps' and 'labels' lengths differ \(2 steps"),
    ('{"prompt": "p", "steps": ["a"], "labels": 1}', r":2: 'steps' and 'labels' lengths differ"),
    ('{"prompt": "p", "steps": ["a"], "labels": [1.5]}', r":2: labels\[0\] must be 0, 1 or a probability"),
    ('{"prompt": "p", "steps": ["a"], "labels": [true]}', r":2: labels\[0\] must be"),
    ('{"prompt": "p", "steps": ["a"], "labels": ["1"]}', r":2: labels\[0\] must be"),
    ('{"prompt": "p", "steps": ["a"], "labels": [NaN]}', r":2: labels\[0\] must be"),
])
def test_bad_step_labels_name_the_line(tmp_path, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=message):
        load_step_labels(path)


# ----------------------------------------------------------------------------- Math-Shepherd labels

@REWARDS.register("test_prm_has_vowel")
def _has_vowel(completions, examples):   # a stand-in scorer: the tiny model never answers arithmetic right
    return [float(any(v in c for v in "aeiouAEIOU")) for c in completions]


def test_labels_are_the_completion_rates_after_each_step(tiny, monkeypatch):
    model, tok = tiny
    seen = {}
    real_mc = prm_module.monte_carlo_values

    def recording_mc(model, tokenizer, rollout, boundaries, score, **kw):
        values, stats = real_mc(model, tokenizer, rollout, boundaries, score, **kw)
        seen.update(values=values, boundaries=boundaries, completions=rollout.completions, samples=kw["samples"])
        return values, stats

    monkeypatch.setattr(prm_module, "monte_carlo_values", recording_mc)
    rows = build_step_labels(model, tok, make_task("arithmetic"), 2, samples_per_prompt=3, mc_samples=4,
                             segmenter="regex", pattern="[ 0-9]", max_new_tokens=12, batch_prompts=2, seed=1,
                             reward_terms=[("test_prm_has_vowel", 1.0, {})])
    assert seen["samples"] == 4 and len(rows) == 6              # every tiny response has a step here
    values, boundaries = seen["values"], seen["boundaries"]
    assert len({values[i, t].item() for i, b in enumerate(boundaries) for t in b}) > 2   # a shifted label would show
    for i, row in enumerate(rows):
        starts = boundaries[i]
        outcome = _has_vowel([seen["completions"][i]], None)[0]
        expected = [values[i, t].item() for t in starts[1:]] + [outcome]   # V(before step s+1), then the outcome
        assert row["labels"] == row["completion_rates"] == pytest.approx(expected)
        assert "".join(row["steps"]) == seen["completions"][i] and len(row["steps"]) == len(starts)
        assert row["answer"] and row["prompt"].startswith("What is")


def test_hard_labels_say_whether_any_completion_succeeds(tiny, monkeypatch):
    model, tok = tiny

    def fake_mc(model, tokenizer, rollout, boundaries, score, **kw):   # V(before step s) = [0.5, 0.0, 0.25, 0.0, ...]
        values = torch.zeros(rollout.response_mask.shape)
        for i, starts in enumerate(boundaries):
            values[i, starts] = torch.tensor([0.5, 0.0, 0.25, 0.0] * 8)[:len(starts)]
        return values, {}

    monkeypatch.setattr(prm_module, "monte_carlo_values", fake_mc)
    monkeypatch.setattr(prm_module, "score", lambda c, e, t: RewardResult(torch.ones(len(c)), {}, {}))
    kw = dict(samples_per_prompt=2, mc_samples=1, segmenter="regex", pattern="[ 0-9]", max_new_tokens=10)
    soft = build_step_labels(model, tok, make_task("arithmetic"), 1, labels="soft", **kw)
    hard = build_step_labels(model, tok, make_task("arithmetic"), 1, labels="hard", **kw)
    for s, h in zip(soft, hard):
        S = len(s["steps"])
        assert s["labels"] == ([0.0, 0.25, 0.0, 0.5] * 4)[:S - 1] + [1.0]     # shifted by one step, then the outcome
        assert h["labels"] == [float(x > 0) for x in s["labels"]] and h["completion_rates"] == s["labels"]
    with pytest.raises(ValueError, match="labels='mean'"):
        build_step_labels(model, tok, make_task("arithmetic"), 1, labels="mean", **kw)


# ----------------------------------------------------------------------------- the model

def test_logits_are_read_at_each_steps_last_token(tiny):
    _, tok = tiny
    model, _ = load_prm("tiny")
    ids, ends = encode_steps(tok, "hi", ["ab", "", "cde"])
    P = len(encode_steps(tok, "hi", [])[0])
    assert ends == [P + 1, -1, P + 4] and len(ids) == P + 5 and ids[P:] == tok("abcde")["input_ids"]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits[0, :, 0]
        short = encode_steps(tok, "a much longer prompt than the other", ["x"])
        got = step_logits(model, [(ids, ends), short], tok.pad_token_id)      # row 0 is right-padded here
    torch.testing.assert_close(got[0][[0, 2]], full[[P + 1, P + 4]], rtol=0, atol=1e-5)
    assert math.isnan(got[0][1]) and got[1].shape == (1,)


def test_load_prm_is_a_llama_token_classifier_and_round_trips(tmp_path):
    model, tok = load_prm("tiny")
    assert type(model).__name__ == "LlamaForTokenClassification" and model.config.num_labels == 1
    torch.nn.init.normal_(model.score.weight, std=1.0)
    prompts, steps = ["What is 2 + 2?", "q"], [["2 + 2 = 4\n", "Answer: 4"], ["x", "", "y"]]
    scores = prm_step_scores(model, tok, prompts, steps, batch_size=2)
    assert [len(s) for s in scores] == [2, 3] and math.isnan(scores[1][1])
    assert all(0 < p < 1 for row in scores for p in row if not math.isnan(p))
    alone = [prm_step_scores(model, tok, [p], [s])[0] for p, s in zip(prompts, steps)]
    close = lambda a, b: all(math.isnan(x) and math.isnan(y) or abs(x - y) < 1e-6 for x, y in zip(a, b))  # noqa
    assert all(close(x, y) for x, y in zip(scores, alone))                     # padding does not change a score
    path = save_pretrained_model(model, tok, tmp_path / "prm")
    again, tok2 = load_prm(str(path))
    assert all(close(x, y) for x, y in zip(prm_step_scores(again, tok2, prompts, steps), scores))


# ----------------------------------------------------------------------------- training

def test_train_prm_learns_a_step_rule(tmp_path):
    data = save_step_labels(z_rows(64), tmp_path / "z.jsonl")
    summary = train_prm(config(tmp_path, data, "prm.epochs=5"))
    b, a = summary["before"], summary["after"]
    assert summary["steps"] == 5 * 6 and summary["train_examples"] == 48 and summary["heldout_examples"] == 16
    chance = max(a["heldout_good_fraction"], 1 - a["heldout_good_fraction"])
    assert a["heldout_step_accuracy"] > chance + 0.2 and a["heldout_step_accuracy"] > b["heldout_step_accuracy"]
    assert a["heldout_loss_bce"] < b["heldout_loss_bce"] - 0.2
    assert a["heldout_p_good_steps"] > a["heldout_p_bad_steps"] + 0.2
    train = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    losses = [r["loss_bce"] for r in train]
    assert [r["step"] for r in train] == list(range(1, 31)) and sum(losses[-5:]) < sum(losses[:5]) - 1.0
    final = AutoModelForTokenClassification.from_pretrained(summary["checkpoint"])
    assert type(final).__name__ == "LlamaForTokenClassification" and final.config.num_labels == 1
    # the `prm` step reward reads the saved model: one P(good) per step, good steps above bad ones on new data
    held = z_rows(16, seed=1)                                   # new responses: never trained on
    x, failures = score_steps("prm", ["".join(r["steps"]) for r in held], [r["steps"] for r in held],
                              [make_task("arithmetic").heldout(1)[0]] * 16, {"path": summary["checkpoint"]})
    assert failures == 0 and x.shape == (16, 4)
    assert (~torch.isnan(x)).sum(1).tolist() == [len(r["steps"]) for r in held]
    labels = torch.tensor([y for r in held for y in r["labels"]], dtype=torch.bool)
    p = x[~torch.isnan(x)]
    assert p[labels].mean() > p[~labels].mean() + 0.2


def test_micro_batches_do_not_change_the_step(tmp_path):
    data = save_step_labels(z_rows(16), tmp_path / "z.jsonl")
    runs = []
    for mb in (8, 3):
        train_prm(config(tmp_path, data, "run.steps=1", f"optim.micro_batch_size={mb}", f"run.name=mb{mb}"))
        runs.append([r for r in read_metrics(tmp_path / f"mb{mb}" / "metrics.jsonl") if r["kind"] == "train"][0])
    assert runs[0]["loss_bce"] == pytest.approx(runs[1]["loss_bce"], abs=2e-6)
    assert runs[0]["grad_norm"] == pytest.approx(runs[1]["grad_norm"], rel=1e-4)


def test_max_length_cuts_the_steps_past_it(tiny, tmp_path):
    _, tok = tiny
    data = save_step_labels(ROWS, tmp_path / "d.jsonl")
    P = len(encode_steps(tok, ROWS[0]["prompt"], [])[0])      # both prompts: 14 chars, both first steps: 11
    kw = ("run.steps=1", "prm.heldout_fraction=0")
    assert train_prm(config(tmp_path, data, *kw))["train_labelled_steps"] == 4
    assert train_prm(config(tmp_path, data, *kw, f"prm.max_length={P + 11}"))["train_labelled_steps"] == 2
    with pytest.raises(ValueError, match="no training steps"):                 # the first step's last token is cut
        train_prm(config(tmp_path, data, *kw, f"prm.max_length={P + 10}"))


def test_train_prm_with_lora_saves_a_plain_model(tmp_path):
    summary = train_prm(config(tmp_path, save_step_labels(ROWS * 2, tmp_path / "d.jsonl"), "run.steps=1", "lora.r=2"))
    saved = load_file(f"{summary['checkpoint']}/model.safetensors")
    assert not any("lora" in k or "modules_to_save" in k or "base_layer" in k for k in saved)
    start, _ = load_prm("tiny")                                  # the adapter's update is merged into the weights
    key = "model.layers.0.self_attn.q_proj.weight"
    assert saved[key].shape == start.state_dict()[key].shape and not torch.equal(saved[key], start.state_dict()[key])


# ----------------------------------------------------------------------------- config and CLI

@pytest.mark.parametrize("overrides, message", [
    ([], r"prm.data_path is required unless `task`"),
    (["prm.bogus=1"], r"unknown key 'prm.bogus'; valid keys in 'prm': batch_size"),
    (["bogus.x=1"], r"unknown key 'bogus'; valid top-level keys: lora, model, optim, prm, run, task"),
    (["prm.data_path=x", "prm.labels=mean"], r"prm.labels 'mean' is not one of: soft, hard"),
    (["prm.data_path=x", "prm.steps=lines"], r"prm.steps 'lines' is not one of: blank_line, numbered, regex"),
    (["prm.data_path=x", "prm.steps=regex"], r"prm.steps=regex needs prm.step_pattern"),
    (["prm.data_path=x", "prm.build_mc_samples=0"], r"prm.build_mc_samples must be >= 1"),
    (["task.name=jsonl"], r"task.train_path is required"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_prm_config(None, overrides)


def test_config_layers(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("task: {name: arithmetic, options: {ops: ['+']}}\nprm: {labels: hard}\noptim: {lr: 0.1}\n")
    cfg = load_prm_config(path, ["task.options.digits=3", "lora.r=8", "prm.epochs=2"])
    assert cfg.task.options == {"ops": ["+"], "digits": 3} and cfg.prm.labels == "hard" and cfg.prm.epochs == 2
    assert cfg.optim.lr == 0.1 and cfg.optim.micro_batch_size == 8             # this config's own defaults stay
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32.0 and cfg.run.name == "prm"
    assert load_prm_config(path).lora is None and load_prm_config(path, ["task=null", "prm.data_path=x"]).task is None
    cfg = load_prm_config(Path(__file__).parents[2] / "examples" / "prm_arithmetic.yaml")      # the example
    assert cfg.model.name == "smollm2-135m-instruct" and cfg.prm.data_path is None and cfg.lora is None
    assert cfg.prm.steps == "regex" and cfg.run.name == "prm_arithmetic"
    assert next(make_task(cfg.task.name, options=cfg.task.options).train_stream(0)).prompt.count("+") == 2


def test_cli_prm_and_prm_data(tmp_path, monkeypatch, capsys):
    data = save_step_labels(z_rows(8), tmp_path / "z.jsonl")
    args = ["model.name=tiny", "model.autocast=none", f"prm.data_path={data}", "run.steps=1", "run.progress=false",
            f"run.output_dir={tmp_path}", "run.name=c", "prm.heldout_fraction=0.3"]
    assert main(["prm", *args]) == 0
    out = capsys.readouterr().out
    assert "heldout_step_accuracy" in out and "1 steps on 6 examples (2 held out)" in out and "checkpoint:" in out
    assert main(["prm", *args, "prm.nope=1"]) == 2
    assert "config error: unknown key 'prm.nope'" in capsys.readouterr().err
    assert main(["prm", *args, "prm.data_path=/no/such.jsonl"]) == 2
    assert "no such file" in capsys.readouterr().err
    monkeypatch.setattr(prm_module, "score", lambda c, e, t: RewardResult(torch.ones(len(c)), {}, {}))
    monkeypatch.setattr(prm_module, "monte_carlo_values",
                        lambda m, t, r, starts, score, **kw: (torch.full(r.response_mask.shape, 0.5), {}))  # all 0.5
    out_file = tmp_path / "labels.jsonl"
    assert main(["prm-data", "--model", "tiny", "--task", "arithmetic", "--n", "2", "--out", str(out_file),
                 "--samples-per-prompt", "2", "--mc-samples", "1", "--max-new-tokens", "6", "--autocast", "none",
                 "--steps", "regex", "--step-pattern", "[ 0-9]", "--labels", "hard"]) == 0
    rows = load_step_labels(out_file)
    captured = capsys.readouterr()
    assert f"{len(rows)} responses" in captured.out and any(len(r["steps"]) > 1 for r in rows)
    assert "labelling steps" in captured.err and "reward=1.000" in captured.err       # the progress bar
    assert all(r["labels"] == [1.0] * len(r["steps"]) for r in rows)                # hard: rate 0.5 > 0
    assert main(["prm-data", "--model", "tiny", "--task", "arithmetic", "--n", "1", "--out", str(out_file),
                 "--steps", "regex"]) == 2
    assert "--step-pattern" in capsys.readouterr().err
