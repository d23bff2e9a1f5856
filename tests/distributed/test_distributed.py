"""Data parallelism (torchrun; DDP and FSDP2 over gloo on CPU) equals one process on the same global batch.

Two ranks are spawned once for the module (`_worker`); each gets its half of a fixed global batch (8 sequences of
the tiny model, 4 prompts x 2 samples; rank r holds rows 4r .. 4r+3, whole groups) and runs the same update, credit
and reward code as one process does on all 8 rows. Compared in fp32: the updated weights after the update (SGD,
lr 0.1, no clipping, so a wrong gradient sum, scale or sign moves them), the returned losses and metrics, and
advantages. Tolerance: 2e-6 absolute on weights and advantages (the order of float sums differs; measured at most
3.7e-7, while a missing gradient scale, local counts or local group ids are off by 1e-2 or more).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from llmrl.credit import CREDIT, CreditInputs
from llmrl.data import Example
from llmrl.models import build_tiny
from llmrl.models.value import Critic
from llmrl.objectives.policy import AGGREGATIONS, ppo_clip_objective
from llmrl.objectives.value import clipped_value_loss
from llmrl.rewards.score import RewardResult, Term, combine
from llmrl.rollout.collect import collect_rollout
from llmrl.distributed import runtime as D
from llmrl.train.evaluate import evaluate
from llmrl.distributed.parallel import full_model, full_params, wrap_policy
from llmrl.compute.settings import Execution
from llmrl.train.update import CriticTraining, Passes, policy_update

W, N = 2, 8
ATOL = 2e-6
# weights after up to 4 SGD steps at lr 0.1: the ranks' all-reduced gradients and one process's sum differ in float32
# rounding (the kernels see 4 rows, not 8), and the steps compound it: up to 3.8e-6 on an AMD EPYC of family 25,
# model 1 (the critic case), against >= 1e-3 that every case moves the weights (a wrong sum or scale shows there)
WEIGHT_ATOL = 1e-5
# (parallel, aggregation, epochs, minibatches, extra): extra = "kl" (KL and entropy terms in the loss, no row
# skipping), "critic" / "shared_critic" (a value head trained alongside), or "" (zero-advantage rows skipped)
CASES = ([("ddp", a, 1, 1, "") for a in AGGREGATIONS] + [("fsdp", a, 1, 1, "") for a in AGGREGATIONS] + [
    ("ddp", "token-mean", 2, 2, ""), ("fsdp", "seq-mean-token-mean", 2, 2, ""),
    ("ddp", "seq-mean-token-sum-norm", 1, 1, "kl"), ("fsdp", "token-mean", 1, 1, "kl"),
    ("ddp", "token-mean", 2, 2, "critic"), ("ddp", "seq-mean-token-mean", 1, 1, "shared_critic"),
    ("fsdp", "token-mean", 1, 1, "critic")])
ESTIMATORS = [("grpo", {}), ("dr_grpo", {}), ("rloo", {}), ("batch_mean", {}), ("reinforce_pp", {}),
              ("reinforce_pp", {"baseline": "group"}), ("gae", {"lam": 0.9}), ("value_baseline", {})]


# ----------------------------------------------------------------------------- the fixed global batch


def _global_batch():
    model, tok = build_tiny(0)
    exs = [Example("What is 1 + 2?", "3"), Example("Say hi", "hi"), Example("abc", "d"), Example("7*6=", "42")]
    rollout = collect_rollout(model, tok, exs, group_size=2, max_new_tokens=8, temperature=1.0,
                              generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    mask = rollout.response_mask
    rollout = rollout.with_(logp_ref=(rollout.logp_old + 0.3 * torch.randn(mask.shape, generator=g)) * mask,
                            values=torch.randn(mask.shape, generator=g) * mask)
    # rank 1's rows: two with A = 0 (skipped), so the ranks run different numbers of micro-batches
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 0.0, 2.0, 0.0, -2.0])[:, None] * mask
    returns = torch.randn(mask.shape, generator=g) * mask
    return rollout, adv, returns


def _credit_inputs():
    """8 rows, 4 groups of 2; rank 1's responses are shorter, so the ranks' T differ."""
    g = torch.Generator().manual_seed(2)
    lengths = torch.tensor([5, 3, 6, 1, 2, 4, 1, 3])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    mask[2, 1] = 0.0                                                        # a tool-output hole
    return CreditInputs(scores=torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.0, 0.0]), response_mask=mask,
                        group_ids=torch.arange(4).repeat_interleave(2),
                        token_rewards=-0.1 * torch.rand(mask.shape, generator=g) * mask,
                        values=torch.rand(mask.shape, generator=g) * mask)


def _local_inputs(inputs: CreditInputs, rank: int) -> CreditInputs:
    rows = slice(4 * rank, 4 * rank + 4)
    T = int(inputs.response_mask[rows].sum(0).nonzero().max()) + 1
    return CreditInputs(scores=inputs.scores[rows], response_mask=inputs.response_mask[rows, :T],
                        group_ids=torch.arange(2).repeat_interleave(2),  # local ids, as each rank's sampler makes them
                        token_rewards=inputs.token_rewards[rows, :T], values=inputs.values[rows, :T])


REWARD_TERMS = [Term("correct", 1.0, normalize="batch"), Term("format", 0.5, gate="correct", gate_threshold=0.5)]


def _reward_components():
    return {"correct": torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0]),
            "format": torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 1.0])}


# ----------------------------------------------------------------------------- one update, in one process or many


def _update(case, rollout, adv, returns, seed: int):
    """Fresh tiny model (and critic), wrapped for `parallel` when ranks exist; one policy_update. Returns (metrics,
    {name: full weights} of the policy and the critic)."""
    parallel, aggregation, epochs, minibatches, extra = case
    model, _ = build_tiny(0)
    model.train()
    critic = critic_opt = value_objective = None
    if extra in ("critic", "shared_critic"):
        critic = Critic.from_policy(model, shared=extra == "shared_critic")
        torch.nn.init.normal_(critic.head.weight, std=0.1, generator=torch.Generator().manual_seed(3))
        critic_opt = torch.optim.SGD(critic.parameters(), lr=0.1)
        value_objective = partial(clipped_value_loss, clip=0.2, coef=0.5, aggregation=aggregation)
    policy = wrap_policy(model, parallel)
    opt = torch.optim.SGD(list(policy.parameters()), lr=0.1)
    objective = partial(ppo_clip_objective, aggregation=aggregation,
                        **({"kl_coef": 0.1, "kl_estimator": "k2", "entropy_coef": 0.01} if extra == "kl" else {}))
    trained = None if critic is None else CriticTraining(critic, critic_opt, value_objective, returns)
    out = policy_update(policy, opt, rollout, adv, objective, Execution(micro_batch_size=2, max_len=8),
                        Passes(epochs, minibatches, 1e9), skip_zero_advantage=extra == "",
                        generator=torch.Generator().manual_seed(seed), critic=trained)
    full = lambda p: p.full_tensor() if hasattr(p, "full_tensor") else p  # noqa: E731
    weights = {n: full(p).detach().clone() for n, p in model.named_parameters()}
    if critic is not None:
        weights |= {f"critic.{n}": p.detach().clone() for n, p in critic.named_parameters()}
    return out, weights


HELDOUT = [Example(f"{a} + {b} =", str(a + b)) for a, b in [(1, 2), (3, 4), (5, 6), (7, 8), (9, 9)]]


def _sample(model, tok, rank: int):
    """Rank-dependent prompts and lengths: under FSDP each rank decodes a different number of tokens."""
    return collect_rollout(model, tok, [HELDOUT[rank]], group_size=2, max_new_tokens=3 + 5 * rank, temperature=1.0,
                           generator=torch.Generator().manual_seed(rank)).response_ids


def _fsdp_outside_the_update(rank: int) -> dict:
    """FSDP2 beyond the update: sampling and evaluation with the gathered weights, and the weights to save."""
    model, tok = build_tiny(0)
    with torch.no_grad():   # weights unlike build_tiny(0)'s, so a checkpoint of the initial weights would not pass
        model.model.norm.weight.mul_(1.5)
    policy = wrap_policy(model, "fsdp")
    with full_params(policy):
        sample = _sample(model, tok, rank)
        ev = D.evaluate_split(lambda exs: evaluate(model, tok, exs, max_new_tokens=6), HELDOUT)
    saved = full_model(model)
    return {"sample": sample, "eval": ev, "saved": None if saved is None else saved.state_dict()}


def _worker(rank: int, port: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=W)
    try:
        data = torch.load(path, weights_only=False)
        rows = torch.arange(4 * rank, 4 * rank + 4)
        rollout, adv, returns = data["rollout"].select(rows), data["adv"][rows], data["returns"][rows]
        updates = [_update(case, rollout, adv, returns, seed=rank) for case in CASES]   # rank 1's seed differs
        inputs = _local_inputs(_credit_inputs(), rank)
        credit = [D.global_credit(partial(CREDIT.get(name), **kw), inputs) for name, kw in ESTIMATORS]
        comps = {k: v[rows] for k, v in _reward_components().items()}
        local = RewardResult(total=combine(comps, REWARD_TERMS), components=comps, failures={})
        rewards = D.global_rewards(local, REWARD_TERMS).total
        metrics = D.reduce_metrics({"step": 3, "reward": [0.25, 0.75][rank], "update_rows": 4 - 2 * rank,
                                    "time_update": [1.0, 2.0][rank], "step_reward": [None, 0.5][rank],
                                    "steps_scored": [0, 6][rank]},
                                   sums=("update_rows",), weights={"step_reward": "steps_scored"})
        results = {"updates": updates, "credit": [c.advantages for c in credit], "rewards": rewards,
                   "metrics": metrics, "fsdp": _fsdp_outside_the_update(rank)}
        torch.save(results, f"{path}.rank{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The global batch, what one process computes on it, and what each of 2 ranks computes on its half."""
    rollout, adv, returns = _global_batch()
    path = str(tmp_path_factory.mktemp("dist") / "batch.pt")
    torch.save({"rollout": rollout, "adv": adv, "returns": returns}, path)
    torch.multiprocessing.spawn(_worker, args=(_free_port(), path), nprocs=W)
    ranks = [torch.load(f"{path}.rank{r}", weights_only=False) for r in range(W)]
    return {"rollout": rollout, "adv": adv, "returns": returns, "ranks": ranks}


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("i", range(len(CASES)), ids=["-".join(map(str, c)).strip("-") for c in CASES])
def test_update_on_two_ranks_equals_one_process(two_ranks, i):
    case = CASES[i]
    one, one_weights = _update(case, two_ranks["rollout"], two_ranks["adv"], two_ranks["returns"], seed=0)
    before = {k: p.detach() for k, p in build_tiny(0)[0].named_parameters()}
    for rank_result in two_ranks["ranks"]:
        out, weights = rank_result["updates"][i]
        assert weights.keys() == one_weights.keys()
        diff = max(float((weights[k] - one_weights[k]).abs().max()) for k in weights)
        assert diff <= WEIGHT_ATOL, f"{case}: max |weight difference| {diff:.2e}"
        moved = max(float((one_weights[k] - before[k]).abs().max()) for k in before)
        assert moved > 1e-3                                     # the step did something a wrong sum would change
        for k, v in one.items():
            if k != "update_rows":                             # this rank's rows; summed by reduce_metrics
                assert out[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (case, k)
    assert sum(r["updates"][i][0]["update_rows"] for r in two_ranks["ranks"]) == one["update_rows"]


@pytest.mark.parametrize("i", range(len(ESTIMATORS)), ids=[f"{n}{kw or ''}" for n, kw in ESTIMATORS])
def test_advantages_on_two_ranks_equal_one_process(two_ranks, i):
    name, kw = ESTIMATORS[i]
    full = CREDIT.get(name)(_credit_inputs(), **kw).advantages                        # [8, T]
    for rank, result in enumerate(two_ranks["ranks"]):
        mine = result["credit"][i]
        rows = full[4 * rank:4 * rank + 4]
        assert torch.allclose(mine, rows[:, :mine.shape[1]], atol=ATOL)
        assert not rows[:, mine.shape[1]:].any()                  # nothing past this rank's longest response


def test_group_ids_are_made_global_so_groups_do_not_mix_across_ranks():
    # each rank's sampler numbers its groups 0, 1: gathered without an offset, rank 0's group 0 and rank 1's would
    # be one group of 4, and the advantages (which the test above checks) would differ
    inputs = _credit_inputs()
    merged = CreditInputs(**{**inputs.__dict__, "group_ids": torch.tensor([0, 0, 1, 1, 0, 0, 1, 1])})
    assert not torch.allclose(CREDIT.get("grpo")(merged).advantages, CREDIT.get("grpo")(inputs).advantages, atol=1e-3)


def test_batch_normalised_reward_terms_use_the_global_batch(two_ranks):
    full = combine(_reward_components(), REWARD_TERMS)
    got = torch.cat([r["rewards"] for r in two_ranks["ranks"]])
    assert torch.allclose(got, full, atol=ATOL)
    local = torch.cat([combine({k: v[4 * r:4 * r + 4] for k, v in _reward_components().items()}, REWARD_TERMS)
                       for r in range(W)])
    assert not torch.allclose(local, full, atol=1e-3)          # the per-rank z-score would differ


def test_metrics_are_reduced_over_ranks(two_ranks):
    for r in two_ranks["ranks"]:
        assert r["metrics"] == {"step": 3, "reward": 0.5, "update_rows": 6, "time_update": 2.0,
                                "step_reward": 0.5, "steps_scored": 3.0}


def test_fsdp_samples_evaluates_and_saves_with_the_whole_weights(two_ranks):
    model, tok = build_tiny(0)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    for rank, r in enumerate(two_ranks["ranks"]):
        assert torch.equal(r["fsdp"]["sample"], _sample(model, tok, rank))   # the same tokens as unsharded
    one = evaluate(model, tok, HELDOUT, max_new_tokens=6)
    for r in two_ranks["ranks"]:
        ev = r["fsdp"]["eval"]
        assert ev["n"] == len(HELDOUT)
        assert ev["accuracy"] == pytest.approx(one["accuracy"]) and ev["response_length"] == pytest.approx(one["response_length"])
        assert ev["given_counts"] == one["given_counts"] and ev["answer_counts"] == one["answer_counts"]
    saved = two_ranks["ranks"][0]["fsdp"]["saved"]
    assert two_ranks["ranks"][1]["fsdp"]["saved"] is None                     # rank 0 alone saves
    assert saved.keys() == model.state_dict().keys()
    assert all(torch.equal(saved[k], v) for k, v in model.state_dict().items())


def test_one_process_helpers_are_the_identity():
    assert D.world() == 1 and D.rank() == 0 and D.is_main()
    inputs = _credit_inputs()
    assert torch.equal(D.global_credit(CREDIT.get("grpo"), inputs).advantages, CREDIT.get("grpo")(inputs).advantages)
    assert D.split_prompts([1, 2, 3]) == [1, 2, 3]
    model = build_tiny(0)[0]
    assert wrap_policy(model, "fsdp") is model


# ----------------------------------------------------------------------------- the real CLI under torchrun


def _torchrun(tmp_path, *overrides):
    """`torchrun --nproc-per-node 2 -m llmrl train examples/tiny_smoke.yaml ...` into tmp_path/r."""
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(_free_port()), "-m", "llmrl", "train",
           str(Path(__file__).parents[2] / "examples" / "tiny_smoke.yaml"), f"run.output_dir={tmp_path}", "run.name=r",
           *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _train_steps(run_dir: Path) -> list[int]:
    return [x["step"] for x in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if x["kind"] == "train"]


@pytest.mark.parametrize("parallel", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_torchrun_two_processes_trains_and_rank0_writes_one_run(tmp_path, parallel):
    proc = _torchrun(tmp_path, "run.steps=2", f"run.parallel={parallel}",
                     *(["run.save_every=1"] if parallel == "ddp" else []))
    assert proc.stdout.count("held-out accuracy") == 1                  # rank 0 alone prints the table
    run = tmp_path / "r"
    assert [p for p in tmp_path.glob("**/metrics.jsonl") if "checkpoints" not in p.parts] == [run / "metrics.jsonl"]
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in lines if x["kind"] == "train"]
    assert [x["step"] for x in train] == [1, 2] and all(x["update_rows"] == 8 for x in train)
    assert {x["step"] for x in lines if x["kind"] == "eval"} == {0, 1, 2}
    from transformers import AutoModelForCausalLM
    saved = AutoModelForCausalLM.from_pretrained(run / "final")
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in build_tiny(0)[0].parameters())
    if parallel == "ddp":                       # the resumable checkpoint holds each rank's sampling generator
        rng = torch.load(run / "checkpoints" / "step-000002" / "rng.pt", weights_only=True)
        assert len(rng["rank_generators"]) == 2 and not torch.equal(*rng["rank_generators"])


