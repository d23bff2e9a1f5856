"""Multi-turn sampling that keeps each row's KV cache across turns: a turn decodes, the caller appends observation
tokens to the rows that go on (one forward over just those tokens), and the next turn decodes on; no turn
re-prefills a context.

    turns = TurnSampler(model, prompts, group_size=G, capacity=P_max_extra, stop_ids=..., ...)
    out = turns.sample(limits)                 # {row: TurnOutput(ids, logp, truncated)} for the rows in flight
    turns.extend({row: observation_ids, ...})  # these rows go on (in this order of rows); every other row is dropped

The cache layout is the one-shot sampler's (sampler.LeanRunner / HFRunner): one write pointer shared by all rows,
with a per-row key mask, so rows of different lengths sit side by side. Slots a row must not see are masked out:
the padding of an observation block (observations are left-padded to the block's longest), and the tokens a row
was fed after it stopped while other rows of its turn were still decoding. Positions are per row and count only
the row's own tokens, so a row's cache is exactly what a prefill of its whole sequence would compute (to the
forward's float rounding). Memory is bounded by the rows in flight: rows whose episode ended are dropped from
the cache at `extend`; the cache grows (by copy) only if a turn needs more slots than it has.

Within a turn, on the lean runner, rows that stopped are parked once they are half of the batch: their cache
slices are set aside and the turn decodes only the rows still sampling (as the one-shot sampler drops stopped
rows); at the turn's end they are put back in their places, the slots written after they were parked masked out
for them. On the HF runner (a DynamicCache) stopped rows idle instead: fed tokens that are masked out afterwards.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from llmrl.compute.lean_decoder import _rms, _rope, lean_supported
from llmrl.rollout import sampler as _sampler
from llmrl.rollout.sampler import HFRunner, LeanRunner, StopStrings, left_pad


@dataclass
class TurnOutput:
    ids: list[int]
    logp: list[float]
    truncated: bool          # hit its limit without a stop token


def _extend_transposed(lean, ids, positions, kt, vc, start: int, allowed) -> torch.Tensor:
    """`LeanDecoder.forward` over the C decode step's cache layout (keys [layers, n, K, D, L], values
    [layers, n, K, L, D]): writes slots start .. start+S-1, returns the last position's logits [n, V]."""
    n, S = ids.shape
    H, K, D, end = lean.H, lean.K, lean.D, start + S
    lean._rope_tables(int(positions.max()) + 1)
    cos, sin = lean.cos[positions][:, None], lean.sin[positions][:, None]                       # [n, 1, S, D]
    rep = H // K
    mask = allowed[:, None, None].expand(n, 1, rep, S, end).reshape(n, 1, rep * S, end)
    h = lean.embed[ids].float()                                                                 # [n, S, hidden]
    for i, lay in enumerate(lean.layers):
        x = _rms(h, lay.norm1, lean.eps).to(lean.dtype)
        qkv = lay.qkv(x).view(n, S, H + 2 * K, D).transpose(1, 2)                              # [n, H+2K, S, D]
        qk = _rope(qkv[:, :H + K], cos, sin).to(lean.dtype)
        kt[i, :, :, :, start:end] = qk[:, H:].transpose(-1, -2)
        vc[i, :, :, start:end] = qkv[:, H + K:]
        q = qk[:, :H].reshape(n, K, rep * S, D)
        a = F.scaled_dot_product_attention(q, kt[i, :, :, :, :end].transpose(-1, -2), vc[i, :, :, :end], attn_mask=mask)
        h.add_(lay.o(a.reshape(n, H, S, D).transpose(1, 2).reshape(n, S, H * D)))
        gate, up = lay.gate_up(_rms(h, lay.norm2, lean.eps).to(lean.dtype)).chunk(2, -1)
        h.add_(lay.down(F.silu(gate) * up))
    return lean.lm_head(_rms(h[:, -1], lean.norm, lean.eps).to(lean.dtype))


