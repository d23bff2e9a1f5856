"""bench/learning.py end to end on the tiny model: two pairs trained at once (--jobs 2), each on its share of the
cores with its output in its own log, then the table written from both."""

import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from learning import TASKS, run_name, split_specs  # noqa: E402


def test_two_jobs_train_side_by_side_and_report_both(tmp_path):
    doc, out = tmp_path / "bench.md", tmp_path / "runs"
    cmd = [sys.executable, str(ROOT / "bench/learning.py"), "--minutes", "0.01", "--tasks", "arithmetic",
           "--presets", "grpo,dapo", "--heldout", "4", "--eval-every", "1000", "--jobs", "2", "--out-dir", str(out),
           "--doc", str(doc), "model.name=tiny", "rollout.prompts_per_step=2", "rollout.group_size=2",
           "rollout.max_new_tokens=4"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    threads = max(1, (os.cpu_count() or 1) // 2)
    for preset in ("grpo", "dapo"):
        run_dir = out / "arithmetic" / preset
        assert (run_dir / "metrics.jsonl").exists()
        assert "llmrl.train" in (out / "arithmetic" / f"{preset}.log").read_text()   # its own log, not the caller's
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert cfg["run"]["threads"] == threads and cfg["preset"] == preset
    text = doc.read_text()
    assert "2 runs at a time" in text
    rows = [line for line in text.splitlines() if line.startswith("| arithmetic |")]
    assert [r.split("|")[2].strip() for r in rows] == ["grpo", "dapo"]
    header = next(line for line in text.splitlines() if line.startswith("| task |")).split("|")
    top, const = header.index(" top answer "), header.index(" constant acc ")
    for r in rows:                      # 4 held-out prompts: shares of a quarter
        cells = r.split("|")
        assert float(cells[top]) in (0.0, 0.25, 0.5, 0.75, 1.0) and float(cells[const]) in (0.25, 0.5, 0.75, 1.0)


def test_a_yaml_value_with_commas_stays_one_spec_and_names_a_plain_folder():
    exact = 'dapo+reward.terms=[{"name":"correct","options":{"partial":false}}]'
    assert split_specs(f"grpo,{exact},dppo+objective.kl_coef=0.1") == ["grpo", exact, "dppo+objective.kl_coef=0.1"]
    assert split_specs("grpo") == ["grpo"]
    assert run_name(exact) == "dapo__reward.terms-name-correct-options-partial-false"
    assert run_name("dppo+objective.kl_coef=0.1") == "dppo__objective.kl_coef-0.1"    # the names runs already have


def test_every_task_loads_and_has_the_heldout_problems_the_benchmark_asks_for():
    """A task's overrides (a YAML value in a key=value string) parse into a valid config, and its generator gives
    200 distinct held-out problems (a small task.options can have fewer, and `heldout` then raises)."""
    from llmrl.config_loader import load_config
    from llmrl.data import make_task
    from llmrl.presets import PRESETS

    for name, overrides in TASKS.items():
        cfg = load_config(ROOT / "examples/arithmetic_base.yaml", ["preset=grpo", *overrides], presets=PRESETS)
        task = make_task(cfg.task.name, options=cfg.task.options)
        held = task.heldout(200)
        assert len({ex.prompt for ex in held}) == 200, name
        if name != "arithmetic":
            assert cfg.rollout.max_new_tokens == 64 and cfg.task.name == f"reasoning_gym:{name}", name
