"""A whole RL step through the device seam, in which every tensor llmrl makes is made on purpose where it lives.

The CPU cannot tell a tensor left on the host from one on the run's device: both are CPU tensors. So the step is
audited at the source instead: every tensor factory llmrl's own code calls during a step (torch.zeros, arange,
tensor, ...) must name its device (`device=` the run's device or a tensor's, or "cpu" on purpose for host-side
indices and plans), except in the few functions that build host data and hand it to a `.to(device)`. A factory
without a device is what puts a CPU tensor into a GPU step. The CUDA test (skipped without a GPU) runs the same step
on the GPU and checks every op's outputs are there.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from llmrl.config_loader import load_config
from llmrl.presets import PRESETS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SRC = str(Path(__file__).resolve().parents[2] / "src" / "llmrl")

# functions that build host data (token lists -> tensors, packing plans) handed to a `.to(device)` by their caller
HOST_BUILDERS = {"left_pad", "_to_rollout", "_to_samples", "pack_layout", "of", "attention_mask", "score", "combine",
                 "score_steps"}
FACTORIES = {torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.tensor, torch.rand, torch.randn,
             torch.randint, torch.randperm, torch.eye, torch.linspace, torch.as_tensor}


class FactoryAudit(TorchFunctionMode):
    """Records (file:line in function) of every tensor factory llmrl's code calls without naming a device."""

    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            frame = inspect.currentframe().f_back
            while frame is not None and "/torch/" in frame.f_code.co_filename:
                frame = frame.f_back
            if frame is None:
                return func(*args, **kwargs)
            if frame.f_code.co_filename.startswith(SRC) and frame.f_code.co_name not in HOST_BUILDERS:
                self.found.add(f"{frame.f_code.co_filename[len(SRC) + 1:]}:{frame.f_lineno} "
                               f"in {frame.f_code.co_name}")
        return func(*args, **kwargs)


class DeviceRecord(TorchDispatchMode):
    """The devices of every op's floating-point outputs."""

    def __init__(self):
        super().__init__()
        self.devices: dict[str, set] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                self.devices.setdefault(t.device.type, set()).add(str(func))
        return out


STEP_ARGS = ["model.name=tiny", "task.heldout_size=4", "rollout.prompts_per_step=2", "rollout.group_size=3",
             "rollout.max_new_tokens=8", "run.steps=1", "run.eval_every=0", "run.progress=false",
             "run.samples_every=1", "objective.kl_coef=0.05"]


def one_step(tmp_path, device: str, extra: list[str]):
    from llmrl.train.build import build
    from llmrl.train.rl import rl_step

    cfg = load_config(None, [*STEP_ARGS, f"run.device={device}", f"run.output_dir={tmp_path}", *extra],
                      presets=PRESETS)
    r = build(cfg)
    audit, record = FactoryAudit(), DeviceRecord()
    with audit, record:
        rec = rl_step(r, next(r.batches), 1)
    return r, rec, audit, record


@pytest.mark.parametrize("extra", [["preset=grpo"], ["preset=ppo", "credit.values=critic"],
                                   ["preset=grpo", "optim.packing=false", "objective.minibatches=2"],
                                   ["preset=trpo", "objective.kl_placement=reward"], ["preset=vineppo", "credit.mc_samples=2"],
                                   ["preset=reinforce_pp", "model.lora_r=4"]])
def test_every_tensor_of_a_step_is_made_where_it_lives(tmp_path, extra):
    r, rec, audit, record = one_step(tmp_path, "cpu", extra)
    assert r.ex.device == torch.device("cpu") and next(r.model.parameters()).device.type == "cpu"
    assert audit.found == set(), f"tensors made without a device during a step: {sorted(audit.found)}"
    assert set(record.devices) == {"cpu"}
    assert rec["time_step"] > 0 and rec["update_rows"] > 0


def test_the_audit_catches_a_factory_without_a_device(monkeypatch, tmp_path):
    """A stage that makes a tensor with no device (the bug the audit is for) is found, with its place."""
    import llmrl.train.stages as stages

    real = stages.reference_logprobs

    def careless(r, rollout):
        rollout, stats = real(r, rollout)
        return rollout.with_(logp_ref=rollout.logp_ref + torch.zeros(rollout.logp_ref.shape)), stats

    monkeypatch.setattr(stages, "reference_logprobs", careless)
    careless.__code__ = careless.__code__.replace(co_filename=stages.__file__)
    _, _, audit, _ = one_step(tmp_path, "cpu", ["preset=grpo"])
    assert any("in careless" in f for f in audit.found)


@cuda
def test_a_step_on_the_gpu_keeps_every_tensor_there(tmp_path):
    r, rec, audit, record = one_step(tmp_path, "cuda", ["preset=grpo"])
    assert next(r.model.parameters()).is_cuda and next(r.reference.parameters()).is_cuda
    assert audit.found == set()
    # the host does the bookkeeping (reward scores, metrics); no compute of the step may run there
    compute = {op for op in record.devices.get("cpu", set())
               if any(k in op for k in ("mm", "linear", "scaled_dot", "softmax", "convolution", "_foreach"))}
    assert not compute, f"compute ops on the CPU in a GPU step: {sorted(compute)}"
    assert "cuda" in record.devices
