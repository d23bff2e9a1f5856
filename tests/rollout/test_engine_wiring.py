"""The rollout-engine wiring that needs no vLLM: the Samples layout built from vLLM-shaped outputs, the policy's
weights as handed to an engine (LoRA merged in), the recipe with `rollout.engine=vllm` driven by a stand-in
engine (mismatch logged, TIS applied, one weight sync per step), and the error when vLLM is missing."""

import importlib.util
from types import SimpleNamespace

import pytest
import torch

from llmrl.cli import main
from llmrl.models import load_model
from llmrl.models.lora import add_lora, merged_copy
from llmrl.rollout.sampler import generate
from llmrl.rollout.vllm_engine import (PROMPT_ALLOWANCE, _to_samples, default_options, kv_bytes_per_token,
                                       kv_cache_tokens, policy_weights, prefill_waves)
from llmrl.runio.metrics import read_metrics

from scripted import TINY


def completion(index, ids, logps, reason):
    return SimpleNamespace(index=index, token_ids=ids, finish_reason=reason,
                           logprobs=[{t: SimpleNamespace(logprob=lp)} for t, lp in zip(ids, logps)])


def test_samples_from_vllm_shaped_outputs():
    prompts = [[5, 6, 7], [8]]
    outs = [completion(0, [1, 2], [-0.5, -1.0], "stop"), completion(1, [3, 4, 9], [-0.1, -0.2, -0.3], "length"),
            completion(0, [2], [-2.0], "stop"), completion(1, [4, 4, 4], [-1.0, -1.0, -1.0], "length")]
    s = _to_samples(prompts, 2, outs, pad_id=0)
    assert s.prompt_ids.tolist() == [[5, 6, 7], [5, 6, 7], [0, 0, 8], [0, 0, 8]]
    assert s.prompt_mask.tolist() == [[1, 1, 1], [1, 1, 1], [0, 0, 1], [0, 0, 1]]
    assert s.response_ids.tolist() == [[1, 2, 0], [3, 4, 9], [2, 0, 0], [4, 4, 4]]
    assert s.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert torch.allclose(s.logp, torch.tensor([[-0.5, -1.0, 0], [-0.1, -0.2, -0.3], [-2.0, 0, 0], [-1.0] * 3]))
    assert s.truncated.tolist() == [False, True, False, True]


def test_cpu_kv_cache_is_sized_to_the_run(monkeypatch):
    """SmolLM2-135M's shape: 30 layers, 3 key/value heads of 64 (GQA): K and V of a token in bf16 are 23040 bytes.
    A step of 16 rows x (prompt allowance + 64 new tokens) needs ~200 MiB, not the 1 GiB fixed before; never less
    than one max_model_len sequence (vLLM refuses that)."""
    cfg = SimpleNamespace(num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576)
    assert kv_bytes_per_token(cfg, 2) == 2 * 30 * 3 * 64 * 2 == 23040
    cfg.head_dim = 128                                        # an explicit head dim wins over hidden / heads
    assert kv_bytes_per_token(cfg, 1) == 2 * 30 * 3 * 128
    assert kv_cache_tokens(16, 64, 8192) == 16 * (PROMPT_ALLOWANCE + 64) > 8192
    assert kv_cache_tokens(1, 64, 8192) == 8192
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    assert default_options(True, 5 << 20) == {"kv_cache_memory_bytes": 5 << 20}
    assert default_options(True) == {"kv_cache_memory_bytes": 1 << 30}
    assert default_options(False, 5 << 20) == {"gpu_memory_utilization": 0.3, "enable_sleep_mode": True}
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")        # vLLM's own setting is left to vLLM
    assert default_options(True, 5 << 20) == {}


def test_prefill_waves_keep_every_seeded_prefill_in_one_scheduler_step():
    """On the CPU a seeded request whose prefill vLLM splits over scheduler steps crashes it ("CPU Generator does not
    use offset": 16 arithmetic prompts x 8 samples did, 2026-12-06), so requests go in waves whose prompts, times
    their samples, fit the step's token and sequence budget; order is kept and every request is in one wave."""
    lengths = [50] * 16
    waves = prefill_waves(lengths, 8, 2048, 256)
    assert [w.stop - w.start for w in waves] == [5, 5, 5, 1]                     # 8 x 5 x 50 = 2000 <= 2048
    assert [i for w in waves for i in range(w.start, w.stop)] == list(range(16))
    assert all(8 * sum(lengths[w]) <= 2048 for w in waves)
    assert [w.stop - w.start for w in prefill_waves([10] * 10, 8, 10**6, 32)] == [4, 4, 2]   # 8 x 4 <= 32 seqs
    assert prefill_waves([300, 10, 10], 8, 2048, 256) == [slice(0, 1), slice(1, 3)]   # too long alone: own wave
    assert prefill_waves([], 8, 2048, 256) == []
    assert prefill_waves([50] * 4, 1, 2048, 256) == [slice(0, 4)]


