"""Model and tokenizer loading: the built-in SmolLM2, a tiny test model, local paths, cached HF ids."""

from llmrl.models.loading import (
    BUILTIN,
    CHATML_TEMPLATE,
    TINY,
    build_tiny,
    cache_dir,
    enable_gradient_checkpointing,
    load_model,
    load_reference,
    resolve_model_path,
    save_pretrained_model,
)

__all__ = [
    "BUILTIN",
    "CHATML_TEMPLATE",
    "TINY",
    "build_tiny",
    "cache_dir",
    "enable_gradient_checkpointing",
    "load_model",
    "load_reference",
    "resolve_model_path",
    "save_pretrained_model",
]
