"""Resume after a crash: a run killed with SIGKILL at a random moment (or in the middle of writing a checkpoint) and
resumed ends with bitwise the same weights as a run that was never stopped, and its metrics hold each step once.

The composition exercises every piece of state a checkpoint holds: a critic and its optimizer (ppo), the adaptive
KL controller (kl_target), a cosine LR schedule, minibatch shuffles drawn from the recipe's generator, sampling."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from llmrl.cli import main
from llmrl.runio import checkpoint
from llmrl.runio.metrics import read_metrics

from run_folders import last_train_step

ARGS = ["preset=ppo", "model.name=tiny", "model.autocast=none", "task.heldout_size=6", "rollout.prompts_per_step=2",
        "rollout.group_size=3", "rollout.max_new_tokens=6", "run.progress=false", "run.eval_every=3", "run.threads=1",
        "run.tensorboard=false", "optim.lr=1e-3", "optim.schedule=cosine", "objective.kl_target=0.5",
        "objective.minibatches=2", "reward.terms=[{name: format, options: {pattern: '[aeiou]'}}]"]
STEPS, SAVE_EVERY = 12, 3

# `llmrl train` in a child process; CRASH_AT_FILE=n makes it os._exit(17) just before it writes the n-th checkpoint file
RUNNER = """
import os, sys
crash_at = int(os.environ.get("CRASH_AT_FILE", 0))
if crash_at:
    import llmrl.runio.checkpoint as ck
    real, written = ck._write, [0]
    def write(path, fill):
        written[0] += 1
        if written[0] == crash_at:
            os._exit(17)
        real(path, fill)
    ck._write = write
from llmrl.cli import main
sys.exit(main(sys.argv[1:]))
"""


def train_args(out, *extra, steps=STEPS):
    return ["train", *ARGS, f"run.output_dir={out}", "run.name=r", f"run.steps={steps}",
            f"run.save_every={SAVE_EVERY}", *extra]


def child(out, *extra, env=None):
    return subprocess.Popen([sys.executable, "-c", RUNNER, *train_args(out, *extra)], env={**os.environ, **(env or {})},
                            stdout=subprocess.DEVNULL, stderr=open(out / "child.log", "w"))


@pytest.fixture
def one_thread():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run never stopped: (its final weights, its metric records, its checkpoint folder names)."""
    n = torch.get_num_threads()
    out = tmp_path_factory.mktemp("uninterrupted")
    with pytest.MonkeyPatch.context() as mp:      # the cache conftest's (function-scoped) fixture gives every test
        mp.setenv("LLMRL_CACHE", str(tmp_path_factory.getbasetemp() / "llmrl-cache"))
        assert main(train_args(out)) == 0
    torch.set_num_threads(n)
    run = out / "r"
    return (load_file(run / "final" / "model.safetensors"), read_metrics(run / "metrics.jsonl"),
            sorted(p.name for p in (run / "checkpoints").iterdir()))


def assert_same_run(run_dir, uninterrupted):
    weights, records, _ = uninterrupted
    resumed = load_file(run_dir / "final" / "model.safetensors")
    assert resumed.keys() == weights.keys()
    assert all(torch.equal(resumed[k], weights[k]) for k in weights), "resumed weights differ"
    rows = read_metrics(run_dir / "metrics.jsonl")
    key = lambda r: (r["kind"], r["step"])  # noqa: E731
    assert [key(r) for r in rows] == [key(r) for r in records]          # each step exactly once, in order
    for r, u in zip(rows, records):                                      # same numbers (timings aside)
        assert {k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))} == \
               {k: v for k, v in u.items() if not k.startswith(("time_", "tokens_per_s"))}


def test_uninterrupted_run_keeps_the_last_checkpoints(uninterrupted):
    _, records, kept = uninterrupted
    assert kept == ["step-000009", "step-000012"]                       # run.keep_checkpoints=2
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, STEPS + 1))
    assert len({r["reward"] for r in records if r["kind"] == "train"}) > 1   # the reward moves: a real run


def test_killed_at_a_random_moment_and_resumed_ends_bitwise_equal(tmp_path, uninterrupted, one_thread):
    seed = random.randrange(10 ** 6)
    rng = random.Random(seed)
    kill_after, delay = rng.randint(SAVE_EVERY, STEPS - 2), rng.uniform(0.0, 0.05)   # after >= 1 checkpoint
    proc = child(tmp_path)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 600                # generous: on a loaded machine the child may crawl
    while last_train_step(metrics) < kill_after and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the child did not reach step {kill_after} in 600 s")
        time.sleep(0.002)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the child ended before the kill (seed {seed}): {proc.returncode}"
    assert checkpoint.latest(tmp_path / "r") is not None
    assert main(train_args(tmp_path, "--resume")) == 0, f"seed {seed}"
    assert_same_run(tmp_path / "r", uninterrupted)


def test_a_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, uninterrupted, one_thread):
    files = 8                                     # per checkpoint with a critic; crash in the second one
    proc = child(tmp_path, env={"CRASH_AT_FILE": str(files + 3)})
    assert proc.wait() == 17
    root = tmp_path / "r" / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["step-000003"]
    assert any(p.name.startswith(".step-000006.tmp-") for p in root.iterdir())      # the half-written one
    assert len(list((tmp_path / "r" / "checkpoints" / "step-000003").iterdir())) == files
    assert checkpoint.latest(tmp_path / "r").name == "step-000003"
    assert not any(p.name.startswith(".") for p in root.iterdir())                 # ... and is cleaned away
    assert main(train_args(tmp_path, "--resume")) == 0
    assert_same_run(tmp_path / "r", uninterrupted)


