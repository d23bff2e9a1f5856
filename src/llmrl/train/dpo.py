"""The DPO trainer (`llmrl dpo`): pairs -> reference log-probs (once) -> epochs of preference-loss steps -> save.

Direct Preference Optimization (Rafailov et al. 2023) fits the policy to preference pairs with a classification
loss on the implicit reward beta * log(pi / pi_ref); its optimum is the optimum of KL-regularised RL under a
Bradley-Terry reward (eq. 4-7; `examples/dpo_equivalence.py` shows it on a small problem). The reference never
changes, so its log-probs of every pair are computed once before training and cached (RUN_DIR/ref_logps.pt, read
back when a run resumes). The loss is `llmrl.objectives.preference.dpo_loss` (DPO, conservative DPO, IPO); the
loop, checkpoints and resuming are the shared supervised loop's (`train/supervised.py`).

With LoRA the reference is the same model with the adapter disabled (no second copy); with full fine-tuning it
is a frozen copy. The final checkpoint is a plain model (LoRA merged).

Notation: P pairs in a batch; L = prompt + response columns; T response columns. A batch holds 2P rows:
rows 0..P-1 are the chosen responses, rows P..2P-1 the rejected ones, each after its prompt, in the layout
of `llmrl.rollout.types.Rollout`:

    [pad pad p0 p1 p2 | r0 r1 r2 pad pad]
     <-- left-padded -> <- right-padded ->
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from llmrl.config_supervised import PreferenceTrainConfig
from llmrl.models import load_model, load_reference
from llmrl.models.lora import AdapterDisabledReference, add_lora
from llmrl.compute.logprobs import response_logprobs
from llmrl.compute.settings import resolve_autocast
from llmrl.objectives.preference import dpo_loss
from llmrl.rollout.sampler import left_pad
from llmrl.train.evaluate import evaluate
from llmrl.train.pairs import Encoded, encode_all, pair_sets, task_of
from llmrl.train.supervised import fit, sum_parts

log = logging.getLogger("llmrl.train")


# ----------------------------------------------------------------------------- pairs as tensors, their log-probs

@dataclass(frozen=True)
class PairBatch:
    input_ids: torch.Tensor        # [2P, L] long: chosen rows, then rejected rows
    attention_mask: torch.Tensor   # [2P, L] long
    response_mask: torch.Tensor    # [2P, T] float, 1 on response tokens (EOS included)

    @property
    def num_pairs(self) -> int:
        return self.input_ids.shape[0] // 2


def collate_pairs(encoded: list[Encoded], pad_id: int) -> PairBatch:
    """P tokenised pairs -> one PairBatch of 2P rows."""
    prompts = [p for p, _, _ in encoded] * 2
    responses = [c for _, c, _ in encoded] + [r for _, _, r in encoded]
    prompt_ids, prompt_mask = left_pad(prompts, pad_id)                               # [2P, P_len]
    T = max(len(r) for r in responses)
    response_ids = torch.full((len(responses), T), pad_id, dtype=torch.long)          # [2P, T]
    response_mask = torch.zeros((len(responses), T))
    for i, r in enumerate(responses):
        response_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        response_mask[i, :len(r)] = 1.0
    return PairBatch(input_ids=torch.cat([prompt_ids, response_ids], 1),
                     attention_mask=torch.cat([prompt_mask, response_mask.long()], 1),
                     response_mask=response_mask)


def sequence_logps(model, batch: PairBatch, *, autocast_dtype: torch.dtype | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of log pi(y_t | x, y_<t) over each row's response tokens [2P], response lengths [2P])."""
    T = batch.response_mask.shape[1]
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logp, _ = response_logprobs(model, batch.input_ids, batch.attention_mask, T, with_entropy=False)  # [2P, T]
    mask = batch.response_mask.bool()
    logp = torch.where(mask, logp.float(), torch.zeros_like(logp, dtype=torch.float32))   # padding adds exactly 0
    return logp.sum(-1), batch.response_mask.sum(-1)