@pytest.mark.slow
def test_torchrun_ddp_run_resumes_from_its_checkpoint(tmp_path):
    _torchrun(tmp_path, "run.steps=1", "run.save_every=1")
    _torchrun(tmp_path, "run.steps=2", "run.save_every=1")               # run.resume=auto: continues after step 1
    assert _train_steps(tmp_path / "r") == [1, 2]


@pytest.mark.parametrize("overrides, message", [
    (["objective.update=trpo", "objective.kl_coef=0"], "trpo runs in one process only"),
    (["run.parallel=fsdp", "model.lora_r=4"], "does not support LoRA"),
    (["run.parallel=fsdp", "credit.values=critic", "credit.estimator=gae", "critic.shared_trunk=true"], "shared_trunk"),
    (["rollout.prompts_per_step=3"], "must divide by the number of ranks"),
    (["run.parallel=fsdp", "run.save_every=5"], "writes and reads no resumable checkpoints"),
])
def test_unsupported_compositions_fail_before_training(monkeypatch, overrides, message):
    from llmrl.config_loader import load_config
    from llmrl.distributed.parallel import check_parallel

    check_parallel(load_config(None, overrides))                       # one process: all fine
    monkeypatch.setattr(D, "world", lambda: 2)
    with pytest.raises(ValueError, match=message):
        check_parallel(load_config(None, overrides))


def test_prompts_that_do_not_split_evenly_over_ranks_are_refused(monkeypatch):
    monkeypatch.setattr(D, "world", lambda: 3)
    with pytest.raises(ValueError, match="must divide by the number of ranks"):
        D.split_prompts([1, 2, 3, 4])


@pytest.mark.slow
def test_torchrun_dynamic_sampling_runs_without_a_hang(tmp_path):
    """Every rank takes the same number of rounds (the tiny model's groups all score 0, so every round is dropped
    and the bound ends the loop on both ranks together)."""
    _torchrun(tmp_path, "run.steps=1", "rollout.sampling=dynamic", "rollout.dynamic_max_rounds=2")
    (rec,) = [x for x in map(json.loads, (tmp_path / "r" / "metrics.jsonl").read_text().splitlines())
              if x["kind"] == "train"]
    assert rec["sampling_rounds"] == 2 and rec["sampling_prompts_drawn"] == 4 and rec["update_rows"] == 8
