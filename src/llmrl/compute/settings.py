"""How the forwards of an RL step run: one small settings object instead of the same six arguments threaded by
hand through every log-prob, value and update call.

    ex = Execution.from_config(cfg)
    with ex.autocast():
        logp, entropy = response_logprobs(model, ids, mask, T, temperature=ex.temperature, pack_tokens=ex.pack_tokens)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Execution:
    device: torch.device = torch.device("cpu")   # where the models, the rollout's tensors and the math live
    autocast_dtype: torch.dtype | None = None    # the matmuls' dtype under autocast (None: the weights' own)
    pack_tokens: int | None = None               # padding-free forwards in packs of at most this many tokens
    micro_batch_size: int = 32                   # rows per forward/backward
    micro_batch_tokens: int | None = None        # at most this many (padded) tokens per forward/backward
    temperature: float = 1.0                     # the sampling temperature the log-probs are taken at
    max_len: int | None = None                   # the response budget (the constant of length-normalised losses)

    @classmethod
    def from_config(cls, cfg) -> "Execution":
        """The settings a `TrainConfig` chooses (the device: the CPU until run.device exists)."""
        return cls(
            device=torch.device(getattr(cfg.run, "device", "cpu") or "cpu"),
            autocast_dtype=torch.bfloat16 if cfg.model.autocast == "bfloat16" else None,
            pack_tokens=cfg.optim.pack_tokens if cfg.optim.packing else None,
            micro_batch_size=cfg.optim.micro_batch_size, micro_batch_tokens=cfg.optim.micro_batch_tokens,
            temperature=cfg.rollout.temperature or 1.0, max_len=cfg.rollout.max_new_tokens)

    def autocast(self):
        """The autocast region of a forward: on in `autocast_dtype` for this device, or a no-op region."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16,
                              enabled=self.autocast_dtype is not None)
