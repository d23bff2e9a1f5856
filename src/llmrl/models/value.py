"""The critic: a scalar value head on a transformer trunk, giving V(s_t) at every response position.

The trunk is either its own copy of the model (PPO as in InstructGPT, OpenRLHF, verl) or the policy's own
trunk (`shared`, as in the original PPO Atari networks): then the value loss is added to the policy loss
and both train the trunk. V(s_t) is read from the hidden state that predicts response token t, i.e. the
state *before* the token is chosen — the same positions `response_logprobs` reads.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from llmrl.compute.logprobs import response_hidden


class Critic(nn.Module):
    def __init__(self, trunk: nn.Module, hidden_size: int, *, shared: bool, pack_tokens: int | None = None):
        super().__init__()
        self.shared = shared
        self.pack_tokens = pack_tokens     # run the trunk padding-free in packs of this many tokens (packing.py)
        # a shared trunk is held outside the module tree, so `parameters()` is what the critic's optimizer
        # should hold (the head, plus the trunk unless shared) and the trunk is never saved twice
        self._trunk = [trunk] if shared else None
        self.trunk = None if shared else trunk
        self.head = nn.Linear(hidden_size, 1, device=next(trunk.parameters()).device)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_policy(cls, policy, *, shared: bool, pack_tokens: int | None = None) -> "Critic":
        trunk = policy.get_decoder() if shared else copy.deepcopy(policy.get_decoder())
        if not shared:
            trunk.requires_grad_(True)
        return cls(trunk, policy.config.hidden_size, shared=shared, pack_tokens=pack_tokens)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, response_len: int) -> torch.Tensor:
        """input_ids, attention_mask [N, P+T] -> values [N, T] (fp32)."""
        trunk = self._trunk[0] if self.shared else self.trunk
        hidden = response_hidden(trunk, input_ids, attention_mask, response_len, pack_tokens=self.pack_tokens)
        return self.head(hidden).squeeze(-1).float()
