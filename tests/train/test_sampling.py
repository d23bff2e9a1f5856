"""Sampling strategies (train/sampling.py): DAPO dynamic sampling (zero variance judged by variance, refills, the
round bound, the same decision on 2 ranks), the overlong penalty, truncation masking, the pass-rate curriculum and
the per-step group statistics — on a scripted collector whose completions are their own rewards."""

import socket
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as torch_dist

from llmrl.config_loader import config_from_dict
from llmrl.data.tasks import Example
from llmrl.rewards import REWARDS
from llmrl.rewards.overlong import overlong_penalty
from llmrl.rollout.types import Rollout, concat_rollouts
from llmrl.train.sampling import PassRates, curriculum, dynamic, group_counts, plain

G = 2


@REWARDS.register("sampling_test_value")
def _value(completions, examples):
    """The completion is its own reward: "0.5" scores 0.5."""
    return [float(c.split()[0]) for c in completions]


# prompt name -> the completions of its group: "v*" varied, "z*" all 0, "h*" all 0.5 (zero variance, mean 0.5),
# "m*" 0 and 1 (mean 0.5, varied), "t*" varied and cut at max_new_tokens
SCRIPT = {"v": ["1", "0"], "z": ["0", "0"], "h": ["0.5", "0.5"], "m": ["0", "1"], "t": ["1", "0"]}


def collect(model, tokenizer, examples, *, group_size, max_new_tokens, **_):
    B, P, T = len(examples), 2, 3 + len(examples[0].prompt) % 2      # part lengths differ: padding is exercised
    N = B * group_size
    completions = [c for ex in examples for c in SCRIPT[ex.prompt[0]]]
    lengths = torch.tensor([T if ex.prompt[0] == "t" else 1 + i % 2 for ex in examples for i in range(group_size)])
    resp = (torch.arange(T)[None] < lengths[:, None]).float()
    return Rollout(input_ids=torch.arange(N * (P + T)).view(N, P + T) + 1, response_mask=resp,
                   attention_mask=torch.cat([torch.ones(N, P, dtype=torch.long), resp.long()], 1),
                   logp_old=-resp, group_ids=torch.arange(B).repeat_interleave(group_size),
                   completions=completions, examples=[ex for ex in examples for _ in range(group_size)],
                   extras={"truncated": lengths == T})


def recipe(batches, **rollout):
    cfg = config_from_dict({"rollout": {"prompts_per_step": 4, "group_size": G, "max_new_tokens": 4, **rollout},
                            "reward": {"terms": ["sampling_test_value"]}})
    return SimpleNamespace(cfg=cfg, collect=collect, policy=torch.nn.Linear(1, 1), model=None, tokenizer=SimpleNamespace(
        pad_token_id=0), ex=SimpleNamespace(autocast_dtype=None), generator=None, batches=iter(batches),
        pass_rates=PassRates(cfg.rollout.curriculum_pool))


def exs(*names):
    return [Example(prompt=n, answer="") for n in names]


def test_zero_variance_is_judged_by_variance_not_by_the_mean():
    r = recipe([])
    out = plain(r, exs("h1", "m2", "z3", "v4"))
    varied, counts = group_counts(out.rollout, out.rewards)
    assert varied.tolist() == [False, True, False, True]     # h (0.5, 0.5) and m (0, 1) share the mean 0.5
    assert out.stats["zero_variance_group_fraction"] == 0.5


def test_duplicate_completion_fraction():
    out = plain(recipe([]), exs("v1", "z2", "h3", "m4"))     # z and h groups repeat their completion: 2 of 8
    assert out.stats["duplicate_completion_fraction"] == pytest.approx(2 / 8)


def test_dynamic_refills_with_new_prompts_until_the_batch_is_full():
    r = recipe([exs("z5", "v6", "m7", "z8"), exs("v9", "v10", "v11", "v12")], sampling="dynamic")
    out = dynamic(r, exs("v1", "z2", "z3", "m4"))             # 2 kept, then 2 more: full after 2 rounds
    assert out.stats["sampling_rounds"] == 2 and out.stats["sampling_prompts_drawn"] == 8
    assert out.stats["sampling_prompts_kept"] == 4
    assert out.stats["sampling_wasted_fraction"] == pytest.approx(0.5)
    assert [e.prompt for e in out.rollout.examples[::G]] == ["v1", "m4", "v6", "m7"]
    assert out.rollout.group_ids.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]        # renumbered: groups never merge
    assert len(out.rollout.extras["truncated"]) == 8 and len(out.rewards.total) == 8
    assert next(r.batches)[0].prompt == "v9"                  # the second batch was not drawn


def test_dynamic_stops_at_the_round_bound_and_keeps_what_it_has():
    r = recipe([exs("z5", "z6", "z7", "z8")] * 5, sampling="dynamic", dynamic_max_rounds=3)
    out = dynamic(r, exs("v1", "z2", "z3", "z4"))
    assert out.stats["sampling_rounds"] == 3 and out.stats["sampling_prompts_kept"] == 1
    assert [e.prompt for e in out.rollout.examples] == ["v1", "v1"]


def test_dynamic_with_nothing_to_keep_trains_on_the_last_round():
    r = recipe([exs("z5", "z6", "z7", "z8")], sampling="dynamic", dynamic_max_rounds=2)
    out = dynamic(r, exs("z1", "z2", "z3", "z4"))
    assert [e.prompt for e in out.rollout.examples[::G]] == ["z5", "z6", "z7", "z8"]
    assert out.stats["sampling_prompts_kept"] == 0 and out.stats["sampling_wasted_fraction"] == 1.0


