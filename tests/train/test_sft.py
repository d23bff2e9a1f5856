"""`llmrl sft`: the loss is on completion tokens only (a slow per-row reference that a wrong mask fails), JSONL in
both formats, one step on the tiny model, worked answers from a task, and a killed run resumed bitwise equal."""

import json

import pytest
import torch
from safetensors.torch import load_file

import llmrl.train.supervised as supervised
from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.config_supervised import SftTrainConfig
from llmrl.data import make_task
from llmrl.data.sft import SftExample, parse_sft, read_sft, worked_answer, worked_examples
from llmrl.models import load_model
from llmrl.rewards import score
from llmrl.runio.metrics import read_metrics
from llmrl.train.sft import collate, encode_example, nll_sum, train_sft


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(tmp_path, name, *extra):
    return load_config(None, ["model.name=tiny", "model.autocast=none", f"run.output_dir={tmp_path}",
                              f"run.name={name}", "run.progress=false", "run.tensorboard=false", "run.threads=1",
                              *extra], schema=SftTrainConfig)


def _data(tmp_path, n=12):
    path = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"Say {i}", "completion": f"{i} {i} {i}"} for i in range(n - 2)]
    rows += [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there"}]}] * 2
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@torch.no_grad()
def test_loss_is_on_completion_tokens_only():
    model, tok = load_model("tiny")
    model.eval()
    rows = [encode_example(tok, SftExample(p, c), chat_template=True, system_prompt=None, max_length=None)
            for p, c in (("What is 2 + 3?", "5"), ("Say something long please", "ok then, here it is"))]
    ids, attn, mask = collate(rows, tok.pad_token_id)
    assert mask.sum().item() == sum(len(c) for _, c in rows)
    expected = 0.0                                  # slow reference: each row alone, unpadded
    for p, c in rows:
        x = torch.tensor([p + c])
        logp = model(x).logits.log_softmax(-1)[0]                                    # [L, V]
        expected -= sum(float(logp[len(p) + j - 1, t]) for j, t in enumerate(c))    # completion tokens only
    for pack in (None, 64):
        got = float(nll_sum(model, rows, tok.pad_token_id, pack_tokens=pack, amp=None))
        assert got == pytest.approx(expected, rel=1e-4)
    with_prompt = expected - sum(float(model(torch.tensor([p + c])).logits.log_softmax(-1)[0, len(p) - 2, p[-1]])
                                 for p, c in rows)        # one prompt token more in the mask changes the loss
    assert abs(with_prompt - expected) > 1e-3


def test_sft_files_both_formats_and_clear_errors(tmp_path):
    rows = read_sft(_data(tmp_path))
    assert rows[0] == SftExample("Say 0", "0 0 0") and rows[-1].prompt == [{"role": "user", "content": "Hi"}]
    with pytest.raises(ValueError, match="assistant"):
        parse_sft({"messages": [{"role": "user", "content": "x"}]}, "f:1")
    with pytest.raises(ValueError, match="'prompt' and 'completion'"):
        parse_sft({"prompt": "x"}, "f:1")
    with pytest.raises(ConfigError, match="sft.data_path"):
        load_config(None, ["task=null"], schema=SftTrainConfig)


def test_worked_answers_are_correct():
    task = make_task("arithmetic", options={"digits": 2})
    rows = worked_examples(task, 50)
    exs = [ex for ex, _ in zip(task.train_stream(0), range(50))]
    assert rows[0].completion == f"{exs[0].meta['expression']} = {exs[0].answer}\nAnswer: {exs[0].answer}"
    assert score([r.completion for r in rows], exs, [("correct", 1.0, {})]).total.tolist() == [1.0] * 50
    assert worked_answer(exs[1]).endswith(f"Answer: {exs[1].answer}")


def test_one_step_on_the_tiny_model(tmp_path):
    summary = train_sft(_cfg(tmp_path, "one", f"sft.data_path={_data(tmp_path)}", "run.steps=1",
                             "sft.batch_size=4", "task=null"))
    assert summary["steps"] == 1 and summary["train_examples"] + summary["heldout_examples"] == 12
    train = [r for r in read_metrics(tmp_path / "one" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 1 and train[0]["loss_nll"] > 0 and train[0]["examples"] == 4
    assert (tmp_path / "one" / "final" / "model.safetensors").exists()


def test_worked_answers_from_the_task_train_and_are_evaluated(tmp_path):
    summary = train_sft(_cfg(tmp_path, "task", "sft.build_examples=24", "sft.batch_size=8", "lora=null",
                             "optim.lr=3e-3", "task.heldout_size=4", "run.eval_max_new_tokens=4", "sft.epochs=2"))
    assert (tmp_path / "task" / "sft_data.jsonl").exists() and summary["steps"] == 6
    assert summary["after"]["heldout_loss_nll"] < summary["before"]["heldout_loss_nll"]
    assert 0.0 <= summary["after"]["heldout_accuracy"] <= 1.0


def test_killed_and_resumed_ends_bitwise_equal(tmp_path, monkeypatch):
    data = _data(tmp_path)
    run = lambda name: train_sft(_cfg(tmp_path, name, f"sft.data_path={data}", "sft.batch_size=2",  # noqa: E731
                                      "sft.epochs=1", "run.save_every=2", "task=null", "lora=null"))
    run("whole")
    real = supervised._train_step

    def stop_at_4(r, step, *a, **kw):
        if step == 4:
            raise KeyboardInterrupt
        return real(r, step, *a, **kw)

    monkeypatch.setattr(supervised, "_train_step", stop_at_4)
    assert run("resumed")["interrupted"]
    monkeypatch.setattr(supervised, "_train_step", real)
    assert run("resumed")["steps"] == 6
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