def test_resume_with_a_changed_config_is_refused(tmp_path, capsys, one_thread):
    assert main(train_args(tmp_path, steps=SAVE_EVERY)) == 0
    saved = (tmp_path / "r" / "config.yaml").read_text()
    assert main(train_args(tmp_path, "optim.lr=0.5", "rollout.group_size=4", "--resume", steps=2 * SAVE_EVERY)) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 0.001 -> 0.5" in err and "rollout.group_size: 3 -> 4" in err and "run.steps:" not in err
    assert (tmp_path / "r" / "config.yaml").read_text() == saved          # refused before touching the run folder
    assert main(train_args(tmp_path, "optim.lr=0.5", steps=SAVE_EVERY)) == 2      # run.resume=auto refuses it too
    assert main(train_args(tmp_path, "optim.lr=0.5", "run.resume=never", steps=SAVE_EVERY)) == 0   # starts over
    assert [p.name for p in (tmp_path / "r" / "checkpoints").iterdir()] == ["step-000003"]
    assert json.loads((tmp_path / "r" / "checkpoints" / "step-000003" / "state.json").read_text())["step"] == 3


def test_config_changes_name_dotted_keys_and_fill_fields_added_since():
    defaults = {"preset": None, "run": {"steps": 40, "name": "run", "new_field": 1}, "task": {"options": {}}}
    saved = {"preset": None, "run": {"steps": 3, "name": "r"}, "task": {"options": {"digits": 2}}}   # no new_field
    same = {"preset": None, "run": {"steps": 9, "name": "r", "new_field": 1}, "task": {"options": {"digits": 2}}}
    assert checkpoint.config_changes(saved, same, defaults) == []                  # run.steps may change
    other = {"preset": "grpo", "run": {"steps": 3, "name": "r", "new_field": 2}, "task": {"options": {"digits": 3}}}
    assert checkpoint.config_changes(saved, other, defaults) == [
        "preset: None -> 'grpo'", "run.new_field: 1 -> 2", "task.options.digits: 2 -> 3"]


def test_resume_must_find_a_checkpoint(tmp_path, capsys):
    assert main(train_args(tmp_path, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_lora_run_extended_after_it_ended_equals_the_longer_run(tmp_path, one_thread):
    """run.steps may change on resume: 2 steps, then continued to 4 == 4 steps (constant LR; LoRA: the adapter)."""
    lora = ["model.lora_r=4", "optim.schedule=constant", "optim.lr=0.05", "run.save_every=2", "run.eval_every=0"]
    assert main(train_args(tmp_path / "long", *lora, steps=4)) == 0
    assert main(train_args(tmp_path / "short", *lora, steps=2)) == 0
    assert main(train_args(tmp_path / "short", *lora, "--resume", steps=4)) == 0
    a, b = (load_file(tmp_path / d / "r" / "final" / "model.safetensors") for d in ("long", "short"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    saved = torch.load(tmp_path / "long" / "r" / "checkpoints" / "step-000004" / "model.pt", weights_only=True)
    assert saved and all("lora_" in k for k in saved)                    # only the adapter is saved
    steps = [r["step"] for r in read_metrics(tmp_path / "short" / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert steps == [1, 2, 3, 4]



@pytest.mark.parametrize("sampling", [
    ["rollout.sampling=dynamic", "rollout.dynamic_max_rounds=3",
     "reward.terms=[{name: format, options: {pattern: '[aeiou][aeiou]'}}]"],   # some groups all 0: extra draws
    ["rollout.sampling=curriculum", "rollout.curriculum_replay=0.5", "rollout.curriculum_pool=8"],
], ids=["dynamic", "curriculum"])
def test_sampling_state_survives_a_resume(tmp_path, one_thread, sampling):
    """Dynamic sampling draws more than one batch a step, and the curriculum keeps a pool of pass rates: a run
    resumed after step 2 continues from the batches actually drawn and the pool as it was, so 2 + 2 steps == 4."""
    args = [*sampling, "preset=grpo", "optim.schedule=constant", "run.save_every=2", "run.eval_every=0"]
    assert main(train_args(tmp_path / "long", *args, steps=4)) == 0
    assert main(train_args(tmp_path / "short", *args, steps=2)) == 0
    assert main(train_args(tmp_path / "short", *args, "--resume", steps=4)) == 0
    state = json.loads((tmp_path / "long" / "r" / "checkpoints" / "step-000002" / "state.json").read_text())
    if "dynamic" in sampling[0]:
        assert state["sampling"]["batches_drawn"] > 2          # the case this test is for: more than a batch a step
    else:
        assert state["sampling"]["pass_rates"]                  # a pool to carry over
    a, b = (load_file(tmp_path / d / "r" / "final" / "model.safetensors") for d in ("long", "short"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (read_metrics(tmp_path / d / "r" / "metrics.jsonl") for d in ("long", "short"))
    strip = lambda r: {k: v for k, v in r.items() if not k.startswith(("time_", "tokens_per_s"))}  # noqa: E731
    assert [strip(r) for r in ra] == [strip(r) for r in rb]
