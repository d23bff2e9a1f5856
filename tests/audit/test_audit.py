"""`llmrl audit`: each detector fires on a planted trend and stays quiet on a clean run (and on the trend's mirror
image, which would catch a sign error); thresholds; the CLI's exit codes, printout and report section."""

import json
import math
import random

import pytest

from llmrl.audit import DETECTORS, audit_run, load_run, resolve_options
from llmrl.audit.detectors import RunData, trend_start
from llmrl.cli import main
from run_folders import write_run

N = 40


def clean(seed: int = 0) -> list[dict]:
    """40 healthy train steps: reward and components creeping up, everything else flat, with seeded noise."""
    rng = random.Random(seed)
    return [{"kind": "train", "step": s, "reward": 0.4 + 0.005 * s + rng.gauss(0, 0.01),
             "reward/correct": 0.4 + 0.005 * s + rng.gauss(0, 0.01), "reward/format": 0.9 + rng.gauss(0, 0.005),
             "response_length": 12 + rng.gauss(0, 0.3), "truncated_fraction": 0.02 + abs(rng.gauss(0, 0.005)),
             "entropy": 0.7 + rng.gauss(0, 0.01), "kl_to_ref": 0.01 * math.sqrt(s) + abs(rng.gauss(0, 0.0005)),
             "zero_variance_group_fraction": 0.4 + rng.gauss(0, 0.03)} for s in range(1, N + 1)]


def planted(key: str, fn, seed: int = 0) -> list[dict]:
    """The clean run with `key` replaced by fn(step)."""
    return [{**r, key: fn(r["step"])} for r in clean(seed)]


EVALS_UP = [{"kind": "eval", "step": s, "heldout_accuracy": a} for s, a in zip(range(0, 41, 10), (.3, .4, .5, .55, .6))]


def run(train=None, evals=EVALS_UP, samples=(), weights=None) -> RunData:
    return RunData(train=clean() if train is None else train, evals=list(evals), samples=list(samples),
                   weights=weights or {"correct": 1.0, "format": 0.1})


def detect(name: str, data: RunData, **kw):
    return DETECTORS.get(name)(data, **resolve_options({name: kw})[name])


def test_every_detector_is_quiet_on_a_clean_run():
    assert len(DETECTORS.names()) == 9
    assert audit_run(run()) == []


def test_reward_rising_while_heldout_falls():
    falling = [{"kind": "eval", "step": s, "heldout_accuracy": a} for s, a in zip(range(0, 41, 10),
                                                                                  (.50, .55, .50, .42, .35))]
    f = detect("reward_vs_heldout", run(evals=falling))
    assert f and f.step == 10 and f.value == pytest.approx(0.20) and "0.550 -> 0.350" in f.message
    mirrored = planted("reward", lambda s: 0.8 - 0.01 * s)          # reward falling with the accuracy: no hacking
    assert detect("reward_vs_heldout", run(train=mirrored, evals=falling)) is None
    assert detect("reward_vs_heldout", run(evals=falling), min_drop=0.25) is None


def test_one_component_dominating_the_reward_rise():
    gamed = [{**r, "reward/correct": 0.4, "reward/length_bonus": 0.1 + 0.02 * r["step"]} for r in clean()]
    weights = {"correct": 1.0, "format": 0.1, "length_bonus": 0.5}
    f = detect("component_dominance", run(train=gamed, weights=weights))
    assert f and "'length_bonus'" in f.message and f.value > 0.95
    assert 1 <= f.step <= 10                                          # the bonus climbs from the first step
    assert detect("component_dominance", run(train=gamed, weights=weights), allow=["correct", "length_bonus"]) is None
    down = [{**r, "reward/correct": 0.9 - 0.02 * r["step"]} for r in gamed]   # the weighted reward falls overall
    assert detect("component_dominance", run(train=down, weights=weights)) is None
    only_correct = [{k: v for k, v in r.items() if k != "reward/format"} for r in clean()]
    assert detect("component_dominance", run(train=only_correct)) is None       # one component: nothing to compare


def test_length_drift_both_ways_from_where_it_starts():
    grow = planted("response_length", lambda s: 12 if s <= 20 else 12 + (s - 20) * 1.0)
    f = detect("length_drift", run(train=grow))
    assert f and "grew" in f.message and f.value > 1.5 and 20 <= f.step <= 27
    collapse = planted("response_length", lambda s: 20 * math.exp(-s / 8))
    f = detect("length_drift", run(train=collapse))
    assert f and "shrank" in f.message and f.value < 0.25 and f.threshold == 0.25
    concise = planted("response_length", lambda s: 26 - 0.35 * s)      # answers get shorter as the policy learns
    assert detect("length_drift", run(train=concise)) is None
    assert detect("length_drift", run(train=grow), max_ratio=3) is None


def test_truncation_growth():
    f = detect("truncation_growth", run(train=planted("truncated_fraction", lambda s: 0.0125 * s)))
    assert f and f.value >= 0.4 and "rose" in f.message
    assert detect("truncation_growth", run(train=planted("truncated_fraction", lambda s: 0.3))) is None    # flat
    assert detect("truncation_growth", run(train=planted("truncated_fraction", lambda s: 0.5 - 0.0125 * s))) is None


