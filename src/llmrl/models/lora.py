"""LoRA through peft, with the reference policy read from the same weights with the adapter disabled —
no second copy of the model in memory (Hu et al. 2021; the "reference = base" trick of TRL and OpenRLHF)."""

from __future__ import annotations

import copy

from torch import nn


def linear_targets(model: nn.Module) -> list[str]:
    """The names of every linear layer inside the backbone (the head, a top-level module such as `lm_head` or a
    classifier's `score`, is not one), sorted: LoRA's default targets."""
    return sorted({name.rpartition(".")[2] for name, module in model.named_modules()
                   if isinstance(module, nn.Linear) and "." in name})


def add_lora(model, *, r: int, alpha: float, dropout: float, targets: list[str] | None = None,
             task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA adapter (B = 0 at the start, so the wrapped model equals the base); only the
    adapter's parameters stay trainable, and a classifier's new head (task_type SEQ_CLS or TOKEN_CLS), which peft
    trains in full. targets=None: every linear layer but the head (`linear_targets`). The one LoRA entry point of
    every trainer: RL (`model.lora_*`), DPO, reward and process reward models (the `lora` section)."""
    from peft import LoraConfig, get_peft_model

    targets = linear_targets(model) if targets is None else list(targets)
    return get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                            task_type=task_type))


class _AdapterOff(nn.Module):
    """Runs `inner` (a module of the peft model) with the adapter disabled."""

    def __init__(self, peft_model, inner):
        super().__init__()
        self._peft = [peft_model]          # held outside the module tree: no parameters of its own
        self._inner = [inner]

    def forward(self, *args, **kwargs):
        with self._peft[0].disable_adapter():
            return self._inner[0](*args, **kwargs)


class AdapterDisabledReference:
    """The frozen reference of a LoRA policy: the base weights, seen through `disable_adapter()`.

    It offers what the log-prob and KL code reads from a causal LM: `get_decoder()`, `get_output_embeddings()`,
    `config`, `parameters()`, `eval()`/`train()`."""

    def __init__(self, peft_model):
        self.peft_model = peft_model
        self.config = peft_model.config

    def get_decoder(self):
        return _AdapterOff(self.peft_model, self.peft_model.get_decoder())

    def get_output_embeddings(self):
        return self.peft_model.get_output_embeddings()

    def parameters(self):
        return self.peft_model.parameters()

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    @property
    def training(self) -> bool:
        return False


def merged_copy(model):
    """A plain transformers model with the adapter merged in (for save_pretrained); the policy is untouched."""
    if not hasattr(model, "merge_and_unload"):
        return model
    return copy.deepcopy(model).merge_and_unload()