def pair_logps(model, batch: PairBatch, *, autocast_dtype: torch.dtype | None = None, per_token_mean: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [P], rejected [P]) sequence log-probs: sums over response tokens, or per-token means if asked."""
    total, lengths = sequence_logps(model, batch, autocast_dtype=autocast_dtype)      # [2P], [2P]
    if per_token_mean:
        total = total / lengths.clamp(min=1)
    return total[:batch.num_pairs], total[batch.num_pairs:]


@torch.no_grad()
def all_pair_logps(model, encoded, *, pad_id: int, micro_batch_size: int, autocast_dtype, per_token_mean: bool
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen [n], rejected [n]) sequence log-probs of every pair under `model`, micro-batch by micro-batch."""
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for s in range(0, len(encoded), micro_batch_size):
        c, r = pair_logps(model, collate_pairs(encoded[s:s + micro_batch_size], pad_id),
                          autocast_dtype=autocast_dtype, per_token_mean=per_token_mean)
        chosen.append(c)
        rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def reference_logps(reference, encoded, *, disable_adapter: bool, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """`all_pair_logps` under the reference policy: a frozen model, or the LoRA model with its adapter off."""
    with reference.disable_adapter() if disable_adapter else contextlib.nullcontext():
        return all_pair_logps(reference, encoded, **kw)


# ----------------------------------------------------------------------------- the task

class DpoTask:
    """DPO (or IPO / conservative DPO) on the config's pairs, for the supervised loop (`train/supervised.py`)."""
    shown = ("loss_preference", "preference_accuracy")

    def __init__(self, cfg: PreferenceTrainConfig, run_dir: Path, resuming: bool):
        p, o = cfg.preference, cfg.optim
        self.cfg, self.desc = cfg, f"{p.kind} steps"
        self.epochs, self.batch_size, self.micro_batch_size = p.epochs, p.batch_size, o.micro_batch_size
        self.amp = resolve_autocast(cfg.model.autocast)
        per_token_mean = p.per_token_mean if p.per_token_mean is not None else p.kind == "ipo"
        self.task = task_of(cfg)
        model, self.tokenizer = load_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
        model.config.use_cache = False
        # pairs sampled from the initial policy
        train_pairs, heldout_pairs = pair_sets(cfg, self.task, lambda: model, self.tokenizer, run_dir, self.amp,
                                               resuming=resuming)
        context = getattr(model.config, "max_position_embeddings", None)
        self.train_enc = encode_all(cfg, self.tokenizer, train_pairs, context)
        self.heldout_enc = encode_all(cfg, self.tokenizer, heldout_pairs, context)
        self.n_train, self.n_held = len(self.train_enc), len(self.heldout_enc)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.lora is not None:
            l = cfg.lora
            model = add_lora(model, r=l.r, alpha=l.alpha, dropout=l.dropout, targets=l.target_modules)
            reference = model
        else:
            reference = load_reference(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
        self.model = model
        self.logp_kw = dict(pad_id=self.tokenizer.pad_token_id, micro_batch_size=o.micro_batch_size,
                            autocast_dtype=self.amp, per_token_mean=per_token_mean)
        self.ref_chosen, self.ref_rejected = self._reference_logps(reference, run_dir / "ref_logps.pt", resuming)
        # The exact KL(policy || reference) of held-out answers is reported at evaluation: LoRA reads the reference
        # through the disabled adapter; full fine-tuning keeps the frozen copy for that only.
        self.eval_reference = AdapterDisabledReference(model) if cfg.lora is not None else reference
        self.heldout_examples = self.task.heldout(cfg.task.heldout_size) if self.task is not None else []
        self.eval_tokens = cfg.run.eval_max_new_tokens or p.build_max_new_tokens
        self.loss_fn = partial(dpo_loss, beta=p.beta, label_smoothing=p.label_smoothing, kind=p.kind)

    def _reference_logps(self, reference, cache: Path, resuming: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(chosen, rejected) [n_train + n_held] under the reference: computed once (read back when resuming)."""
        facts = {"per_token_mean": self.logp_kw["per_token_mean"], "n_train": self.n_train, "n_heldout": self.n_held}
        if resuming and cache.exists():
            saved = torch.load(cache, weights_only=True)
            if all(saved.get(k) == v for k, v in facts.items()):
                return saved["chosen"], saved["rejected"]
        t0 = time.perf_counter()
        chosen, rejected = reference_logps(reference, self.train_enc + self.heldout_enc,
                                           disable_adapter=self.cfg.lora is not None, **self.logp_kw)
        torch.save({"chosen": chosen, "rejected": rejected, **facts}, cache)
        log.info("reference log-probs of %d pairs in %.1f s", len(chosen), time.perf_counter() - t0)
        return chosen, rejected

    def loss(self, micro: torch.Tensor, batch: torch.Tensor):
        enc = collate_pairs([self.train_enc[i] for i in micro.tolist()], self.tokenizer.pad_token_id)
        chosen, rejected = pair_logps(self.model, enc, autocast_dtype=self.amp,
                                      per_token_mean=self.logp_kw["per_token_mean"])
        out = self.loss_fn(chosen, rejected, self.ref_chosen[micro], self.ref_rejected[micro])
        weight = len(micro) / len(batch)          # each micro-batch's mean, weighted by its share of the batch
        return out.total * weight, {k: float(v.detach()) * weight for k, v in {**out.losses, **out.metrics}.items()}

    def metrics(self, parts: list[dict], batch: torch.Tensor) -> dict[str, float]:
        return sum_parts(parts)

    def counts(self, batch: torch.Tensor) -> dict[str, int]:
        return {"pairs": len(batch)}

    def evaluate(self) -> dict:
        rec = {}
        if self.n_held:
            c, r = all_pair_logps(self.model, self.heldout_enc, **self.logp_kw)
            out = self.loss_fn(c, r, self.ref_chosen[self.n_train:], self.ref_rejected[self.n_train:])
            rec |= {f"heldout_{k}": float(v) for k, v in {**out.losses, **out.metrics}.items()}
        if self.heldout_examples:
            m = self.cfg.model
            ev = evaluate(self.model, self.tokenizer, self.heldout_examples, max_new_tokens=self.eval_tokens,
                          autocast_dtype=self.amp, chat_template=m.chat_template, system_prompt=m.system_prompt,
                          reference=self.eval_reference)
            rec |= {"heldout_accuracy": ev["accuracy"], "heldout_response_length": ev["response_length"],
                    "heldout_kl_to_ref": ev.get("kl_to_ref")}
        return rec

    def summary(self) -> dict[str, int]:
        return {"train_pairs": self.n_train, "heldout_pairs": self.n_held}


def train_dpo(cfg: PreferenceTrainConfig, *, progress: bool | None = None) -> dict:
    """Run one DPO (or IPO / conservative DPO) job. Returns a summary: held-out pair and task metrics before/after."""
    return fit(cfg, lambda run_dir, resuming: DpoTask(cfg, run_dir, resuming), progress=progress)
