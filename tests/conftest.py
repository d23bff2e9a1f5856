import pytest
import torch


@pytest.fixture(scope="session")
def tiny():
    """A tiny randomly initialised Llama and its character-level tokenizer, built in-process."""
    from llmrl.models import build_tiny

    torch.set_num_threads(2)
    model, tok = build_tiny(0)
    return model.eval(), tok


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's cache from tests (the tiny model is rebuilt per session in a temp cache)."""
    monkeypatch.setenv("LLMRL_CACHE", str(tmp_path_factory.getbasetemp() / "llmrl-cache"))
