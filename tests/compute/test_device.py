"""run.device: the setting, the machinery each device picks, the GPU decode loop (run eagerly here), the GPU's
packed attention and vLLM engine options on the CPU. The audit of a whole RL step through the device seam is in
test_device_audit.py."""

from __future__ import annotations

import copy

import pytest
import torch

from llmrl.compute.settings import DEVICE_CHOICES, Execution, choices, device_generator, resolve_device
from llmrl.config import ConfigError
from llmrl.config_loader import load_config
from llmrl.presets import PRESETS
from llmrl.rollout.collect import encode_prompt
from llmrl.rollout.sampler import generate
from llmrl.rollout.static_decode import StaticRunner
from test_device_audit import STEP_ARGS

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
TEXTS = ["1 + 1 =", "Name a colour, any colour:", "x"]


# ----------------------------------------------------------------------------- the setting


def test_run_device_is_validated_at_load():
    for good in ("auto", "cpu", "cuda", "cuda:3"):
        assert load_config(None, [f"run.device={good}"], presets=PRESETS).run.device == good
    for bad in ("gpu", "cuda:", "cuda:x", "CPU", "mps"):
        with pytest.raises(ConfigError, match="run.device"):
            load_config(None, [f"run.device={bad}"], presets=PRESETS)


def test_resolve_device(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu",
                                                  0 if torch.cuda.is_available() else None)
    if not torch.cuda.is_available():
        for spec in ("cuda", "cuda:0"):
            with pytest.raises(ValueError, match="CUDA is not available"):
                resolve_device(spec)
    with pytest.raises(ValueError, match="run.device"):
        resolve_device("tpu")


def test_each_device_picks_its_machinery():
    cpu, gpu = choices("cpu"), choices(torch.device("cuda", 1))
    assert cpu == DEVICE_CHOICES["cpu"] and gpu == DEVICE_CHOICES["cuda"]
    assert (cpu.decoder, gpu.decoder) == ("lean", "static")
    assert cpu.segment_attention and not gpu.segment_attention
    assert cpu.retain_heap and not gpu.retain_heap
    assert Execution(device=torch.device("cpu")).head_chunk == cpu.head_chunk < gpu.head_chunk


def test_device_generator_keeps_a_generator_already_there():
    g = torch.Generator().manual_seed(1)
    assert device_generator(g, torch.device("cpu")) is g and device_generator(None, torch.device("cpu")) is None


@cuda
def test_device_generator_seeds_a_gpu_generator_from_the_host_one():
    a = device_generator(torch.Generator().manual_seed(1), torch.device("cuda"))
    b = device_generator(torch.Generator().manual_seed(1), torch.device("cuda"))
    assert a.device.type == "cuda" and torch.equal(torch.rand(4, generator=a, device="cuda"),
                                                   torch.rand(4, generator=b, device="cuda"))


# ----------------------------------------------------------------------------- the GPU decode loop, run eagerly


