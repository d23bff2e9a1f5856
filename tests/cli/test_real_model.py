"""The real default model end to end, through the installed `llmrl` command (slow: about a minute)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

pytestmark = pytest.mark.slow


def llmrl(*args, cwd):
    exe = shutil.which("llmrl", path=str(Path(sys.executable).parent)) or "llmrl"
    return subprocess.run([exe, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), timeout=900)


def test_two_grpo_steps_on_smollm2(tmp_path):
    repo = Path(__file__).resolve().parents[2]
    r = llmrl("train", str(repo / "examples/main_arithmetic.yaml"), f"run.output_dir={tmp_path}", "run.name=smoke",
              "run.steps=2", "run.eval_every=0", "task.heldout_size=16", "rollout.prompts_per_step=2",
              "rollout.group_size=4", "rollout.max_new_tokens=16", "run.progress=false", "objective.kl_coef=0.04",
              cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out accuracy" in r.stdout
    summary = yaml.safe_load((tmp_path / "smoke" / "summary.yaml").read_text())
    assert summary["before"]["heldout_accuracy"] > 0       # SmolLM2-135M-Instruct adds some 2-digit numbers
    assert summary["before"]["heldout_kl_to_ref"] == pytest.approx(0.0, abs=1e-6)
    assert summary["after"]["heldout_kl_to_ref"] > 1e-4    # two updates moved the policy off the reference
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "smoke" / "final")
    assert model.config.num_hidden_layers == 30
    r = llmrl("eval", "--model", str(tmp_path / "smoke" / "final"), "--task", "arithmetic", "--n", "8",
              "--max-new-tokens", "16", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "accuracy" in r.stdout