class _LeanTurns(LeanRunner):
    """LeanRunner plus `extend` (a block of new tokens on the existing cache), `invalidate` and `grow`."""

    def width(self) -> int:
        return self.keys.shape[1]

    def grow(self, width: int) -> None:
        if width <= self.width():
            return
        if self.lean.c is not None:
            kt, vc = self.lean.new_decode_cache(self.keys.shape[0], width)
            kt[..., :self.length], vc[..., :self.length, :] = self.kt[..., :self.length], self.vc[..., :self.length, :]
            self.kt, self.vc = kt, vc
        else:
            cache = self.lean.new_cache(self.keys.shape[0], width)
            cache[..., :self.length, :] = self.cache[..., :self.length, :]
            self.cache = cache
        keys = torch.zeros(self.keys.shape[0], cache_width(self, width), dtype=torch.bool, device=self.keys.device)
        keys[:, :self.length] = self.keys[:, :self.length]
        self.keys = keys

    def invalidate(self, row: int, start: int) -> None:
        self.keys[row, start:] = False

    parks = True

    def park(self, out: torch.Tensor, stay: torch.Tensor) -> tuple:
        """Set the batch rows `out` aside (their cache slices and key masks); the batch keeps the rows `stay`."""
        if self.lean.c is not None:
            parked = (self.length, self.keys[out], self.kt[:, out], self.vc[:, out])
            self.kt, self.vc = self.kt[:, stay], self.vc[:, stay]
        else:
            parked = (self.length, self.keys[out], self.cache[:, :, out])
            self.cache = self.cache[:, :, stay]
        self.keys = self.keys[stay]
        return parked

    def unpark(self, parked: list[tuple], order: torch.Tensor) -> None:
        """Put parked rows back. The batch becomes [the rows in it, then each parked set in turn], indexed by `order`
        (for each row in its original place, its position in that concatenation). A parked row's key mask is the
        one saved when it was parked, so the slots written since are masked out for it; they are zeroed, as the
        attention reads masked slots too (uninitialised memory could hold a NaN, and NaN x 0 is NaN)."""
        now = self.length
        for then, _, *cache in parked:
            if self.lean.c is not None:
                cache[0][..., then:now].zero_()
                cache[1][..., then:now, :].zero_()
            else:
                cache[0][..., then:now, :].zero_()
        keys = torch.cat([self.keys, *(p[1] for p in parked)], 0)[order]
        if self.lean.c is not None:
            self.kt = torch.cat([self.kt, *(p[2] for p in parked)], 1)[:, order]
            self.vc = torch.cat([self.vc, *(p[3] for p in parked)], 1)[:, order]
        else:
            self.cache = torch.cat([self.cache, *(p[2] for p in parked)], 2)[:, :, order]
        self.keys = keys

    def extend(self, ids, positions, valid):                      # [n, S] each -> logits [n, V]
        n, S = ids.shape
        start, end = self.length, self.length + S
        self.keys[:, start:end] = valid
        block = torch.ones(S, S, dtype=torch.bool, device=ids.device).tril() & valid[:, None, :]     # [n, S, S]
        block |= torch.eye(S, dtype=torch.bool, device=ids.device)           # a pad query sees itself: no NaN rows
        allowed = torch.cat([self.keys[:, None, :start].expand(n, S, start), block], -1)              # [n, S, end]
        self.length = end
        if self.lean.c is not None:
            return _extend_transposed(self.lean, ids, positions, self.kt, self.vc, start, allowed)
        return self.lean.forward(ids, positions, self.cache, start, allowed)


def cache_width(runner, width: int) -> int:
    """The key mask's width for a cache of `width` slots (the C layout rounds up to a multiple of 16)."""
    return -(-width // 16) * 16 if runner.lean.c is not None else width


class _HFTurns(HFRunner):
    """HFRunner plus `extend`, `invalidate` (its DynamicCache grows by itself, so `grow` has nothing to do)."""

    length = 0
    parks = False       # a DynamicCache's rows are not set aside: stopped rows idle until the turn ends

    def prefill(self, prompt_ids, prompt_mask, positions, group_size: int, max_new_tokens: int):
        self.length = prompt_ids.shape[1]
        return super().prefill(prompt_ids, prompt_mask, positions, group_size, max_new_tokens)

    def decode(self, token, positions):
        self.length += 1
        return super().decode(token, positions)

    def width(self) -> int:
        return 1 << 62

    def grow(self, width: int) -> None:
        pass

    def invalidate(self, row: int, start: int) -> None:
        self.mask[row, start:] = 0

    def extend(self, ids, positions, valid):
        self.mask = torch.cat([self.mask, valid.long()], 1)
        self.length += ids.shape[1]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, past_key_values=self.cache,
                         use_cache=True, logits_to_keep=1)
        self.cache = out.past_key_values
        return out.logits[:, -1]


