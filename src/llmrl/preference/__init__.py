"""Preference learning: DPO / IPO / conservative DPO and Bradley-Terry reward models (`llmrl dpo`, `llmrl rm`).

    out = dpo_loss(pi_chosen, pi_rejected, ref_chosen, ref_rejected, beta=0.1)     # pure math, [P] tensors
    pairs = load_pairs("pairs.jsonl")                                              # or build_pairs_from_task(...)
    summary = train_dpo(load_preference_config("examples/dpo_arithmetic.yaml"))   # llmrl.preference.dpo
    reward_model_scores(*load_reward_model("runs/rm/final"), prompts, completions)  # llmrl.preference.rm
"""

from llmrl.preference.config import LoraConfig, PreferenceConfig, PreferenceTrainConfig, load_preference_config
from llmrl.preference.data import (PreferencePair, build_pairs_from_task, encode_pair, load_pairs, save_pairs,
                                   split_heldout)
from llmrl.preference.losses import PAIR_LOSSES, PreferenceOutput, bradley_terry_loss, dpo_loss

__all__ = [
    "LoraConfig", "PAIR_LOSSES", "PreferenceConfig", "PreferenceOutput", "PreferencePair", "PreferenceTrainConfig",
    "bradley_terry_loss", "build_pairs_from_task", "dpo_loss", "encode_pair", "load_pairs",
    "load_preference_config", "save_pairs", "split_heldout",
]