def test_entropy_collapse():
    f = detect("entropy_collapse", run(train=planted("entropy", lambda s: 0.9 * math.exp(-s / 6))))
    assert f and f.value < 0.1 and f.step <= 8
    assert detect("entropy_collapse", run(train=planted("entropy", lambda s: 0.9 - 0.01 * s))) is None
    assert detect("entropy_collapse", run(train=planted("entropy", lambda s: 0.05 + 0.02 * s))) is None


def test_kl_accelerating_starts_at_the_knee():
    knee = planted("kl_to_ref", lambda s: 0.002 * s + (0.02 * (s - 25) ** 1.5 if s > 25 else 0))
    f = detect("kl_accelerating", run(train=knee))
    assert f and 22 <= f.step <= 30 and f.value >= 2
    assert detect("kl_accelerating", run(train=planted("kl_to_ref", lambda s: 0.01 * s))) is None       # linear
    assert detect("kl_accelerating", run(train=planted("kl_to_ref", lambda s: 0.3 * math.sqrt(s)))) is None
    evals = [{"kind": "eval", "step": s, "heldout_kl_to_ref": k} for s, k in zip(range(0, 41, 10), (0, .1, .2, 1, 3))]
    no_train_kl = [{k: v for k, v in r.items() if k != "kl_to_ref"} for r in clean()]
    f = detect("kl_accelerating", run(train=no_train_kl, evals=evals))
    assert f and "heldout_kl_to_ref" in f.message


def group(step: int, g: int, rewards, texts):
    return [{"step": step, "group": g, "reward": r, "completion": t} for r, t in zip(rewards, texts)]


def test_zero_variance_groups_from_the_metric_or_the_samples():
    f = detect("zero_variance_groups",
               run(train=planted("zero_variance_group_fraction", lambda s: min(1, 0.3 + s / 40))))
    assert f and f.value > 0.9
    assert detect("zero_variance_groups", run(train=planted("zero_variance_group_fraction", lambda s: 0.6))) is None
    no_metric = [{k: v for k, v in r.items() if k != "zero_variance_group_fraction"} for r in clean()]
    same = [row for s in range(5, 41, 5) for g in range(2) for row in
            group(s, g, [1.0] * 4 if s > 20 else [0, 1, 0, 1], "abcd")]
    assert detect("zero_variance_groups", run(train=no_metric, samples=same))
    mixed = [row for s in range(5, 41, 5) for g in range(2) for row in group(s, g, [0, 1, 0, 1], "abcd")]
    assert detect("zero_variance_groups", run(train=no_metric, samples=mixed)) is None


def test_duplicate_completions_within_groups():
    dup = [row for s in range(5, 41, 5) for g in range(2) for row in
           group(s, g, [0, 1, 0, 1], ["same"] * 4 if s >= 30 else ["a", "b", "c", "d"])]
    f = detect("duplicate_completions", run(samples=dup))
    assert f and f.value == pytest.approx(0.75) and f.step == 30
    across = [row for s in range(5, 41, 5) for g in range(2)
              for row in group(s, g, [0, 1, 0, 1], [f"g{g}"] + list("bcd"))]
    assert detect("duplicate_completions", run(samples=across)) is None   # the same text in two groups is fine


def evals_collapsing(top: list[float], acc: float, const: float) -> list[dict]:
    return [{"kind": "eval", "step": 10 * i, "heldout_accuracy": acc if i else 0.1, "heldout_top_answer_share": t,
             "heldout_constant_answer_accuracy": const} for i, t in enumerate(top)]


def test_constant_answer_collapse_at_the_last_evaluation():
    collapsed = evals_collapsing([0.05, 0.5, 0.95, 1.0], acc=0.72, const=0.72)      # "Answer: Yes" to every prompt
    f = detect("constant_answer", run(evals=collapsed))
    assert f and f.step == 20 and f.value == 1.0 and "0.720 against 0.720" in f.message
    learned = evals_collapsing([0.05, 0.5, 0.95, 1.0], acc=0.90, const=0.72)        # beats any constant answer
    assert detect("constant_answer", run(evals=learned)) is None
    varied = evals_collapsing([0.05, 0.2, 0.3, 0.3], acc=0.72, const=0.72)          # many different answers  
    assert detect("constant_answer", run(evals=varied)) is None
    assert detect("constant_answer", run(evals=collapsed), max_share=1.01) is None
    assert detect("constant_answer", run()) is None                                # older runs: no shares logged


