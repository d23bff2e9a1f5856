"""The supervised loop with a task written here, not one of the trainers: supervised fine-tuning (the mean negative
log-likelihood of completion tokens, on packed rows) in a few dozen lines is all `fit` needs. It learns; the
gradient accumulated over micro-batches does not depend on their size; stopped and resumed, it ends bitwise equal.
(`llmrl sft`, `train/sft.py`, is the full version: files, chat messages, LoRA, task accuracy; tests/train/test_sft.py.)"""

from dataclasses import dataclass

import pytest
import torch
from safetensors.torch import load_file

import llmrl.train.supervised as supervised
from llmrl.config import OptimConfig, RunConfig
from llmrl.models import load_model
from llmrl.compute.logprobs import response_logprobs
from llmrl.rollout.sampler import left_pad
from llmrl.runio.metrics import read_metrics
from llmrl.train.supervised import fit
from llmrl.typed import f

DATA = [(f"Say {i}", f"{i} {i} {i}") for i in range(10)]     # 8 to train on, 2 held out


@dataclass
class SftConfig:
    optim: OptimConfig = f(OptimConfig(lr=3e-3, micro_batch_size=4), "optimizer")
    run: RunConfig = f(RunConfig(name="sft", steps=0, eval_every=3, progress=False, tensorboard=False), "run")


class SftTask:
    """SFT: -mean log pi(completion token) over the batch's completion tokens, packed, for `fit`."""
    desc, shown = "sft steps", ("loss_nll", "perplexity")

    def __init__(self, cfg: SftConfig, epochs: int = 4):
        self.model, self.tokenizer = load_model("tiny")
        self.epochs, self.batch_size, self.micro_batch_size = epochs, 4, cfg.optim.micro_batch_size
        enc = [(self.tokenizer(p)["input_ids"], self.tokenizer(c)["input_ids"] + [self.tokenizer.eos_token_id])
               for p, c in DATA]
        self.train, self.heldout = enc[:8], enc[8:]
        self.n_train = len(self.train)

    def _nll_sum(self, rows) -> torch.Tensor:
        prompts, prompt_mask = left_pad([p for p, _ in rows], self.tokenizer.pad_token_id)      # [n, P]
        T = max(len(c) for _, c in rows)
        completions = torch.full((len(rows), T), self.tokenizer.pad_token_id)                    # [n, T]
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for i, (_, c) in enumerate(rows):
            completions[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), 1
        logp, _ = response_logprobs(self.model, torch.cat([prompts, completions], 1),
                                    torch.cat([prompt_mask, mask], 1), T, with_entropy=False, pack_tokens=64)
        return -(logp * mask).sum()

    def loss(self, micro, batch):
        n_tokens = sum(len(self.train[i][1]) for i in batch.tolist())    # the mean over the batch's tokens
        nll = self._nll_sum([self.train[i] for i in micro.tolist()]) / n_tokens
        return nll, float(nll.detach())

    def metrics(self, parts, batch):
        loss = sum(parts)
        return {"loss_nll": loss, "perplexity": float(torch.tensor(loss).exp())}

    def counts(self, batch):
        return {"examples": len(batch)}

    @torch.no_grad()
    def evaluate(self):
        return {"heldout_loss_nll": float(self._nll_sum(self.heldout)) / sum(len(c) for _, c in self.heldout)}

    def summary(self):
        return {"train_examples": self.n_train, "heldout_examples": len(self.heldout)}


def sft(tmp_path, name, **optim):
    cfg = SftConfig()
    cfg.run.output_dir, cfg.run.name, cfg.run.save_every, cfg.run.threads = str(tmp_path), name, 2, 1
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    return fit(cfg, lambda run_dir, resuming: SftTask(cfg))


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sft_learns_and_saves(tmp_path):
    summary = sft(tmp_path, "a")
    assert summary["steps"] == 8 and summary["train_examples"] == 8
    assert summary["after"]["heldout_loss_nll"] < summary["before"]["heldout_loss_nll"] - 0.5
    rows = read_metrics(tmp_path / "a" / "metrics.jsonl")
    train = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 9)) and [r["epoch"] for r in train] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert train[-1]["loss_nll"] < train[0]["loss_nll"] - 1.0
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [0, 3, 6, 8]
    assert (tmp_path / "a" / "final" / "model.safetensors").exists() and (tmp_path / "a" / "summary.yaml").exists()


def test_micro_batch_size_does_not_change_the_run(tmp_path):
    whole, parts = sft(tmp_path, "mb4", micro_batch_size=4), sft(tmp_path, "mb1", micro_batch_size=1)
    a, b = ([r for r in read_metrics(tmp_path / n / "metrics.jsonl") if r["kind"] == "train"] for n in ("mb4", "mb1"))
    assert len(a) == len(b) == 8
    for x, y in zip(a, b):
        assert x["loss_nll"] == pytest.approx(y["loss_nll"], abs=1e-5)
        assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
    assert whole["after"]["heldout_loss_nll"] == pytest.approx(parts["after"]["heldout_loss_nll"], abs=1e-4)


def test_stopped_and_resumed_ends_bitwise_equal(tmp_path, monkeypatch):
    sft(tmp_path, "whole")
    real = supervised._train_step

    def stop_at_6(run, step, *a, **kw):
        if step == 6:
            raise KeyboardInterrupt
        return real(run, step, *a, **kw)

    monkeypatch.setattr(supervised, "_train_step", stop_at_6)
    assert sft(tmp_path, "resumed")["interrupted"]
    monkeypatch.setattr(supervised, "_train_step", real)
    assert sft(tmp_path, "resumed")["steps"] == 8                           # run.resume=auto: from step 4
    a, b = (load_file(tmp_path / n / "final" / "model.safetensors") for n in ("whole", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "whole" / "metrics.jsonl")) == \
           strip(read_metrics(tmp_path / "resumed" / "metrics.jsonl"))