def test_dynamic_needs_groups_of_two():
    from llmrl.train.checks import check_sampling

    with pytest.raises(ValueError, match="group_size >= 2"):
        check_sampling(config_from_dict({"rollout": {"sampling": "dynamic", "group_size": 1}}))
    check_sampling(config_from_dict({"rollout": {"sampling": "dynamic", "group_size": 2}}))


def test_overlong_penalty_hand_computed():
    # L_max 10, buffer 4: free up to 6 tokens, then -1/4 per token, -1 at the cap
    got = overlong_penalty(torch.tensor([3, 6, 7, 9, 10]), max_len=10, buffer=4)
    assert torch.allclose(got, torch.tensor([0.0, 0.0, -0.25, -0.75, -1.0]))
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(torch.tensor([1]), max_len=4, buffer=5)


def test_overlong_shaping_and_truncation_masking_in_the_draw():
    r = recipe([], max_new_tokens=3, overlong_buffer=0.3, overlong_weight=0.5, mask_truncated=True)   # 1 token
    out = plain(r, exs("t1", "v2"))        # t rows are 3 tokens long (the cap: -1), v rows 1 or 2 (free)
    assert out.rewards.components["overlong"].tolist() == [-1.0, -1.0, 0.0, 0.0]
    assert out.rewards.total.tolist() == [0.5, -0.5, 1.0, 0.0]
    assert out.rollout.response_mask[:2].sum() == 0 and out.rollout.response_mask[2:].sum() > 0


def test_pass_rates_prefer_the_learnable_retire_the_solved_and_stay_bounded():
    pool = PassRates(size=3)
    assert pool.update(exs("a", "b", "c"), [0.5, 0.0, 1.0]) == 1          # c solved at once: retired
    assert [e.prompt for e in pool.learnable(5)] == ["a"]                  # b (rate 0) is not learnable
    pool.update(exs("a"), [1.0])                                           # (0.5 + 1) / 2 = 0.75: stays
    assert pool.pool["a"][0] == 0.75
    pool.update(exs("d", "e"), [0.5, 0.5])                                 # 4 prompts: the oldest (b) leaves
    assert list(pool.pool) == ["a", "d", "e"]


def test_curriculum_replays_learnable_prompts():
    r = recipe([], sampling="curriculum", curriculum_replay=0.5, curriculum_pass=1.0)
    first = curriculum(r, exs("v1", "z2", "m3", "v4"))                     # pass rates 0.5, 0, 0.5, 0.5
    assert first.stats["curriculum_replayed"] == 0 and first.stats["curriculum_pool"] == 4
    second = curriculum(r, exs("z5", "z6", "z7", "z8"))
    assert [e.prompt for e in second.rollout.examples[::G]] == ["v1", "m3", "z5", "z6"]
    assert second.stats["curriculum_replayed"] == 2


def test_concat_rollouts_pads_both_sides():
    a = collect(None, None, exs("v1"), group_size=G, max_new_tokens=4)      # P = 2, T = 3 ("v1": 2 chars)
    b = collect(None, None, exs("zz3"), group_size=G, max_new_tokens=4)     # T = 4
    b = b.with_(input_ids=b.input_ids[:, 1:], attention_mask=b.attention_mask[:, 1:])   # P = 1
    c = concat_rollouts([a, b], pad_id=-7)
    assert c.input_ids.shape == (4, 2 + 4) and c.prompt_len == 2
    assert c.input_ids[2, 0] == -7 and c.attention_mask[2, 0] == 0         # b's prompt left-padded
    assert c.input_ids[0, -1] == -7 and c.response_mask[0, -1] == 0        # a's response right-padded
    assert c.attention_mask[0, -1] == 0 and c.logp_old[0, -1] == 0
    assert torch.equal(c.response_ids[2], b.response_ids[0]) and torch.equal(c.response_ids[0, :3], a.response_ids[0])
    assert c.group_ids.tolist() == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- two ranks decide together

def _rank_worker(rank: int, port: int, out: str) -> None:
    torch_dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # round 1: rank 0 gets (v, v): full; rank 1 gets (z, z). Round 2: rank 1 gets one varied group. Round 3:
        # none. Rank 0 alone would stop after round 1; both must take 3 rounds and keep min(2, 1) = 1 group.
        r = recipe([exs("z5", "z6", "v7", "z8"), exs("z9", "z10", "z11", "z12")], sampling="dynamic",
                   dynamic_max_rounds=3)
        s = dynamic(r, exs("v1", "v2", "z3", "z4"))
        torch.save({"stats": s.stats, "prompts": [e.prompt for e in s.rollout.examples]}, f"{out}.{rank}")
    finally:
        torch_dist.destroy_process_group()


def test_dynamic_sampling_on_two_ranks_takes_one_decision(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_rank_worker, args=(port, str(tmp_path / "out")), nprocs=2)
    ranks = [torch.load(tmp_path / f"out.{i}", weights_only=False) for i in range(2)]
    assert [x["stats"]["sampling_rounds"] for x in ranks] == [3, 3]
    assert ranks[0]["prompts"] == ["v1", "v1"] and ranks[1]["prompts"] == ["v7", "v7"]
    for x in ranks:
        assert x["stats"]["sampling_prompts_drawn"] == 12 and x["stats"]["sampling_prompts_kept"] == 2
        assert x["stats"]["zero_variance_group_fraction"] == pytest.approx(9 / 12)


def test_sampled_entropy_is_the_mean_negative_log_prob_of_the_chosen_tokens():
    out = plain(recipe([]), exs("v1", "z2"))          # logp_old = -1 on every chosen token (the scripted sampler)
    assert out.stats["sampled_entropy"] == pytest.approx(1.0)
