"""llmrl.models: tiny model, caching, loading and saving, all offline."""

import json
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

from llmrl.models import (
    BUILTIN,
    build_tiny,
    cache_dir,
    load_model,
    load_reference,
    resolve_model_path,
    save_pretrained_model,
)

MIXED = "Hello, World! 42 + 7 = 49.\n\tx_y = {'a': [1, 2]}; \"q\" ~`|\\ <>?@#$%^&*()-\n"


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMRL_CACHE", str(tmp_path / "cache"))


def _batch(tok):
    return tok(["2+2=", "The answer is 4."], padding=True, return_tensors="pt")


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def test_cache_dir_honours_env(tmp_path, monkeypatch):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("LLMRL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "llmrl"


def test_tiny_is_deterministic():
    a, _ = build_tiny(0)
    b, _ = build_tiny(0)
    c, _ = build_tiny(1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert a.config.num_hidden_layers == 2 and a.config.hidden_size == 64
    assert a.config.tie_word_embeddings


def test_building_the_cached_tiny_model_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """A run that builds the cached tiny model draws the same random numbers afterwards (a LoRA adapter's init, a
    new head) as a run that finds it cached."""
    monkeypatch.setenv("LLMRL_CACHE", str(tmp_path))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    resolve_model_path("tiny")                 # builds and saves the cached copy
    assert torch.equal(torch.rand(3), expected)


def test_tiny_vocab_extra():
    m, tok = build_tiny(vocab_extra=5)
    m0, tok0 = build_tiny()
    assert len(tok) == len(tok0) + 5 == m.config.vocab_size


def test_tiny_tokenizer_round_trip():
    _, tok = build_tiny()
    ids = tok.encode(MIXED)
    assert len(ids) == len(MIXED)  # one token per character
    assert tok.decode(ids) == MIXED
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<pad>"
    assert tok.pad_token_id != tok.eos_token_id
    assert tok.encode("<|im_start|>") == [tok.convert_tokens_to_ids("<|im_start|>")]


def test_tiny_chat_template():
    _, tok = build_tiny()
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"


def test_load_tiny_by_name_matches_build_tiny(tmp_path):
    path = resolve_model_path("tiny")
    assert path == str(tmp_path / "cache" / "models" / "tiny")
    assert json.loads((tmp_path / "cache/models/tiny/llmrl_source.json").read_text())["seed"] == 0
    model, tok = load_model("tiny")
    ref, ref_tok = build_tiny(0)
    assert tok.padding_side == "left" and tok.pad_token == "<pad>"
    assert tok.decode(tok.encode(MIXED)) == MIXED
    batch = _batch(tok)
    assert batch["attention_mask"][0, 0] == 0  # left padded
    out = _logits(model, batch)
    assert out.shape == (2, batch["input_ids"].shape[1], len(tok))
    torch.testing.assert_close(out, _logits(ref, batch), rtol=0, atol=0)
    assert resolve_model_path("tiny") == path  # reused
    assert not [p for p in (tmp_path / "cache/models").iterdir() if p.name.startswith(".")]


def test_local_path_and_reference(tmp_path):
    path = resolve_model_path("tiny")
    assert resolve_model_path(path) == path
    ref = load_reference(path)
    assert not ref.training
    assert all(not p.requires_grad for p in ref.parameters())
    assert next(ref.parameters()).dtype == torch.bfloat16


def test_save_pretrained_round_trip(tmp_path):
    model, tok = build_tiny(3)
    out = tmp_path / "ckpt"
    save_pretrained_model(model, tok, out)
    save_pretrained_model(model, tok, out)  # overwriting an existing checkpoint works
    assert any(p.suffix == ".safetensors" for p in out.iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    back = AutoModelForCausalLM.from_pretrained(out)
    batch = _batch(tok)
    torch.testing.assert_close(_logits(back, batch), _logits(model, batch), rtol=0, atol=0)
    model2, tok2 = load_model(str(out))
    assert tok2.decode(tok2.encode(MIXED)) == MIXED


def test_fallback_chat_template(tmp_path, caplog):
    model, tok = build_tiny()
    tok.chat_template = None
    save_pretrained_model(model, tok, tmp_path / "m")
    with caplog.at_level("WARNING"):
        _, tok2 = load_model(str(tmp_path / "m"))
    assert "chat template" in caplog.text
    assert "<|im_start|>" in tok2.chat_template


def test_uncached_hf_id_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="not found locally; llmrl never downloads"):
        resolve_model_path("llmrl-test-org/definitely-not-a-cached-model")
    with pytest.raises(FileNotFoundError, match="not found locally"):
        load_model("llmrl-test-org/definitely-not-a-cached-model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model_path("./no/such/folder")


@pytest.mark.slow
def test_builtin_smollm2_converts_once(tmp_path):
    path = resolve_model_path(BUILTIN)
    folder = tmp_path / "cache" / "models" / BUILTIN
    assert path == str(folder)
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["model_type"] == "llama"
    assert cfg["num_hidden_layers"] == 30 and cfg["hidden_size"] == 576
    assert cfg["vocab_size"] == 49152
    assert "quantization_config" not in cfg
    source = json.loads((folder / "llmrl_source.json").read_text())
    assert source["dequantized_from"] == "Q4_1" and source["wheel_version"] == "0.1.2"
    t0 = time.perf_counter()
    assert resolve_model_path(BUILTIN) == path
    assert time.perf_counter() - t0 < 1.0
    model, tok = load_model(BUILTIN)
    assert "<|im_start|>" in tok.chat_template
    assert tok.padding_side == "left" and tok.pad_token is not None
    text = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    batch = tok(["2+2=", "Hello"], padding=True, return_tensors="pt")
    out = _logits(model, batch)
    assert out.shape[-1] == 49152 and torch.isfinite(out).all()


def test_concurrent_writer_and_crash_leave_a_usable_cache(tmp_path):
    from llmrl.models.loading import _build_cached

    target = tmp_path / "cache" / "models" / "thing"

    def crash(out):
        (out / "config.json").write_text("{}")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _build_cached(target, crash)
    assert not target.exists() and not list(target.parent.iterdir())  # no half cache, no debris

    def racing(out):  # another process publishes the target while we build ours
        (out / "config.json").write_text('{"who": "us"}')
        target.mkdir()
        (target / "config.json").write_text('{"who": "them"}')

    assert _build_cached(target, racing) == target
    assert json.loads((target / "config.json").read_text()) == {"who": "them"}
    assert [p.name for p in target.parent.iterdir()] == ["thing"]


def test_gradient_checkpointing_takes_effect_and_changes_nothing():
    """from_pretrained leaves a model in eval mode, where Hugging Face silently skips checkpointing."""
    from llmrl.models import enable_gradient_checkpointing
    from llmrl.compute.logprobs import response_logprobs

    ids = torch.randint(4, 100, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def run(model):
        saved = [0]

        def count(t):
            saved[0] += 1
            return t

        model.zero_grad(set_to_none=True)
        with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
            logp, _ = response_logprobs(model, ids, mask, 8, chunk=100)
        logp.sum().backward()
        return saved[0], logp.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    plain, _ = build_tiny(0)
    checkpointed, _ = build_tiny(0)
    plain.eval()
    enable_gradient_checkpointing(checkpointed.eval())
    (n_plain, logp, grad), (n_ckpt, logp_ckpt, grad_ckpt) = run(plain), run(checkpointed)
    assert n_ckpt < n_plain / 2           # the layers' activations are no longer kept for backward
    assert torch.allclose(logp_ckpt, logp, atol=1e-6) and torch.allclose(grad_ckpt, grad, atol=1e-6)
