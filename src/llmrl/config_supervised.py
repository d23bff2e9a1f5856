"""Typed config of the supervised commands, beside the RL one (config.py): `llmrl dpo` and `llmrl rm`
(PreferenceTrainConfig), `llmrl prm` (PrmTrainConfig), `llmrl sft` and `llmrl rft` (SftTrainConfig). Their model,
task, optim and run sections are the RL config's, and they load through the same loader (config_loader.py):

    cfg = load_config("dpo.yaml", ["preference.beta=0.2", "lora=null"], schema=PreferenceTrainConfig)   # dpo, rm
    cfg = load_config("prm.yaml", ["prm.labels=hard"], schema=PrmTrainConfig)                           # prm
    cfg = load_config("sft.yaml", ["sft.epochs=2"], schema=SftTrainConfig)                               # sft, rft
"""

from __future__ import annotations

from dataclasses import dataclass

from llmrl.config import ModelConfig, OptimConfig, RunConfig, TaskConfig, check_jsonl_task
from llmrl.typed import ConfigError, f


# ----------------------------------------------------------------------------- supervised commands: dpo, rm, prm

@dataclass
class LoraConfig:
    r: int = f(16, "LoRA rank", ge=1)
    alpha: float = f(32.0, "LoRA alpha (the update is scaled by alpha / r)", gt=0)
    dropout: float = f(0.0, "dropout on the LoRA input", ge=0, lt=1)
    target_modules: list[str] | None = f(None, "module names to adapt (null = every linear layer but the head)")


@dataclass
class PreferenceConfig:
    data_path: str | None = f(None, "JSONL of {prompt, chosen, rejected} pairs (null = build pairs from `task`)")
    heldout_path: str | None = f(None, "JSONL of held-out pairs (null = hold out heldout_fraction of the prompts)")
    heldout_fraction: float = f(0.1, "fraction of prompts whose pairs are held out when heldout_path is null",
                                ge=0, lt=1)
    build_prompts: int = f(256, "building from a task: training prompts to sample", ge=1)
    build_samples_per_prompt: int = f(8, "building from a task: completions sampled per prompt", ge=2)
    build_pairs_per_prompt: int = f(1, "building from a task: distinct (passing, failing) pairs kept per prompt, "
                                    "at most passing x failing; held-out pairs are split off by prompt", ge=1)
    build_temperature: float = f(1.0, "building from a task: sampling temperature", gt=0)
    build_max_new_tokens: int = f(64, "building from a task: maximum tokens per completion", ge=1)
    kind: str = f("dpo", "DPO loss: dpo (sigmoid; with label_smoothing > 0, conservative DPO) | ipo",
                  choices=("dpo", "ipo"))
    beta: float = f(0.1, "DPO's beta (KL strength; IPO's tau): the implicit reward is beta * log(pi / pi_ref)", gt=0)
    label_smoothing: float = f(0.0, "conservative DPO: assumed probability that a label is flipped", ge=0, lt=0.5)
    per_token_mean: bool | None = f(None, "average log-probs over response tokens (null = true for ipo, as TRL; "
                                          "false for dpo, as the paper)")
    epochs: int = f(1, "passes over the training pairs (run.steps > 0 caps the optimizer steps)", ge=1)
    batch_size: int = f(16, "pairs per optimizer step (split into micro-batches of optim.micro_batch_size pairs)",
                        ge=1)
    max_length: int | None = f(None, "prompt + response tokens; longer responses are cut (null = model context)",
                               ge=2)


@dataclass
class PreferenceTrainConfig:
    """`llmrl dpo` and `llmrl rm`. `task` names where pairs are built from (when no `preference.data_path` is
    given) and the task whose held-out accuracy DPO measures before and after. `lora: null`: full fine-tuning."""
    model: ModelConfig = f(ModelConfig(), "policy model (for `rm`: the causal LM the reward model starts from)")
    task: TaskConfig | None = f(None, "task to build pairs from and to measure held-out accuracy on (null = none)")
    preference: PreferenceConfig = f(PreferenceConfig(), "pairs and the preference loss")
    lora: LoraConfig | None = f(LoraConfig(), "LoRA adapter; the reference is the model with it disabled "
                                              "(null = full fine-tuning against a frozen copy)")
    optim: OptimConfig = f(OptimConfig(lr=5e-6, micro_batch_size=4), "optimizer (micro_batch_size counts pairs)")
    run: RunConfig = f(RunConfig(name="dpo", steps=0, eval_every=0), "run bookkeeping (steps: cap on optimizer "
                                                                      "steps, 0 = no cap)")

    def check(self) -> None:
        if self.preference.data_path is None and self.task is None:
            raise ConfigError("preference.data_path is required unless `task` names a task to build pairs from")
        check_jsonl_task(self.task)
        if self.preference.kind == "ipo" and self.preference.label_smoothing:
            raise ConfigError("preference.label_smoothing applies to preference.kind 'dpo' only")


