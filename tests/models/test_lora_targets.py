"""The one LoRA entry point (`models.lora.add_lora`) for every trainer: the default targets are every linear layer of
the backbone and never the head; a classifier's new head trains in full; explicit targets are kept as given."""

import torch

from llmrl.models import load_model
from llmrl.models.heads import load_prm, load_reward_model
from llmrl.models.lora import add_lora, linear_targets

BACKBONE = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]


def adapted(model) -> set[str]:
    return {n.rpartition(".lora_A")[0].rpartition(".")[2] for n, _ in model.named_parameters() if ".lora_A." in n}


def trainable_outside_the_adapter(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n}


def test_default_targets_are_the_backbone_linears_for_every_head():
    for load, task_type in ((load_model, "CAUSAL_LM"), (load_reward_model, "SEQ_CLS"), (load_prm, "TOKEN_CLS")):
        model = load("tiny")[0]
        assert linear_targets(model) == BACKBONE, task_type
        lora = add_lora(model, r=2, alpha=4.0, dropout=0.0, task_type=task_type)
        assert adapted(lora) == set(BACKBONE), task_type
        n_layers = model.config.num_hidden_layers
        assert sum(".lora_A." in n for n, _ in lora.named_parameters()) == n_layers * len(BACKBONE)
        extra = trainable_outside_the_adapter(lora)
        if task_type == "CAUSAL_LM":
            assert extra == set()                                # the (tied) LM head stays frozen
        else:
            assert extra and all(".score." in n for n in extra)  # the new head trains in full


def test_explicit_targets_and_an_untouched_start():
    model, tok = load_model("tiny")
    ids = torch.tensor([tok("2+2=4")["input_ids"]])
    with torch.no_grad():
        before = model(ids).logits
    lora = add_lora(model, r=4, alpha=8.0, dropout=0.0, targets=["q_proj", "v_proj"])
    assert adapted(lora) == {"q_proj", "v_proj"}
    with torch.no_grad():
        assert torch.equal(lora(ids).logits, before)             # B = 0: the wrapped model is the base
