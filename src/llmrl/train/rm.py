"""The reward-model trainer (`llmrl rm`): pairs -> Bradley-Terry steps on a scalar-head model -> save.

A Bradley-Terry reward model (Bradley & Terry 1952; Stiennon et al. 2020; Ouyang et al. 2022, eq. 1) is the causal
LM's backbone with a linear head giving one number r(x, y), trained so that sigma(r(x, y_w) - r(x, y_l)) is the
probability that y_w is preferred (`llmrl.objectives.preference.bradley_terry_loss`). It is
`AutoModelForSequenceClassification` with num_labels=1 (`llmrl.models.heads.load_reward_model`), started from the
causal LM's weights (the head is new), saved with save_pretrained. Score with
`llmrl.rewards.learned.reward_model_scores` (the `reward_model` reward), which reads r at the last token (EOS) as
the training does. The loop, checkpoints and resuming are the shared supervised loop's (`train/supervised.py`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from llmrl.config_supervised import PreferenceTrainConfig
from llmrl.compute.settings import resolve_autocast
from llmrl.models import load_model
from llmrl.models.heads import load_reward_model, sequence_rewards
from llmrl.models.lora import add_lora
from llmrl.objectives.preference import bradley_terry_loss
from llmrl.rollout.sampler import left_pad
from llmrl.train.pairs import encode_all, pair_sets, task_of
from llmrl.train.supervised import fit, sum_parts


def pair_rewards(model, encoded, pad_id: int, *, autocast_dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(r(x, y_w) [P], r(x, y_l) [P]) of P tokenised pairs, in one forward pass of 2P rows."""
    seqs = [p + c for p, c, _ in encoded] + [p + r for p, _, r in encoded]
    ids, mask = left_pad(seqs, pad_id)
    rewards = sequence_rewards(model, ids, mask, autocast_dtype=autocast_dtype)         # [2P]
    return rewards[:len(encoded)], rewards[len(encoded):]


class RewardModelTask:
    """Bradley-Terry reward-model training on the config's pairs, for the supervised loop."""
    desc, shown = "reward-model steps", ("loss_preference", "preference_accuracy")

    def __init__(self, cfg: PreferenceTrainConfig, run_dir: Path, resuming: bool):
        p, o = cfg.preference, cfg.optim
        self.epochs, self.batch_size, self.micro_batch_size = p.epochs, p.batch_size, o.micro_batch_size
        self.amp = resolve_autocast(cfg.model.autocast)
        sampler = load_model(cfg.model.name)[0] if p.data_path is None else None     # only to build pairs from a task
        model, self.tokenizer = load_reward_model(cfg.model.name, dtype=getattr(torch, cfg.model.dtype))
        train_pairs, heldout_pairs = pair_sets(cfg, task_of(cfg), lambda: sampler, self.tokenizer, run_dir, self.amp,
                                               resuming=resuming)
        del sampler
        context = getattr(model.config, "max_position_embeddings", None)
        self.train_enc = encode_all(cfg, self.tokenizer, train_pairs, context)
        self.heldout_enc = encode_all(cfg, self.tokenizer, heldout_pairs, context)
        self.n_train = len(self.train_enc)
        if cfg.model.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        if cfg.lora is not None:                        # peft also trains the new head in full
            l = cfg.lora
            model = add_lora(model, r=l.r, alpha=l.alpha, dropout=l.dropout, targets=l.target_modules,
                             task_type="SEQ_CLS")
        self.model = model

    def _rewards(self, encoded):
        return pair_rewards(self.model, encoded, self.tokenizer.pad_token_id, autocast_dtype=self.amp)

    def loss(self, micro: torch.Tensor, batch: torch.Tensor):
        out = bradley_terry_loss(*self._rewards([self.train_enc[i] for i in micro.tolist()]))
        weight = len(micro) / len(batch)          # each micro-batch's mean, weighted by its share of the batch
        return out.total * weight, {k: float(v.detach()) * weight for k, v in {**out.losses, **out.metrics}.items()}

    def metrics(self, parts: list[dict], batch: torch.Tensor) -> dict[str, float]:
        return sum_parts(parts)

    def counts(self, batch: torch.Tensor) -> dict[str, int]:
        return {"pairs": len(batch)}

    @torch.no_grad()
    def evaluate(self) -> dict:
        if not self.heldout_enc:
            return {}
        was_training = self.model.training
        self.model.eval()
        mb = self.micro_batch_size
        parts = [self._rewards(self.heldout_enc[s:s + mb]) for s in range(0, len(self.heldout_enc), mb)]
        out = bradley_terry_loss(torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts]))
        self.model.train(was_training)
        return {f"heldout_{k}": float(v) for k, v in {**out.losses, **out.metrics}.items()}

    def summary(self) -> dict[str, int]:
        return {"train_pairs": self.n_train, "heldout_pairs": len(self.heldout_enc)}


def train_rm(cfg: PreferenceTrainConfig, *, progress: bool | None = None) -> dict:
    """Train a Bradley-Terry reward model on the config's pairs. Returns a summary with held-out pair accuracy."""
    return fit(cfg, lambda run_dir, resuming: RewardModelTask(cfg, run_dir, resuming), progress=progress)
