"""A policy's weights as plain tensors: named as in transformers with a LoRA adapter merged in (what the lean
decoder and the vLLM engine load), and a row-wise copy into a preallocated buffer."""

from __future__ import annotations

from typing import Iterator

import torch


def policy_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of the policy's weights in the plain transformers naming; a peft LoRA adapter is merged in
    (W + its delta weight) without touching the policy."""
    if not hasattr(model, "peft_config"):
        yield from ((name, t.detach()) for name, t in model.state_dict().items())
        return
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for name, module in base.named_modules():
            if isinstance(module, LoraLayer) and not module.merged:
                for adapter in module.active_adapters:
                    if adapter in module.lora_A:
                        delta = module.get_delta_weight(adapter)
                        deltas[name] = delta if name not in deltas else deltas[name] + delta
    for name, t in base.state_dict().items():
        if ".lora_" in name:
            continue
        name = name.replace(".base_layer.", ".")
        module = name.rpartition(".")[0]
        if name.endswith(".weight") and module in deltas:
            t = t + deltas[module].to(t.dtype)
        yield name, t.detach()


def write_rows(srcs: list[torch.Tensor], dst: torch.Tensor) -> torch.Tensor:
    """The tensors of `srcs`, one after another along dim 0, cast into the first rows of `dst` (one pass: no
    concatenated copy in the source dtype first)."""
    row = 0
    for t in srcs:
        dst[row:row + len(t)].copy_(t)
        row += len(t)
    return dst