def tiny_qwen3():
    """A tiny random Qwen3 (per-head q/k norms) on the tiny tokenizer."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from llmrl.models.loading import _build_tiny_tokenizer

    tok = _build_tiny_tokenizer()
    cfg = Qwen3Config(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, intermediate_size=128, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():     # norms of 1 would hide a missing q/k norm
        for name, p in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:
                p.uniform_(0.5, 1.5)
    return model, tok


def full_logp(model, s, temperature: float) -> torch.Tensor:
    ids = torch.cat([s.prompt_ids, s.response_ids], 1)
    mask = torch.cat([s.prompt_mask, s.response_mask.long()], 1)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    T = s.response_ids.shape[1]
    logp = torch.log_softmax(logits[:, -T - 1:-1].float() / temperature, -1)
    return logp.gather(-1, s.response_ids[..., None])[..., 0] * s.response_mask


@pytest.fixture(params=["llama", "qwen3"])
def model_and_tok(request, tiny):
    return tiny if request.param == "llama" else tiny_qwen3()


def test_static_decoder_records_the_logp_a_full_forward_gives(model_and_tok):
    """Rows stop at many steps and keep decoding (no compaction); their recorded log-probs equal a full forward."""
    model, tok = model_and_tok
    stops = tuple(range(0, len(tok), 3))
    s = generate(model, [encode_prompt(tok, t) for t in TEXTS], group_size=4, max_new_tokens=14, temperature=0.8,
                 stop_ids=stops, pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(3),
                 decoder="static")
    lengths = s.response_mask.sum(1)
    assert len(set(lengths.tolist())) >= 3 and lengths.max() >= 5
    assert torch.allclose(s.logp, full_logp(model, s, 0.8), atol=1e-5)
    for row, n in zip(s.response_ids, lengths.long().tolist()):
        assert all(t not in stops for t in row[:n - 1].tolist()) and torch.all(row[n:] == tok.pad_token_id)


@pytest.mark.parametrize("decoder", ["lean", "static"])
def test_bf16_decoders_match_an_autocast_forward(model_and_tok, decoder):
    """In bf16 (the weights cast once, qwen3's q/k norms rounded as HF rounds them) the recorded log-probs are an
    autocast forward's, to bf16 noise."""
    model, tok = model_and_tok
    s = generate(model, [encode_prompt(tok, t) for t in TEXTS], group_size=3, max_new_tokens=12, stop_ids=(),
                 pad_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0), autocast_dtype=torch.bfloat16,
                 decoder=decoder)
    ids = torch.cat([s.prompt_ids, s.response_ids], 1)
    mask = torch.cat([s.prompt_mask, s.response_mask.long()], 1)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    want = torch.log_softmax(logits[:, -13:-1].float(), -1).gather(-1, s.response_ids[..., None])[..., 0]
    assert (s.logp - want).abs().max() < 0.05


def test_static_decoder_greedy_equals_hf_generate(model_and_tok):
    model, tok = model_and_tok
    prompts = [encode_prompt(tok, t) for t in TEXTS]
    s = generate(model, prompts, group_size=1, max_new_tokens=10, temperature=0.0, stop_ids=(), pad_id=tok.pad_token_id,
                 decoder="static")
    for i, p in enumerate(prompts):      # one prompt at a time: HF's generate with no padding at all
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_token_id)
        assert out[0, len(p):].tolist() == s.response_ids[i].tolist()


def test_static_and_lean_decoders_sample_the_same_tokens(tiny):
    model, tok = tiny
    kw = dict(group_size=3, max_new_tokens=12, temperature=1.0, stop_ids=(), pad_id=tok.pad_token_id)
    prompts = [encode_prompt(tok, t) for t in TEXTS]
    a = generate(model, prompts, generator=torch.Generator().manual_seed(7), decoder="static", **kw)
    b = generate(model, prompts, generator=torch.Generator().manual_seed(7), decoder="lean", **kw)
    assert torch.equal(a.response_ids, b.response_ids) and torch.allclose(a.logp, b.logp, atol=1e-5)


@cuda
def test_cuda_graph_decoder_equals_the_eager_one(tiny):
    model, tok = tiny
    gpu = copy.deepcopy(model).cuda()
    kw = dict(group_size=3, max_new_tokens=12, temperature=0.0, stop_ids=(), pad_id=tok.pad_token_id)
    prompts = [encode_prompt(tok, t) for t in TEXTS]
    graphed = generate(gpu, prompts, decoder="static", **kw)
    hf = generate(gpu, prompts, lean=False, **kw)
    assert graphed.response_ids.is_cuda and torch.equal(graphed.response_ids, hf.response_ids)
    assert torch.allclose(graphed.logp, full_logp(gpu, graphed, 1.0), atol=1e-4)


# ----------------------------------------------------------------------------- the GPU's packed attention, on the CPU