def test_policy_weights_plain_and_lora_merged(tiny):
    model, _ = tiny
    plain = dict(policy_weights(model))
    assert plain.keys() == model.state_dict().keys()
    lora = add_lora(load_model("tiny")[0], r=4, alpha=8, dropout=0.0, targets=["q_proj", "down_proj"])
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    merged, expected = dict(policy_weights(lora)), merged_copy(lora).state_dict()
    assert merged.keys() == expected.keys()
    assert all(torch.allclose(merged[k], expected[k], atol=1e-6) for k in expected)
    changed = [k for k in expected if not torch.equal(expected[k], plain[k])]
    assert changed and all("q_proj" in k or "down_proj" in k for k in changed)   # the adapter's layers moved


class StandInEngine:
    """An engine on its own copy of the tiny model whose log-probs sit `shift` nats below its policy's."""

    shift = 0.1

    def __init__(self):
        self.model, self.syncs, self.closed = load_model("tiny")[0].eval(), 0, False

    def generate(self, prompts, *, seed, **kw):
        assert not self.closed, "generate on a closed engine"
        s = generate(self.model, prompts, **kw, generator=torch.Generator().manual_seed(seed))
        return s.__class__(**{**s.__dict__, "logp": (s.logp - self.shift) * s.response_mask})

    def sync_weights(self, model):
        self.model.load_state_dict(model.state_dict())
        self.syncs += 1

    def close(self):
        self.closed = True


@pytest.mark.parametrize("cap, truncated", [(2.0, 0.0), (1.05, 1.0)])   # pi / mu = e^0.1 = 1.105
@pytest.mark.parametrize("epochs", [1, 2])   # 1: the update's forward gives pi_old and w; 2: a forward before it
def test_recipe_with_an_engine_logs_the_mismatch_and_syncs(tmp_path, monkeypatch, cap, truncated, epochs):
    import llmrl.rollout.vllm_engine as vllm_engine
    import llmrl.train.build as build
    import llmrl.train.rules as rules

    engines, weights, real_update = [], [], rules.policy_update

    def update_spy(model, optimizer, rollout, advantages, objective, *a, **kw):   # the weights the objective sees
        def spied(*a, **k):
            weights.append(k["is_weight"])
            return objective(*a, **k)
        return real_update(model, optimizer, rollout, advantages, spied, *a, **kw)

    monkeypatch.setattr(vllm_engine, "vllm_available", lambda: True)
    monkeypatch.setattr(build, "make_engine", lambda cfg: engines.append(StandInEngine()) or engines[-1])
    monkeypatch.setattr(rules, "policy_update", update_spy)
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=r", "run.steps=2", "rollout.engine=vllm",
                 f"rollout.tis_cap={cap}", "reward.terms=[test_vowels]", f"objective.epochs={epochs}"]) == 0
    rows = [r for r in read_metrics(tmp_path / "r" / "metrics.jsonl") if r["kind"] == "train"]
    assert engines[0].syncs == 2 and all(r["time_weight_sync"] >= 0 for r in rows)
    assert engines[0].closed                           # closed once the final evaluation has run on it
    for r in rows:   # the policy is recomputed in fp32 (autocast none): the gap is the engine's shift, exactly
        assert r["mismatch_logp_abs_mean"] == pytest.approx(0.1, abs=1e-4)
        assert r["mismatch_logp_abs_max"] == pytest.approx(0.1, abs=1e-4)
        assert r["tis_truncated_fraction"] == truncated
    w = torch.cat([x.flatten() for x in weights])      # min(e^0.1, cap) on chosen tokens, 1 on padding
    chosen = min(torch.exp(torch.tensor(0.1)).item(), cap)
    assert ((w - chosen).abs() < 1e-4).any() and (((w - chosen).abs() < 1e-4) | ((w - 1).abs() < 1e-4)).all()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_engine_vllm_without_vllm_is_a_clear_error(tmp_path, capsys):
    assert main(["train", *TINY, f"run.output_dir={tmp_path}", "run.name=r", "run.steps=1",
                 "rollout.engine=vllm"]) == 2
    err = capsys.readouterr().err
    assert "rollout.engine=vllm needs vLLM" in err and "setup_vllm.sh" in err
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
