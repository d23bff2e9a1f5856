"""Padding-free packing: the packed backbone gives the padded path's log-probs, entropies and gradients."""

import copy
from functools import partial

import pytest
import torch

from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.models.lora import AdapterDisabledReference, add_lora
from llmrl.models.value import Critic
from llmrl.compute.logprobs import response_logprobs
from llmrl.compute.packing import first_fit_decreasing, length_buckets, pack_layout
from llmrl.objectives.policy import ppo_clip_objective
from llmrl.rollout.types import Rollout
from llmrl.compute.batches import batched_logprobs
from llmrl.compute.settings import Execution
from llmrl.train.update import Passes, policy_update

PAD = 3


def rows(prompt_lens, response_lens, seed=0):
    """input_ids, attention_mask [N, P+T] in the rollout layout: left-padded prompts, right-padded responses."""
    P, T = max(prompt_lens), max(response_lens)
    ids = torch.randint(4, 100, (len(prompt_lens), P + T), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros_like(ids)
    for i, (p, r) in enumerate(zip(prompt_lens, response_lens)):
        mask[i, P - p:P + r] = 1
    return torch.where(mask.bool(), ids, PAD), mask, mask[:, P:].float()


# rows of very different lengths; all-equal responses (only the prompts are padded); no padding at all
CASES = {"mixed": ([12, 3, 7, 1, 9], [20, 1, 5, 13, 2]), "prompt_padding_only": ([9, 2, 5], [6, 6, 6]),
         "no_padding": ([4, 4], [3, 3])}


def test_first_fit_decreasing_by_hand():
    assert first_fit_decreasing([5, 3, 8, 2, 4], 10) == [[2, 3], [0, 4], [1]]
    assert first_fit_decreasing([12, 3], 10) == [[0], [1]]                # too long: a pack of its own
    bins = first_fit_decreasing([7, 1, 9, 4, 4, 2, 6, 3], 10)
    assert sorted(i for b in bins for i in b) == list(range(8))
    assert all(sum([7, 1, 9, 4, 4, 2, 6, 3][i] for i in b) <= 10 for b in bins) and len(bins) == 4


def test_pack_layout_by_hand():
    #            [. . a b c d .]  [e f g h i . .]   -> one pack of 9: a b c d e f g h i, positions restart at e
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 0, 0]])
    lay = pack_layout(mask, 9)
    assert lay.source.tolist() == [[7, 8, 9, 10, 11, 2, 3, 4, 5]]             # the longer row goes first
    assert lay.positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert lay.target.tolist() == [[9, 9, 5, 6, 7, 8, 9], [0, 1, 2, 3, 4, 9, 9]]
    assert not lay.shared
    lay = pack_layout(mask, 5)                                                 # two packs; the short one padded
    assert lay.source.tolist() == [[7, 8, 9, 10, 11], [2, 3, 4, 5, 0]] and lay.positions[1].tolist() == [0, 1, 2, 3, 0]
    lay = pack_layout(mask, 9, align=4)                              # length rounded up to 12: three padding slots
    assert lay.source.tolist() == [[7, 8, 9, 10, 11, 2, 3, 4, 5, 0, 0, 0]]
    assert lay.segment[0, 9:].tolist() == [-1, -1, -1] and lay.owner[0, 9:].tolist() == [-1, -1, -1]
    assert lay.target.tolist() == [[12, 12, 5, 6, 7, 8, 12], [0, 1, 2, 3, 4, 12, 12]]   # 12: the zero slot


def test_length_buckets():
    # longest first; a new block where a length falls below half the block's longest (from SPLIT_MIN tokens on)
    assert length_buckets([64, 10, 33, 32, 40, 5, 16]) == [[0, 4, 2, 3], [6, 1], [5]]
    assert length_buckets([15, 3, 1, 7]) == [[0, 3, 1, 2]]                     # short: one block, whatever the spread
    assert length_buckets([]) == []