class TurnSampler:
    """Rows (B prompts x G samples, in groups) sampled turn by turn on caches kept between turns."""

    def __init__(self, model, prompts: list[list[int]], *, group_size: int, capacity: int, temperature: float,
                 top_p: float = 1.0, stop_ids: tuple[int, ...] = (), pad_id: int = 0, generator=None,
                 autocast_dtype: torch.dtype | None = None, stop_strings: tuple[str, ...] = (), tokenizer=None,
                 lean: bool = True):
        """`capacity`: cache slots after the longest prompt to allocate up front (it grows if a turn needs more)."""
        self.device = next(model.parameters()).device
        self.temperature, self.top_p, self.generator = temperature, top_p, generator
        self.stop = torch.tensor(list(stop_ids) or [-1], device=self.device)
        self.stop_text = StopStrings(tokenizer, stop_strings) if stop_strings else None
        prompt_ids, prompt_mask = (t.to(self.device) for t in left_pad(prompts, pad_id))          # [B, P]
        if lean and lean_supported(model, prompt_ids.shape[1] + capacity):
            self.runner, self.amp = _LeanTurns(model, autocast_dtype), contextlib.nullcontext
        else:
            self.runner = _HFTurns(model)
            self.amp = lambda: torch.autocast(self.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None)
        positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        with self.amp():
            self.logits = self.runner.prefill(prompt_ids, prompt_mask, positions, group_size, capacity)   # [N, V]
        self.pos = positions[:, -1].repeat_interleave(group_size) + 1                                   # [N]
        self.rows = list(range(len(prompts) * group_size))          # batch index -> row
        self.pending: dict[int, int] = {}                            # row -> its last token, not yet in the cache

    def sample(self, limits: dict[int, int]) -> dict[int, TurnOutput]:
        """One turn for every row in flight, row r sampling at most limits[r] >= 1 tokens; a row stops after a stop
        id, a stop string or its limit. Rows that stopped early are parked once they are half of the batch (lean
        runner) or idle, fed tokens later masked out (HF runner), until the turn ends."""
        runner, n, dev = self.runner, len(self.rows), self.device
        cap = torch.tensor([limits[r] for r in self.rows], device=dev)                           # [n]
        if int(cap.min()) < 1:
            raise ValueError("TurnSampler.sample: every row in flight needs a limit >= 1")
        T = int(cap.max())
        ids = torch.zeros(n, T, dtype=torch.long, device=dev)
        logps = torch.zeros(n, T, device=dev)
        steps = torch.zeros(n, dtype=torch.long, device=dev)                 # [n] tokens sampled per row
        fed = torch.zeros(n, dtype=torch.long, device=dev)                   # [n] of them written to its cache
        alive = torch.ones(n, dtype=torch.bool, device=dev)                  # [n] still sampling
        batch = torch.arange(n, device=dev)                                  # [b] the runner's rows (row indices)
        parked: list[tuple] = []                                             # (row indices, runner.park's state)
        runner.grow(runner.length + T)
        start, logits = runner.length, self.logits
        with self.amp():
            for t in range(T):
                token, logp = _sampler.sample_next(logits, self.temperature, self.top_p, self.generator)   # [b]
                live = alive[batch]                                                                        # [b]
                ids[batch[live], t], logps[batch[live], t] = token[live], logp[live]
                steps[batch[live]] = t + 1
                ended = live & (torch.isin(token, self.stop) | (steps[batch] >= cap[batch]))
                if self.stop_text is not None:
                    idx = (live & ~ended).nonzero()[:, 0]
                    if len(idx):
                        ended[idx] |= self.stop_text(ids[batch[idx], max(0, t + 1 - self.stop_text.window):t + 1])
                alive[batch] = live & ~ended
                if not alive.any():
                    break
                if runner.parks and 2 * int(alive[batch].sum()) <= len(batch):
                    batch, token = self._park(batch, token, alive, parked)
                logits = runner.decode(token, self.pos[batch] + t)                     # writes slot start + t
                fed[batch] = t + 1
        if parked:
            order = torch.cat([batch, *(rows for rows, _ in parked)])          # the row at each place of the concat
            runner.unpark([state for _, state in parked], torch.argsort(order))
        return self._outputs(start, steps, fed, ids, logps, cap)

    def _park(self, batch, token, alive, parked: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the batch's stopped rows aside (appended to `parked`); -> the rows that stay and their tokens."""
        live = alive[batch]
        stay, out = live.nonzero()[:, 0], (~live).nonzero()[:, 0]
        parked.append((batch[out], self.runner.park(out, stay)))
        return batch[stay], token[stay]

    def _outputs(self, start: int, steps, fed, ids, logps, cap) -> dict[int, TurnOutput]:
        """Each row's turn; masks out what a row was fed after its stop; a last token not fed is kept pending."""
        out = {}
        for i, row in enumerate(self.rows):
            k, f = int(steps[i]), int(fed[i])
            self.runner.invalidate(i, start + min(k, f))        # what it was fed after its stop is not its text
            if k > f:                                           # its last token never went through the model
                self.pending[row] = int(ids[i, k - 1])
            self.pos[i] += min(k, f)
            out[row] = TurnOutput(ids[i, :k].tolist(), logps[i, :k].tolist(),
                                  bool(k >= int(cap[i])) and not bool(torch.isin(ids[i, k - 1], self.stop)))
        return out

    def extend(self, observations: dict[int, list[int]]) -> None:
        """Rows in `observations` go on, each with its observation ids appended (after its last sampled token, if
        that is not in the cache yet); all other rows are dropped. Sets the logits the next turn starts from."""
        keep = [i for i, r in enumerate(self.rows) if r in observations]
        if not keep:
            self.rows = []
            return
        if len(keep) < len(self.rows):
            idx = torch.tensor(keep, device=self.device)
            self.runner.keep(idx)
            self.rows, self.pos = [self.rows[i] for i in keep], self.pos[idx]
        seqs = [([self.pending.pop(r)] if r in self.pending else []) + list(observations[r]) for r in self.rows]
        if not all(seqs):
            raise ValueError("TurnSampler.extend: a row going on needs at least one new token")
        S = max(map(len, seqs))
        block, valid = (t.to(self.device) for t in left_pad(seqs, 0))                               # [n, S]
        offsets = (valid.cumsum(-1) - 1).clamp(min=0)
        positions = self.pos[:, None] + offsets                                                     # [n, S]
        self.runner.grow(self.runner.length + S)
        with self.amp():
            self.logits = self.runner.extend(block, positions, valid.bool())
        self.pos = self.pos + valid.sum(-1)
        self.pending.clear()
