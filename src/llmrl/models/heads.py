"""Learned-reward models: the causal LM's backbone with a new linear head, and the forward that reads it.

    load_reward_model(path) -> (model, tokenizer)   a scalar head r(x, y) read at the last token
                                                     (AutoModelForSequenceClassification, num_labels=1)
    load_prm(path)          -> (model, tokenizer)   a one-logit head at every token; P(step is good) is read at
                                                     each step's last token (AutoModelForTokenClassification)

Both load a trained checkpoint (`llmrl rm`, `llmrl prm`) or, to start training, a causal LM (the head is then newly
initialised). Scoring with them: `llmrl.rewards.learned`; training them: `llmrl.train.rm`, `llmrl.train.prm`.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from llmrl.models.loading import _fix_tokenizer, resolve_model_path


def load_reward_model(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a scalar-head sequence classifier from a reward-model checkpoint or, to start training,
    from a causal LM (its head is then newly initialised). Never downloads."""
    path = resolve_model_path(name_or_path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=dtype, local_files_only=True)
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), name_or_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def load_prm(name_or_path: str, *, dtype: torch.dtype = torch.float32):
    """(model, tokenizer): a one-logit token classifier from a PRM checkpoint or, to start training, from a causal
    LM (its head is then newly initialised). No dropout before the head. Never downloads."""
    path = resolve_model_path(name_or_path)
    config = AutoConfig.from_pretrained(path, num_labels=1, local_files_only=True)
    config.classifier_dropout = 0.0
    model = AutoModelForTokenClassification.from_pretrained(path, config=config, dtype=dtype, local_files_only=True)
    tokenizer = _fix_tokenizer(AutoTokenizer.from_pretrained(path, local_files_only=True), name_or_path)
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def sequence_rewards(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # [n, L] left-padded
                     *, autocast_dtype: torch.dtype | None = None) -> torch.Tensor:
    """r(x, y) [n]: the scalar head applied to the hidden state of the last token of each row.

    Sequences are left-padded, so the last token is the last column. transformers' own pooling picks the last token
    that is not the pad token, which is the token *before* EOS when pad == EOS (as in SmolLM2); this reads EOS."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model     # under a LoRA wrapper
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=positions).last_hidden_state[:, -1]    # [n, H]
        return inner.score(hidden).float()[:, 0]


def step_logits(model, rows: list[tuple[list[int], list[int]]], pad_id: int, *,
                autocast_dtype: torch.dtype | None = None) -> list[torch.Tensor]:
    """rows: (token ids, step ends) -> per row, the logit of "good" at each step end [S_i] (NaN where the end is -1).
    Rows are right-padded: a causal model's logits at real tokens do not depend on the padding after them."""
    device = next(model.parameters()).device
    ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(r) for r, _ in rows], batch_first=True, padding_value=pad_id)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(r), dtype=torch.long) for r, _ in rows], batch_first=True)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False).logits  # [n, L, 1]
    logits = logits.float()[..., 0]                                                                      # [n, L]
    out = []
    for i, (_, ends) in enumerate(rows):
        e = torch.tensor(ends, dtype=torch.long, device=device)
        out.append(torch.where(e >= 0, logits[i, e.clamp(min=0)], float("nan")))
    return out