def test_packing_with_the_gpu_choices_runs_the_block_mask_and_equals_padded(tiny, monkeypatch):
    """Under the CUDA choices shared prompts go through SDPA with the packs' block mask (never the segment blocks),
    and the log-probs and gradients are the padded forward's."""
    import llmrl.compute.packing as packing
    from llmrl.compute.logprobs import response_logprobs

    def no_segments(*a, **k):
        raise AssertionError("segment attention ran under the GPU's choices")

    model = copy.deepcopy(tiny[0]).train()
    g = torch.Generator().manual_seed(0)
    P, T, G = 6, 9, 3
    prompt = torch.randint(10, 60, (2, P), generator=g).repeat_interleave(G, 0)           # 2 prompts x 3 rows
    resp = torch.randint(10, 60, (2 * G, T), generator=g)
    lengths = torch.tensor([9, 2, 5, 7, 1, 4])
    rmask = (torch.arange(T)[None] < lengths[:, None]).long()
    ids, mask = torch.cat([prompt, resp * rmask + 3 * (1 - rmask)], 1), torch.cat([torch.ones_like(prompt), rmask], 1)

    def run(pack_tokens):
        model.zero_grad()
        logp, _ = response_logprobs(model, ids, mask, T, pack_tokens=pack_tokens)
        (logp * torch.linspace(-1, 1, T)).sum().backward()
        return logp.detach(), model.get_input_embeddings().weight.grad.clone()

    want = run(None)
    monkeypatch.setattr(packing, "choices", lambda device: DEVICE_CHOICES["cuda"])
    monkeypatch.setattr(packing, "segment_attention", no_segments)
    seen = []
    real_layout = packing.pack_layout
    monkeypatch.setattr(packing, "pack_layout", lambda *a, **k: seen.append(real_layout(*a, **k)) or seen[-1])
    got = run(24)
    assert seen and seen[-1].shared and seen[-1].source.shape[0] > 1       # shared prompts, several packs of <= 24
    for a, b in zip(got, want):
        assert torch.allclose(a, b, atol=1e-5), (a - b).abs().max()


# ----------------------------------------------------------------------------- vLLM on a GPU, against a stand-in


class FakeLLM:
    """Records the calls the engine makes on vLLM's `LLM` (sleep mode, weight loading, generation)."""

    def __init__(self):
        self.calls, self.loaded = [], []

    def sleep(self, level):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def apply_model(self, fn):
        self.calls.append(("apply_model",))
        model = type("M", (), {"load_weights": lambda _, ws: self.loaded.extend((n, t.dtype) for n, t in ws)})()
        return [fn(model)]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, requests, params, use_tqdm=False):
        self.calls.append(("generate", len(requests)))
        step = type("S", (), {"logprob": -1.0})()
        out = type("C", (), {"index": 0, "token_ids": [5, 6], "logprobs": [{5: step}, {6: step}],
                             "finish_reason": "length"})()
        return [type("O", (), {"outputs": [out] * params.n})() for _ in requests]