def test_collapse_stats_from_an_evaluations_counts():
    from collections import Counter

    from llmrl.rewards.extract import extract_answer
    from llmrl.train.evaluate import answer_counts, collapse_stats

    said = ["Answer: Yes", "Answer:  yes.", "It appears 1 time. Answer: Yes", "Answer: No", "no answer at all"]
    ev = {"given_counts": answer_counts(extract_answer(c) for c in said), "answer_counts": answer_counts(
        ["Yes", "No", "No", "No", "Yes"])}
    assert ev["given_counts"] == Counter({"yes": 3, "no": 1})           # worded apart, one answer; None not counted
    assert collapse_stats(ev) == {"top_answer_share": 0.6, "constant_answer_accuracy": 0.6}
    silent = {"given_counts": Counter(), "answer_counts": Counter({"1": 2})}      # no response gives an answer
    assert collapse_stats(silent) == {"top_answer_share": 0.0, "constant_answer_accuracy": 1.0}
    assert collapse_stats({"given_counts": Counter(), "answer_counts": Counter()})["top_answer_share"] is None


def test_trend_start_is_where_the_series_leaves_its_early_level_for_good():
    steps = list(range(1, 21))
    vals = [0.0] * 10 + [2.0 * (s - 10) for s in range(11, 21)]
    assert trend_start(steps, vals, 1, 0.0, 10.0) == 11
    assert trend_start(steps, [0.0, 5.0] + vals[2:], 1, 0.0, 10.0) == 11      # an early blip does not count
    assert trend_start(steps, [0.0] * 20, 1, 0.0, 0.0) is None


def test_options_are_checked():
    with pytest.raises(ValueError, match="unknown audit detector 'nope'"):
        resolve_options({"nope": {}})
    with pytest.raises(ValueError, match="unknown option length_drift.max"):
        resolve_options({"length_drift": {"max": 2}})
    with pytest.raises(ValueError, match="length_drift.max_ratio: expected float"):
        resolve_options({"length_drift": {"max_ratio": "big"}})
    assert resolve_options({"length_drift": {"enabled": False}})["length_drift"] is None
    assert resolve_options({"component_dominance": {"allow": "x"}})["component_dominance"]["allow"] == ("x",)


def test_cli_flags_the_planted_hack_passes_the_healthy_run_and_writes_the_report(tmp_path, capsys):
    hacked, ok = write_run(tmp_path / "hacked", hacked=True), write_run(tmp_path / "ok", hacked=False)
    assert main(["audit", str(ok)]) == 0
    assert "0 finding(s)" in capsys.readouterr().out
    assert main(["audit", str(hacked)]) == 1
    out = capsys.readouterr().out
    for name in DETECTORS.names():
        assert f"[{name}] from step " in out
    page = (hacked / "report.html").read_text()
    assert "<h2>Audit</h2>" in page and page.count('<tr class="finding">') == len(DETECTORS.names())
    saved = json.loads((hacked / "audit.json").read_text())
    assert len(saved["findings"]) == len(DETECTORS.names()) and saved["options"]["length_drift"]["max_ratio"] == 1.5
    assert main(["audit", str(hacked), "--warn-only", "--no-report"]) == 0
    cfg = tmp_path / "audit.yaml"
    cfg.write_text("\n".join(f"{n}: {{enabled: false}}" for n in DETECTORS.names() if n != "length_drift"))
    assert main(["audit", str(hacked), "--config", str(cfg), "--set", "length_drift.max_ratio=3"]) == 0
    assert main(["audit", str(hacked), "--set", "length_drift.max_ratio=big"]) == 2
    assert main(["audit", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err



def test_a_tiny_training_run_logs_what_the_audit_and_studio_read(tmp_path, capsys):
    args = ["train", "preset=grpo", "model.name=tiny", "model.autocast=none", "task.heldout_size=3",
            "rollout.prompts_per_step=2", "rollout.group_size=2", "rollout.max_new_tokens=6", "run.progress=false",
            "run.steps=2", "run.eval_every=1", "run.samples_every=1", f"run.output_dir={tmp_path}", "run.name=t"]
    assert main(args) == 0
    data = load_run(tmp_path / "t")
    assert all(0 <= r["zero_variance_group_fraction"] <= 1 for r in data.train)
    assert all(isinstance(s["truncated"], bool) for s in data.samples)
    held = [json.loads(x) for x in (tmp_path / "t" / "heldout_samples.jsonl").read_text().splitlines()]
    assert sorted({h["step"] for h in held}) == [0, 1, 2] and all(len([h for h in held if h["step"] == s]) == 3
                                                                  for s in (0, 1, 2))
    assert {"prompt", "answer", "completion", "correct"} <= set(held[0])
    for ev in data.evals:        # three held-out prompts: shares of 0, 1/3, 2/3 or 1
        assert ev["heldout_top_answer_share"] in (0.0, pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
        assert ev["heldout_constant_answer_accuracy"] in (pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0)
    capsys.readouterr()
    assert main(["audit", str(tmp_path / "t"), "--warn-only"]) == 0
    assert f"{len(DETECTORS.names())} detectors" in capsys.readouterr().out


def test_the_example_thresholds_are_the_defaults():
    import yaml
    from pathlib import Path

    example = yaml.safe_load((Path(__file__).parents[2] / "examples" / "audit" / "thresholds.yaml").read_text())
    assert resolve_options(example) == resolve_options()
