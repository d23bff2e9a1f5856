"""The supervised loop under `llmrl dpo`, `llmrl rm` and `llmrl prm`: a run killed with SIGKILL after a checkpoint
and resumed with --resume ends with bitwise the same weights and metrics as a run never stopped (and trains only the
steps after the checkpoint); a changed config is refused; run.time_limit_minutes stops training (held-out
evaluations not counted); Ctrl-C keeps the checkpoints. Each run crosses epochs, accumulates micro-batches, follows a
cosine LR schedule and evaluates mid-run, so every piece of state a checkpoint holds is exercised."""

import json
import os
import random
import signal
import subprocess
import sys
import time
import types

import pytest
import torch
from safetensors.torch import load_file

import llmrl.train.supervised as supervised
from llmrl.cli import main
from llmrl.data.pairs import PreferencePair, save_pairs
from llmrl.data.step_labels import save_step_labels
from llmrl.runio import checkpoint
from llmrl.train.dpo import DpoTask
from llmrl.runio.metrics import read_metrics
from llmrl.train.prm import PrmTask
from llmrl.train.rm import RewardModelTask

from run_folders import last_train_step

STEPS, SAVE_EVERY = 12, 3          # 8 training examples, batches of 2, 3 epochs
COMMON = ["model.name=tiny", "model.autocast=none", "run.progress=false", "run.threads=1", "run.tensorboard=false",
          "optim.lr=1e-2", "optim.schedule=cosine", "optim.micro_batch_size=1", "run.eval_every=4"]


def write_data(root):
    pairs = save_pairs([PreferencePair(f"What is {i} + {i}?", str(2 * i), str(2 * i + 1)) for i in range(10)],
                       root / "pairs.jsonl")
    rng = random.Random(0)
    rows = []
    for i in range(10):
        steps = ["".join(rng.choice("abcz") for _ in range(4)) + " " for _ in range(rng.randint(2, 3))]
        rows.append({"prompt": f"q{i}", "steps": steps, "labels": [float("z" in s) for s in steps]})
    labels = save_step_labels(rows, root / "steps.jsonl")
    pref = [f"preference.data_path={pairs}", "preference.heldout_fraction=0.2", "preference.batch_size=2",
            "preference.epochs=3"]
    return {"dpo": ["dpo", *COMMON, *pref, "lora.r=4", "lora.dropout=0.1"],   # dropout: the RNG state must resume
            "rm": ["rm", *COMMON, *pref, "lora=null"],
            "prm": ["prm", *COMMON, f"prm.data_path={labels}", "prm.heldout_fraction=0.2", "prm.batch_size=2",
                    "prm.epochs=3"]}


@pytest.fixture(scope="module")
def commands(tmp_path_factory):
    return write_data(tmp_path_factory.mktemp("data"))


def args_of(commands, command, out, *extra):
    return [*commands[command], f"run.output_dir={out}", "run.name=r", f"run.save_every={SAVE_EVERY}", *extra]