def gpu_engine(monkeypatch):
    import sys
    import types

    from llmrl.rollout.vllm_engine import VLLMEngine

    fake = types.ModuleType("vllm")
    fake.SamplingParams = lambda **kw: types.SimpleNamespace(**kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    engine = object.__new__(VLLMEngine)
    engine.llm, engine.on_gpu, engine.sleeps, engine.asleep = FakeLLM(), True, True, False
    engine.tp, engine.dtype, engine.repack_plan = 1, torch.bfloat16, []
    return engine


def test_gpu_engine_sleeps_after_generating_and_wakes_weights_before_kv_cache_on_sync(tiny, monkeypatch):
    from llmrl.compute.weights import policy_weights

    model, _ = tiny
    engine = gpu_engine(monkeypatch)
    s = engine.generate([[1, 2], [3]], group_size=2, max_new_tokens=2, temperature=1.0)
    assert s.response_ids.shape == (4, 2) and engine.asleep
    assert engine.llm.calls == [("generate", 2), ("sleep", 1)]        # the update gets the GPU
    engine.llm.calls.clear()
    assert engine.sync_weights(model) == "load"
    assert engine.llm.calls == [("wake_up", ["weights"]), ("apply_model",), ("wake_up", ["kv_cache"]),
                                ("reset_prefix_cache",)]
    names = [n for n, _ in policy_weights(model)]
    assert [n for n, _ in engine.llm.loaded] == names and {d for _, d in engine.llm.loaded} == {torch.bfloat16}
    assert not engine.asleep
    engine.llm.calls.clear()
    engine.generate([[1]], group_size=1, max_new_tokens=2, temperature=0.0)
    assert engine.llm.calls == [("generate", 1), ("sleep", 1)]        # awake after the sync: no wake first
    engine.llm.calls.clear()
    engine.generate([[1]], group_size=1, max_new_tokens=2, temperature=0.0)   # asleep: a generate wakes it whole
    assert engine.llm.calls == [("wake_up", None), ("generate", 1), ("sleep", 1)]


def test_vllm_parallel_options():
    from llmrl.rollout.vllm_engine import default_options, parallel_options

    assert parallel_options({}, 1) == {} and parallel_options({"tensor_parallel_size": 1}, 4) == {}
    assert parallel_options({"tensor_parallel_size": 4}, 4) == {"distributed_executor_backend": "external_launcher"}
    for opts, world in (({"tensor_parallel_size": 2}, 1), ({"tensor_parallel_size": 2}, 4),
                        ({"pipeline_parallel_size": 2}, 2)):
        with pytest.raises(ValueError, match="tensor_parallel_size"):
            parallel_options(opts, world)
    assert default_options(False)["enable_sleep_mode"] and "enable_sleep_mode" not in default_options(True, 1 << 20)


def test_torchrun_ranks_take_their_own_gpu(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
        return
    if torch.cuda.device_count() > 1:
        assert resolve_device("cuda") == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="every rank on one GPU"):
        resolve_device("cuda:0")


def test_the_gpu_machinery_takes_the_cpu_machinerys_step(tmp_path, monkeypatch):
    """One GRPO step (fp32) with the CUDA choices forced on the CPU (static-cache decode loop, block-mask packing,
    1024-token head chunks) samples the same tokens and computes the same gradient as the CPU's machinery."""
    import llmrl.compute.settings as settings
    from llmrl.train.build import build
    from llmrl.train.rl import rl_step

    def step(name):
        cfg = load_config(None, [*STEP_ARGS, "preset=grpo", "model.autocast=none", "run.device=cpu",
                                 f"run.output_dir={tmp_path}", f"run.name={name}", "rollout.group_size=4"],
                          presets=PRESETS)
        r = build(cfg)
        grads, seen = {}, []
        for n, p in r.model.named_parameters():
            p.register_post_accumulate_grad_hook(lambda p, n=n: grads.__setitem__(n, p.grad.detach().clone()))
        collect = r.collect
        r.collect = lambda *a, **k: seen.append(collect(*a, **k)) or seen[-1]
        rl_step(r, next(r.batches), 1)
        return seen[0], grads

    import llmrl.rollout.sampler as sampler

    used = []
    monkeypatch.setitem(sampler.DECODERS, "static", lambda *a: used.append("static") or StaticRunner(*a))
    base_rollout, base = step("cpu_choices")
    assert "static" not in used
    monkeypatch.setitem(settings.DEVICE_CHOICES, "cpu", settings.DEVICE_CHOICES["cuda"])
    gpu_rollout, gpu = step("gpu_choices")
    assert "static" in used
    assert torch.equal(base_rollout.input_ids, gpu_rollout.input_ids)
    assert torch.allclose(base_rollout.logp_old, gpu_rollout.logp_old, atol=1e-5)
    assert sorted(base) == sorted(gpu) and len(base) > 0
    flat = lambda g: torch.cat([g[k].flatten() for k in sorted(g)])  # noqa: E731
    a, b = flat(base), flat(gpu)
    assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-3, atol=1e-6), (a - b).abs().max()


def test_tensor_parallel_engine_generates_every_ranks_prompts_and_keeps_its_own(monkeypatch, tmp_path):
    """tp > 1: the ranks' prompts are gathered, all of them generated, this rank's rows kept (one rank here)."""
    import torch.distributed as dist

    engine = gpu_engine(monkeypatch)
    engine.tp = 2
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        s = engine.generate([[1, 2], [3]], group_size=3, max_new_tokens=2, temperature=1.0)
    finally:
        dist.destroy_process_group()
    assert s.response_ids.shape == (6, 2) and s.prompt_ids.shape == (6, 2)
    assert ("generate", 2) in engine.llm.calls