@dataclass
class PrmConfig:
    data_path: str | None = f(None, "JSONL of {prompt, steps, labels} (null = build step labels from `task`)")
    heldout_path: str | None = f(None, "JSONL of held-out step labels (null = hold out heldout_fraction of prompts)")
    heldout_fraction: float = f(0.1, "fraction of prompts held out when heldout_path is null", ge=0, lt=1)
    build_prompts: int = f(64, "building from a task: prompts to sample", ge=1)
    build_samples_per_prompt: int = f(4, "building from a task: responses sampled per prompt", ge=1)
    build_mc_samples: int = f(8, "building from a task: completions sampled from each step's end", ge=1)
    build_temperature: float = f(1.0, "building from a task: sampling temperature", gt=0)
    build_max_new_tokens: int = f(64, "building from a task: maximum tokens per response", ge=1)
    steps: str = f("blank_line", "building from a task: step segmenter", choices=("blank_line", "numbered", "regex"))
    step_pattern: str | None = f(None, "building from a task: regex that starts a step, with steps: regex")
    labels: str = f("soft", "building: soft (the completion rate) | hard (1 if any completion is right)",
                    choices=("soft", "hard"))
    epochs: int = f(1, "passes over the training responses (run.steps > 0 caps the optimizer steps)", ge=1)
    batch_size: int = f(16, "responses per optimizer step (micro-batches of optim.micro_batch_size)", ge=1)
    max_length: int | None = f(None, "prompt + response tokens; steps past it are cut (null = model context)", ge=2)


@dataclass
class PrmTrainConfig:
    """`llmrl prm`: a process reward model on step-labelled responses (read, or built from `task`)."""
    model: ModelConfig = f(ModelConfig(), "the causal LM the PRM starts from (and that samples, when building)")
    task: TaskConfig | None = f(None, "task to build step labels from (null = prm.data_path)")
    prm: PrmConfig = f(PrmConfig(), "step labels and training")
    lora: LoraConfig | None = f(None, "LoRA adapter (null = full fine-tuning; the head is always trained in full)")
    optim: OptimConfig = f(OptimConfig(lr=1e-5, micro_batch_size=8), "optimizer (micro_batch_size counts responses)")
    run: RunConfig = f(RunConfig(name="prm", steps=0, eval_every=0), "run bookkeeping (steps: cap, 0 = none)")

    def check(self) -> None:
        if self.prm.data_path is None and self.task is None:
            raise ConfigError("prm.data_path is required unless `task` names a task to build step labels from")
        check_jsonl_task(self.task)
        if self.prm.steps == "regex" and not self.prm.step_pattern:
            raise ConfigError("prm.steps=regex needs prm.step_pattern")


# ----------------------------------------------------------------------------- supervised fine-tuning: sft, rft

@dataclass
class SftConfig:
    data_path: str | None = f(None, "JSONL of {prompt, completion} or {messages: [..., assistant]} (null = worked "
                                    "answers made from `task`, written to RUN_DIR/sft_data.jsonl)")
    heldout_path: str | None = f(None, "JSONL of held-out examples for the held-out NLL (null = heldout_fraction)")
    heldout_fraction: float = f(0.05, "fraction of the examples held out when heldout_path is null", ge=0, lt=1)
    build_examples: int = f(2000, "building from a task: training prompts, each with its worked answer", ge=1)
    epochs: int = f(1, "passes over the training examples (run.steps > 0 caps the optimizer steps)", ge=1)
    batch_size: int = f(16, "examples per optimizer step (micro-batches of optim.micro_batch_size)", ge=1)
    max_length: int | None = f(None, "prompt + completion tokens; longer completions are cut (null = model "
                                     "context)", ge=2)
    pack_tokens: int | None = f(2048, "pack each micro-batch padding-free into rows of this many tokens (null = "
                                      "padded rows)", ge=16)


@dataclass
class RftConfig:
    """Rejection-sampling fine-tuning (STaR / expert iteration): K rounds of sample -> keep passing -> SFT."""
    rounds: int = f(3, "rounds of sampling and fine-tuning", ge=1)
    prompts_per_round: int = f(128, "training prompts sampled each round (fresh ones each round)", ge=1)
    samples_per_prompt: int = f(8, "completions sampled per prompt from the current policy", ge=1)
    temperature: float = f(1.0, "sampling temperature", gt=0)
    max_new_tokens: int = f(32, "maximum tokens per sampled completion", ge=1)
    max_per_prompt: int = f(4, "distinct passing completions kept per prompt, at most", ge=1)


@dataclass
class SftTrainConfig:
    """`llmrl sft` and `llmrl rft`. `task`: where worked answers are made from (sft, when no sft.data_path) or
    prompts are sampled from (rft), and whose held-out greedy accuracy is measured. `lora: null`: full fine-tuning."""
    model: ModelConfig = f(ModelConfig(), "the model to fine-tune")
    task: TaskConfig | None = f(None, "task for worked answers / rejection sampling and held-out accuracy")
    sft: SftConfig = f(SftConfig(), "data and training")
    rft: RftConfig = f(RftConfig(), "rejection-sampling rounds (`llmrl rft` only)")
    lora: LoraConfig | None = f(LoraConfig(), "LoRA adapter (null = full fine-tuning)")
    optim: OptimConfig = f(OptimConfig(lr=1e-4, micro_batch_size=8), "optimizer (micro_batch_size counts examples)")
    run: RunConfig = f(RunConfig(name="sft", steps=0, eval_every=0), "run bookkeeping (steps: cap, 0 = none)")

    def check(self) -> None:
        if self.sft.data_path is None and self.task is None:
            raise ConfigError("sft.data_path is required unless `task` names a task to make worked answers from")
        check_jsonl_task(self.task)