# `llmrl CMD` in a child process whose every step takes SLOW_STEP seconds more, so that a kill lands mid-run
RUNNER = """
import os, sys, time
import llmrl.train.supervised as sup
real = sup._train_step
def slow(*args, **kwargs):
    time.sleep(float(os.environ["SLOW_STEP"]))
    return real(*args, **kwargs)
sup._train_step = slow
from llmrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, commands):
    """command -> the run never stopped: (final weights, metric records), run lazily once per command."""
    cache, n = {}, torch.get_num_threads()

    def get(command):
        if command not in cache:
            out = tmp_path_factory.mktemp(f"uninterrupted-{command}")
            with pytest.MonkeyPatch.context() as mp:      # conftest's cache fixture is function-scoped
                mp.setenv("LLMRL_CACHE", str(tmp_path_factory.getbasetemp() / "llmrl-cache"))
                assert main(args_of(commands, command, out)) == 0
            torch.set_num_threads(n)
            cache[command] = (load_file(out / "r" / "final" / "model.safetensors"),
                              read_metrics(out / "r" / "metrics.jsonl"))
        return cache[command]
    return get


def without_times(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def assert_same_run(run_dir, expected):
    weights, records = expected
    resumed = load_file(run_dir / "final" / "model.safetensors")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights), "resumed weights differ"
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows] == [(r["kind"], r["step"]) for r in records]   # each step once
    assert without_times(rows) == without_times(records)                                      # the same numbers


@pytest.fixture
def count_steps(monkeypatch):
    steps = []
    real = supervised._train_step

    def counting(run, step, *a, **kw):
        steps.append(step)
        return real(run, step, *a, **kw)

    monkeypatch.setattr(supervised, "_train_step", counting)
    return steps


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("command", ["dpo", "rm", "prm"])
def test_killed_after_a_checkpoint_and_resumed_ends_bitwise_equal(command, tmp_path, commands, uninterrupted,
                                                                  count_steps, one_thread):
    expected = uninterrupted(command)
    assert [r["step"] for r in expected[1] if r["kind"] == "train"] == list(range(1, STEPS + 1))
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    kill_after, delay = rng.randint(SAVE_EVERY + 1, STEPS - 2), rng.uniform(0.0, 0.1)
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, *args_of(commands, command, tmp_path)],
                            env={**os.environ, "SLOW_STEP": "0.1"}, stdout=subprocess.DEVNULL,
                            stderr=open(tmp_path / "child.log", "w"))
    deadline = time.monotonic() + 600                # generous: on a loaded machine the child may crawl
    while last_train_step(tmp_path / "r" / "metrics.jsonl") < kill_after and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child did not reach step {kill_after} in 600 s")
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the child ended before the kill (seed {seed}): {proc.returncode}"
    found = checkpoint.latest(tmp_path / "r")
    assert found is not None and not (tmp_path / "r" / "final").exists()
    start = json.loads((found / "state.json").read_text())["step"]
    count_steps.clear()
    assert main(args_of(commands, command, tmp_path, "--resume")) == 0, f"seed {seed}"
    assert count_steps == list(range(start + 1, STEPS + 1)), f"seed {seed}"    # resumed, not started over
    assert_same_run(tmp_path / "r", expected)


def test_checkpoints_hold_the_adapter_optimizer_schedule_rng_and_evaluations(tmp_path, commands, one_thread):
    assert main(args_of(commands, "dpo", tmp_path, "run.steps=6")) == 0
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000006"]
    last = root / "step-000006"
    assert sorted(p.name for p in last.iterdir()) == ["config.yaml", "metrics.jsonl", "model.pt", "optimizer.pt",
                                                      "rng.pt", "state.json"]
    saved = torch.load(last / "model.pt", weights_only=True)
    assert saved and all("lora_" in k for k in saved)                           # LoRA: only the adapter
    state = json.loads((last / "state.json").read_text())
    assert state["step"] == 6 and [e["step"] for e in state["evals"]] == [0, 4]
    assert "beta" not in state and torch.load(last / "optimizer.pt", weights_only=True)["scheduler"]["last_epoch"] == 6
    rows = read_metrics(last / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in rows][-2:] == [("train", 5), ("train", 6)]


@pytest.mark.parametrize("command", ["rm", "prm"])
def test_resume_with_a_changed_config_is_refused_and_past_the_end_too(command, tmp_path, commands, capsys,
                                                                      one_thread):
    assert main(args_of(commands, command, tmp_path, "run.steps=6")) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert main(args_of(commands, command, tmp_path, "optim.lr=0.5", "--resume")) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "optim.lr: 0.01 -> 0.5" in err and "run.steps:" not in err
    assert (tmp_path / "r" / "config.yaml").read_text() == saved            # refused before touching the run
    assert main(args_of(commands, command, tmp_path, "optim.lr=0.5")) == 2    # run.resume=auto refuses it too
    assert main(args_of(commands, command, tmp_path, "run.steps=4", "--resume")) == 2
    assert "past this run's last step, 4" in capsys.readouterr().err
    assert main(args_of(commands, command, tmp_path / "none", "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert main(args_of(commands, command, tmp_path, "optim.lr=0.5", "run.resume=never", "run.steps=3")) == 0
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000003"]


@pytest.mark.parametrize("command,task", [("dpo", DpoTask), ("rm", RewardModelTask), ("prm", PrmTask)])
def test_time_limit_counts_training_not_evaluations(command, task, tmp_path, commands, monkeypatch, one_thread):
    """On a fake clock each step takes 1 minute and each held-out evaluation 2: a 2.5-minute limit stops training
    after 3 steps, and the run still evaluates and saves. Counting the evaluations would stop it after step 1."""
    offset = [0.0]
    real_step, real_evaluate = supervised._train_step, task.evaluate

    def step_of_a_minute(*a, **kw):
        offset[0] += 60.0
        return real_step(*a, **kw)

    def evaluation_of_two_minutes(self):
        offset[0] += 120.0
        return real_evaluate(self)

    monkeypatch.setattr(supervised, "time", types.SimpleNamespace(perf_counter=lambda: time.perf_counter() + offset[0]))
    monkeypatch.setattr(supervised, "_train_step", step_of_a_minute)
    monkeypatch.setattr(task, "evaluate", evaluation_of_two_minutes)
    assert main(args_of(commands, command, tmp_path, "run.time_limit_minutes=2.5", "run.eval_every=1")) == 0
    rows = read_metrics(tmp_path / "r" / "metrics.jsonl")
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2, 3]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 1, 2, 3, 3]   # before, every step, after
    assert all(r["time_eval"] >= 120 for r in rows if r["kind"] == "eval")
    assert (tmp_path / "r" / "final" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000003"]


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_continues(tmp_path, commands, monkeypatch, capsys, one_thread):
    real, calls = supervised._train_step, []

    def interrupt_at_step_5(run, step, *a, **kw):
        calls.append(step)
        if step == 5:
            raise KeyboardInterrupt
        return real(run, step, *a, **kw)

    monkeypatch.setattr(supervised, "_train_step", interrupt_at_step_5)
    assert main(args_of(commands, "prm", tmp_path)) == 130
    assert "interrupted at step 5" in capsys.readouterr().out
    assert checkpoint.latest(tmp_path / "r").name == "step-000003" and not (tmp_path / "r" / "final").exists()
    monkeypatch.setattr(supervised, "_train_step", real)
    assert main(args_of(commands, "prm", tmp_path)) == 0                      # run.resume=auto continues
    steps = [r["step"] for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == list(range(1, STEPS + 1))