def test_shared_prompt_layout_by_hand():
    # rows 0 and 2 share the prompt "5 6" (row 2 left-padded more); row 1's prompt differs. P = 3, T = 3.
    ids = torch.tensor([[9, 5, 6, 20, 21, 0], [7, 8, 9, 30, 0, 0], [0, 5, 6, 40, 41, 42]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    lay = pack_layout(mask, 16, prompt_len=3, input_ids=ids)
    K, L = lay.source.shape
    assert (K, L) == (1, 11) and lay.shared
    # segment 0: prompt 5 6 (row 0's), row 0's 20 21, row 2's 40 41 42; segment 1: row 1's 7 8 9 30
    assert ids.flatten()[lay.source[0]].tolist() == [5, 6, 20, 21, 40, 41, 42, 7, 8, 9, 30]
    assert lay.positions[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 0, 1, 2, 3]     # responses continue from the prompt
    assert lay.owner[0].tolist() == [-1, -1, 0, 0, 2, 2, 2, -1, -1, -1, 1]
    assert lay.target[0, 1:3].tolist() == lay.target[2, 1:3].tolist() == [0, 1]   # one copy of the prompt
    plan = lay.segment_plan()
    pad = K * L                                  # the zero slot padding reads and writes
    (prompt_q, prompt_k, prompt_mask), (resp_q, resp_k, resp_mask) = plan.blocks   # short responses: one block
    assert prompt_q.tolist() == prompt_k.tolist() == [[0, 1, pad], [7, 8, 9]]     # segment 0's prompt is 2 long
    assert prompt_mask[0, 0, :2].tolist() == [[True, False, False], [True, True, False]]
    assert resp_q.tolist() == [[4, 5, 6], [2, 3, pad], [10, pad, pad]]             # longest response first
    assert resp_k.tolist() == [[0, 1, pad, 4, 5, 6], [0, 1, pad, 2, 3, pad], [7, 8, 9, 10, pad, pad]]
    m = resp_mask[:, 0]
    assert m[0, 0].tolist() == [True, True, False, True, False, False]     # row 2's first token: prompt + itself
    assert m[0, 2].tolist() == [True, True, False, True, True, True]
    assert m[2, 0].tolist() == [True, True, True, True, False, False]      # row 1 sees only its own prompt
    assert all(m.any(-1).flatten())                                          # no empty softmax row, padding too
    m = lay.attention_mask()[0, 0]                                             # the block mask (checkpointing)
    assert m[4].tolist() == [True, True, False, False, True] + [False] * 6      # row 2's first token: prompt + itself
    assert not m[7, :7].any() and m[10, 7:].all()                              # row 1 sees only its own segment
    add = lay.attention_mask(torch.float32)[0, 0]
    assert torch.equal(add == 0, m) and (add[~m] == torch.finfo(torch.float32).min).all()
    # a small pack splits the group: each part carries its own copy of the prompt
    lay = pack_layout(mask, 5, prompt_len=3, input_ids=ids)
    assert not lay.shared and lay.source.shape[0] == 3


def logp_and_grad(model, ids, mask, rmask, **kw):
    model.zero_grad(set_to_none=True)
    logp, entropy = response_logprobs(model, ids, mask, rmask.shape[1], chunk=7, **kw)
    ((logp * rmask).sum() + 0.1 * (entropy * rmask).sum()).backward()
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    model.zero_grad(set_to_none=True)
    return logp.detach() * rmask, entropy.detach() * rmask, grad


@pytest.mark.parametrize("pack_tokens", [None, 24])
def test_head_runs_on_real_response_tokens_only(tiny, pack_tokens):
    model = tiny[0]
    ids, mask, rmask = rows(*CASES["mixed"])
    T = rmask.shape[1]
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=mask,
                                       position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.float(), -1)
        logp, entropy = response_logprobs(model, ids, mask, T, chunk=2, pack_tokens=pack_tokens)
    want = full[:, -T - 1:-1].gather(-1, ids[:, -T:, None])[..., 0]
    real = rmask.bool()
    assert torch.allclose(logp[real], want[real], atol=1e-5)
    assert torch.all(logp[~real] == 0) and torch.all(entropy[~real] == 0)     # padding: exactly zero, no head work


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("pack_tokens", [8, 24, 1000])
def test_packed_equals_padded(tiny, case, pack_tokens):
    model = copy.deepcopy(tiny[0]).train()
    ids, mask, rmask = rows(*CASES[case])
    want = logp_and_grad(model, ids, mask, rmask)
    got = logp_and_grad(model, ids, mask, rmask, pack_tokens=pack_tokens)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()


def grouped_rows(prompt_lens, group, response_lens, seed=0):
    """Like `rows`, with each prompt repeated for `group` consecutive rows (a GRPO group) and its own responses."""
    ids, mask, rmask = rows([p for p in prompt_lens for _ in range(group)], response_lens, seed)
    P = max(prompt_lens)
    ids[:, :P] = ids[::group, :P].repeat_interleave(group, 0)
    return ids, mask, rmask


GROUPED = ([7, 3], 4, [5, 1, 9, 3, 2, 8, 8, 4])      # 2 prompts x 4 responses


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_tokens", [12, 24, 1000])
@pytest.mark.parametrize("checkpointing", [False, True])   # True: the explicit block mask, recomputed in backward
def test_shared_prompt_packing_equals_padded(tiny, attn, pack_tokens, checkpointing):
    model = copy.deepcopy(tiny[0]).train()
    model.config._attn_implementation = attn
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, mask, rmask = grouped_rows(*GROUPED)
    lay = pack_layout(mask, pack_tokens, prompt_len=mask.shape[1] - rmask.shape[1], input_ids=ids)
    assert lay.shared and (lay.source.shape[0] == 1) == (pack_tokens == 1000)
    assert int((lay.owner == -1).logical_and(lay.segment >= 0).sum()) < 4 * (7 + 3)   # fewer prompt copies than rows
    want = logp_and_grad(model, ids, mask, rmask)
    got = logp_and_grad(model, ids, mask, rmask, pack_tokens=pack_tokens)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_packing_with_response_blocks_by_length(tiny, attn):
    # responses of 2 to 40 tokens: segment attention runs them in several blocks, each padded to its own longest
    model = copy.deepcopy(tiny[0]).train()
    model.config._attn_implementation = attn
    ids, mask, rmask = grouped_rows([7, 3], 4, [40, 3, 17, 25, 2, 33, 8, 19])
    lay = pack_layout(mask, 1000, prompt_len=mask.shape[1] - rmask.shape[1], input_ids=ids)
    blocks = lay.segment_plan().blocks
    assert [q.shape for q, _, _ in blocks] == [(2, 7), (3, 40), (2, 19), (3, 8)]   # prompts, then by length
    want = logp_and_grad(model, ids, mask, rmask)
    got = logp_and_grad(model, ids, mask, rmask, pack_tokens=1000)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()


def test_shared_prompt_packing_critic_and_update(tiny):
    ids, mask, rmask = grouped_rows(*GROUPED)
    N, T = rmask.shape
    critic = Critic.from_policy(copy.deepcopy(tiny[0]), shared=False)
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    padded = critic(ids, mask, T) * rmask
    critic.pack_tokens = 1000
    assert torch.allclose(critic(ids, mask, T) * rmask, padded, atol=1e-5)
    rollout = Rollout(input_ids=ids, attention_mask=mask, response_mask=rmask, logp_old=torch.zeros(N, T),
                      group_ids=torch.arange(N) // 4, completions=[""] * N, examples=[None] * N)
    adv = torch.linspace(-1, 1, N)[:, None] * rmask

    def step(pack_tokens):
        m = copy.deepcopy(tiny[0]).train()
        policy_update(m, torch.optim.SGD(m.parameters(), lr=0.1), rollout, adv, ppo_clip_objective,
                      Execution(pack_tokens=pack_tokens, micro_batch_size=N, max_len=T), Passes(max_grad_norm=1e9))
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.allclose(step(1000), step(None), atol=1e-6)


def test_packed_with_eager_attention_lora_and_gradient_checkpointing(tiny):
    model = copy.deepcopy(tiny[0]).train()
    model.config._attn_implementation = "eager"
    model.gradient_checkpointing_enable()
    model = add_lora(model, r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj", "up_proj"])
    for n, p in model.named_parameters():     # a non-zero adapter, so the adapter's gradient path is exercised
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(1))
    ids, mask, rmask = rows(*CASES["mixed"])
    want = logp_and_grad(model, ids, mask, rmask)
    got = logp_and_grad(model, ids, mask, rmask, pack_tokens=24)
    for g, w in zip(got, want):
        assert torch.allclose(g, w, atol=1e-5), (g - w).abs().max()
    reference = AdapterDisabledReference(model)               # the base weights through disable_adapter()
    with torch.no_grad():
        ref_pad = response_logprobs(reference, ids, mask, rmask.shape[1])[0] * rmask
        ref_pack = response_logprobs(reference, ids, mask, rmask.shape[1], pack_tokens=24)[0] * rmask
    assert torch.allclose(ref_pack, ref_pad, atol=1e-5) and not torch.allclose(ref_pad, want[0], atol=1e-3)


def test_packed_critic_values(tiny):
    critic = Critic.from_policy(copy.deepcopy(tiny[0]), shared=False)
    torch.nn.init.normal_(critic.head.weight, generator=torch.Generator().manual_seed(0))
    ids, mask, rmask = rows(*CASES["mixed"])
    padded = critic(ids, mask, rmask.shape[1]) * rmask
    critic.pack_tokens = 16
    assert torch.allclose(critic(ids, mask, rmask.shape[1]) * rmask, padded, atol=1e-5)


def test_policy_update_with_packing_takes_the_same_step(tiny):
    ids, mask, rmask = rows(*CASES["mixed"])
    N, T = rmask.shape
    rollout = Rollout(input_ids=ids, attention_mask=mask, response_mask=rmask, logp_old=torch.zeros(N, T),
                      group_ids=torch.arange(N), completions=[""] * N, examples=[None] * N)
    adv = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0])[:, None] * rmask

    def step(pack_tokens):   # two minibatches: logp_old from batched_logprobs, a second step after the first
        m = copy.deepcopy(tiny[0]).train()
        policy_update(m, torch.optim.SGD(m.parameters(), lr=0.1), rollout, adv, partial(ppo_clip_objective, entropy_coef=0.1),
                      Execution(pack_tokens=pack_tokens, micro_batch_size=2, max_len=T), Passes(1, 2, 1e9),
                      generator=torch.Generator().manual_seed(0))
        return torch.cat([p.detach().flatten() for p in m.parameters()])

    assert torch.allclose(step(16), step(None), atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(batched_logprobs(tiny[0], rollout, Execution(pack_tokens=16, micro_batch_size=3)),
                              batched_logprobs(tiny[0], rollout, Execution(micro_batch_size=3)),
                              atol=1e-5)


def test_packing_config():
    cfg = load_config(None, ["optim.packing=true", "optim.pack_tokens=128"])
    assert cfg.optim.packing and cfg.optim.pack_tokens == 128
    assert load_config(None).optim.packing and load_config(None).optim.pack_tokens == 384   # on by default
    with pytest.raises(ConfigError, match="optim.pack_tokens"):
        load_config(None, ["optim.pack_tokens=0"])
