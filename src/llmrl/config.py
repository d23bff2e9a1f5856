"""Typed config of `llmrl train`: one small dataclass per concern, each field with its help line and checks, and
`TrainConfig.check()` for the rules across fields. Loading (YAML, `extends:`, presets, dotted overrides) is
config_loader.py; the supervised commands' schemas (dpo, rm, prm, sft, rft) are config_supervised.py.

    cfg = load_config("run.yaml", ["rollout.group_size=8"])    # from llmrl.config_loader: a TrainConfig
    cfg.rollout.group_size, cfg.optim.lr, SECTIONS["rollout"]  # 8, 1e-05, RolloutConfig
    describe(RolloutConfig)                                    # the section's keys, defaults and help lines
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import ClassVar, Iterable

from llmrl.typed import ConfigError, _not_one_of, config_to_dict, describe, f, sections  # noqa: F401 (re-exported)


DEVICE_SPEC = re.compile(r"auto|cpu|cuda(:\d+)?")   # run.device


@dataclass
class ModelConfig:
    name: str = f("smollm2-135m-instruct", "HF id, local path, 'smollm2-135m-instruct' (bundled) or 'tiny' (random init, tests)")
    dtype: str = f("float32", "master-weight dtype: float32 | bfloat16", choices=("float32", "bfloat16"))
    autocast: str = f("auto", "compute dtype for forward passes: auto (bfloat16 where the device has native bf16 "
                      "matmuls: a CUDA GPU, a CPU with AVX-512 BF16 or AMX; else none) | bfloat16 | none (fp32)",
                      choices=("auto", "bfloat16", "none"))
    chat_template: bool = f(True, "apply the tokenizer's chat template to prompts")
    system_prompt: str | None = f(None, "optional system message")
    gradient_checkpointing: bool = f(False, "recompute activations during backward to save memory")
    fused_ops: bool = f(True, "memory-lean RMSNorm, SwiGLU and linears in the training forward (llama, mistral, "
                       "qwen2, qwen3): about half the activations kept, the same forward (compute/fused.py)")
    lora_r: int = f(0, "LoRA rank (0 = full fine-tuning); with LoRA the reference is the base with the adapter disabled", ge=0)
    lora_alpha: float = f(16.0, "LoRA scaling alpha", gt=0)
    lora_dropout: float = f(0.0, "LoRA dropout", ge=0, lt=1)
    lora_targets: list[str] = f(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                                "module names that get LoRA adapters")


@dataclass
class TaskConfig:
    name: str = f("arithmetic", "arithmetic | jsonl | reasoning_gym:<dataset name>")
    train_path: str | None = f(None, "jsonl: training prompts file")
    heldout_path: str | None = f(None, "jsonl: held-out prompts file")
    heldout_size: int = f(200, "held-out examples to evaluate on", ge=1)
    seed: int = f(0, "seed for generating / shuffling task examples")
    options: dict = f({}, "task-specific knobs, e.g. {digits: 2, ops: ['+']}")


def check_jsonl_task(task: TaskConfig | None) -> None:
    """A `jsonl` task needs its file (every schema with a task section runs this in its check)."""
    if task is not None and task.name == "jsonl" and not task.train_path:
        raise ConfigError("task.train_path is required when task.name is 'jsonl'")


@dataclass
class RolloutConfig:
    engine: str = f("native", "generation engine: native | vllm", choices=("native", "vllm"))
    prompts_per_step: int = f(4, "B: prompts sampled per training step", ge=1)
    group_size: int = f(8, "G: samples per prompt", ge=1)
    max_new_tokens: int = f(32, "maximum response tokens per sample (with tools: sampled plus tool-output tokens)", ge=1)
    temperature: float = f(1.0, "sampling temperature (0 = greedy)", ge=0)
    top_p: float = f(1.0, "nucleus-sampling probability mass, in (0, 1]", gt=0, le=1)
    tools: list[str] = f([], "multi-turn tool use: tools the model may call (calculator, python); empty = single-turn; "
                             "with no model.system_prompt a default one teaches the call format")
    max_turns: int = f(4, "with tools: most model turns per episode (a turn ends at a tool call or EOS)", ge=1)
    max_observation_tokens: int = f(64, "with tools: a tool's output is cut to fit in this many tokens", ge=1)
    tool_demo: bool = f(True, "with tools: show one worked exchange (a question, a tool call, its result, the answer) "
                              "before each prompt")
    turn_cache: bool = f(True, "multi-turn (tools, environments): keep each row's KV cache across turns and append "
                               "observations to it; false re-prefills the whole context every turn")
    tis_cap: float = f(2.0, "engine=vllm: cap C of the truncated importance weight min(pi / mu, C) on each token's "
                            "policy-gradient term (Yao et al. 2025)", ge=1)
    mismatch: str = f("tis_token", "engine=vllm: the correction of the engine / trainer mismatch (objectives/mismatch.py): "
                                   "tis_token | tis_seq (truncated at tis_cap) | mis_token | mis_seq (masked beyond "
                                   "tis_cap) | icepop (masked outside [mismatch_low, tis_cap]) | geo_seq",
                      choices=("tis_token", "tis_seq", "mis_token", "mis_seq", "icepop", "geo_seq"))
    mismatch_low: float = f(0.5, "engine=vllm, mismatch=icepop: the lower bound of the two-sided mask", gt=0, le=1)
    sampling: str = f("plain", "how a step's batch is drawn (train/sampling.py): plain | dynamic (DAPO: drop groups "
                               "whose rewards have zero variance, refill with more prompts) | curriculum (replay "
                               "prompts whose running pass rate is strictly between 0 and 1)",
                      choices=("plain", "dynamic", "curriculum"))
    dynamic_max_rounds: int = f(4, "sampling=dynamic: most rounds of prompts_per_step prompts sampled per step", ge=1)
    curriculum_pool: int = f(1024, "sampling=curriculum: most prompts whose pass rates are kept", ge=1)
    curriculum_replay: float = f(0.5, "sampling=curriculum: most share of a batch replayed from the pool", ge=0, le=1)
    curriculum_pass: float = f(1.0, "sampling=curriculum: a sample passes when its total reward is at least this")
    balance_answers: bool = f(False, "draw the training prompts so that each reference answer comes up equally often "
                                     "(data/balance.py): a guard against the constant-answer collapse")
    overlong_buffer: float = f(0.0, "DAPO soft overlong penalty: over the last this share of max_new_tokens the "
                                    "reward falls linearly to -overlong_weight (0 = off; DAPO: 0.2; "
                                    "rewards/overlong.py)", ge=0, le=1)
    overlong_weight: float = f(1.0, "weight of the soft overlong penalty", ge=0)
    mask_truncated: bool = f(False, "responses cut at max_new_tokens are left out of the loss (DAPO's overlong filtering)")
    vllm_options: dict = f({}, "engine=vllm: keyword arguments for vllm.LLM, e.g. {max_model_len: 2048, "
                               "kv_cache_memory_bytes: 2147483648, enforce_eager: true}")


@dataclass
class RewardTerm:
    shorthand: ClassVar[str] = "name"     # `- correct` in a terms list means `- {name: correct}`
    name: str = f(help="reward function name (from the reward registry)")
    weight: float = f(1.0, "multiplier on this term's score")
    options: dict = f({}, "keyword arguments for the reward function")
    gate: str | None = f(None, "another term's name: this term counts only where that term's score >= gate_threshold")
    gate_threshold: float = f(1.0, "threshold of the gate term")
    normalize: str = f("none", "none | batch: z-score this term over the batch before weighting (sub-goals on one scale)",
                       choices=("none", "batch"))
    timeout_s: float | None = f(60.0, "a call of the reward function that runs longer scores its batch 0", gt=0)


@dataclass
class RewardConfig:
    terms: list[RewardTerm] = f([RewardTerm("correct", 1.0)], "weighted reward terms, summed; a bare string is {name: ...}")


@dataclass
class CreditConfig:
    estimator: str = f("grpo", "credit (advantage) estimator name, from the credit registry")
    options: dict = f({}, "the estimator's keyword hyper-parameters, e.g. {normalize_std: false}")
    values: str = f("none", "where V(s_t) comes from for estimators that use it: none | critic | monte_carlo (VinePPO)",
                    choices=("none", "critic", "monte_carlo"))
    steps: str = f("none", "reasoning-step segmenter for step-level credit: none | blank_line | numbered | regex",
                   choices=("none", "blank_line", "numbered", "regex"))
    step_pattern: str | None = f(None, "regex that starts a new step, with steps: regex")
    mc_samples: int = f(4, "monte_carlo values: continuations sampled from each step boundary", ge=1)
    step_reward: str | None = f(None, "process rewards: the step reward scoring each reasoning step (equations | step_judge | prm)")
    step_reward_options: dict = f({}, "keyword arguments for the step reward, e.g. {path: runs/prm_arithmetic/final}")


@dataclass
class CriticConfig:
    shared_trunk: bool = f(False, "value head on the policy's own trunk (true) or on its own copy of the model (false)")
    lr: float = f(1e-5, "critic learning rate (the head's, and its trunk's when not shared)", gt=0)
    value_clip: float | None = f(0.2, "clip V - V_old to this in the value loss (null = no clip)", gt=0)
    coef: float = f(0.5, "weight of the value loss", ge=0)


@dataclass
class ObjectiveConfig:
    name: str = f("ppo_clip", "policy objective name, from the objective registry: ppo_clip | gspo | cispo | dppo | sapo")
    options: dict = f({}, "the objective's own keyword hyper-parameters, e.g. dppo: {divergence: kl, delta_high: 0.05}; "
                          "sapo: {tau_pos: 1.0, tau_neg: 1.05}")
    clip_low: float = f(0.2, "PPO ratio clip below: 1 - clip_low, in [0, 1] (1 = no lower clip)", ge=0, le=1)
    clip_high: float = f(0.2, "PPO ratio clip above: 1 + clip_high", ge=0)
    kl_coef: float = f(0.0, "weight of the KL-to-reference penalty (0 = no reference model)", ge=0)
    kl_estimator: str = f("k3", "KL estimator: k1 | k2 | k3", choices=("k1", "k2", "k3"))
    kl_target: float | None = f(None, "adaptive beta: steer the sampled KL per sequence (nats) toward this; null = fixed beta = kl_coef", gt=0)
    kl_horizon: float = f(10.0, "adaptive beta: RL steps over which a KL error is corrected", gt=0)
    kl_placement: str = f("loss", "where the KL penalty goes: loss (a loss term) | reward (-kl_coef * k1 per token, in the reward)",
                          choices=("loss", "reward"))
    entropy_coef: float = f(0.0, "weight of the entropy bonus")
    aggregation: str = f("token-mean", "loss aggregation: token-mean | seq-mean-token-mean | seq-mean-token-sum | seq-mean-token-sum-norm",
                         choices=("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"))
    dual_clip: float | None = f(None, "dual-clip constant c > 1 bounding the loss of negative-advantage tokens (null = off)", gt=1)
    update: str = f("gradient", "how the policy moves: gradient (the optimizer on the loss) | trpo (natural gradient under max_kl)",
                    choices=("gradient", "trpo"))
    max_kl: float = f(0.01, "trpo: bound on the mean per-token KL(old || new) of one step", gt=0)
    cg_iters: int = f(10, "trpo: conjugate-gradient iterations (Fisher-vector products)", ge=1)
    cg_damping: float = f(0.1, "trpo: damping added to the Fisher matrix", ge=0)
    trpo_rows: int | None = f(None, "trpo: sequences of the rollout used for the Fisher-vector products (null = all)", ge=1)
    epochs: int = f(1, "optimisation passes over each rollout", ge=1)
    minibatches: int = f(1, "optimizer steps per epoch", ge=1)
    early_stop_kl: float | None = f(None, "stop the epochs once a minibatch's approx KL(old || new) exceeds this (null = never)", gt=0)


@dataclass
class OptimConfig:
    lr: float = f(1e-5, "AdamW learning rate", gt=0)
    weight_decay: float = f(0.0, "AdamW weight decay", ge=0)
    betas: tuple[float, float] = f((0.9, 0.99), "AdamW betas")
    eps: float = f(1e-8, "AdamW epsilon", gt=0)
    max_grad_norm: float = f(1.0, "clip the global gradient norm to this", gt=0)
    micro_batch_size: int = f(32, "sequences per forward/backward; gradients accumulate", ge=1)
    micro_batch_tokens: int | None = f(4096, "most tokens (rows x padded length) per forward/backward: a micro-batch "
                                              "of long sequences (multi-turn tools, code) gets fewer rows; "
                                              "activation memory grows with it (RL; null: rows only)", ge=1)
    packing: bool = f(True, "log-probs and update: drop the padding and pack each micro-batch's rows into sequences "
                            "of at most pack_tokens tokens, rows with the same prompt sharing one copy of it (same "
                            "values, fewer FLOPs; compute/packing.py)")
    pack_tokens: int = f(384, "packing: tokens per packed sequence where the attention sees the whole pack (its "
                              "cost grows with the square): rows that share no prompt, and shared prompts under "
                              "gradient checkpointing; a longer row gets a pack of its own", ge=1)
    schedule: str = f("constant", "learning-rate schedule: constant | linear | cosine | count (1/(k+1), a running mean)",
                      choices=("constant", "linear", "cosine", "count"))
    warmup_steps: int = f(0, "linear warm-up steps", ge=0)


@dataclass
class RunConfig:
    name: str = f("run", "run name; the run folder is output_dir/name")
    output_dir: str = f("runs", "parent folder of run folders")
    steps: int = f(40, "training steps", ge=0)
    seed: int = f(0, "seed for sampling and initialisation")
    eval_every: int = f(10, "evaluate every N steps (0 = only before and after)", ge=0)
    eval_max_new_tokens: int | None = f(None, "max new tokens at evaluation (null = rollout.max_new_tokens)", ge=1)
    save_every: int = f(0, "write the full resumable state to RUN_DIR/checkpoints every N steps (0 = only the final "
                           "model); every command (train, dpo, rm, prm)", ge=0)
    keep_checkpoints: int = f(2, "resumable checkpoints kept (the newest)", ge=1)
    resume: str = f("auto", "continue from the run folder's newest checkpoint: auto (if there is one) | must (fail "
                            "if there is none; `llmrl train|dpo|rm|prm --resume`) | never (start over, removing old "
                            "checkpoints)",
                    choices=("auto", "must", "never"))
    samples_every: int = f(5, "write 2 groups of sampled completions with per-token advantages to samples.jsonl every N steps (0 = never)", ge=0)
    threads: int | None = f(None, "torch threads (null = leave as is)", ge=1)
    retain_heap: bool = f(True, "keep freed memory in the process heap (glibc mallopt) rather than returning large "
                                "blocks to the kernel: tensors allocated anew every step then reuse pages instead of "
                                "faulting in fresh ones (compute/heap.py)")
    progress: bool = f(True, "show a progress bar")
    time_limit_minutes: float | None = f(None, "stop training after this many minutes (held-out evaluations during "
                                         "the run not counted), then evaluate and save as after the last step "
                                         "(null = run all steps)", gt=0)
    tensorboard: bool | None = f(None, "also write metrics as TensorBoard events to RUN_DIR/tensorboard "
                                       "(null = when the tensorboard package is installed)")
    wandb_project: str | None = f(None, "also log metrics to this Weights & Biases project (needs wandb; "
                                        "WANDB_MODE=offline logs to RUN_DIR/wandb without a network)")
    device: str = f("auto", "where the models, rollouts and math live: auto (cuda when a GPU is visible, else cpu) | "
                            "cpu | cuda (under torchrun: cuda:LOCAL_RANK) | cuda:N (compute/settings.py)")
    parallel: str = f("ddp", "under torchrun: ddp (a full copy per rank) | fsdp (FSDP2: parameters, gradients and "
                      "optimizer state sharded per decoder layer); ignored in one process", choices=("ddp", "fsdp"))


@dataclass
class SandboxConfig:
    allow_weak: bool = f(False, "where no sandbox layer can start (no bubblewrap, not root), still run model-written "
                                "code (code_tests, the python tool) with rlimits only, with a warning; it can then "
                                "read your files and use the network (`llmrl doctor` shows the active layer)")


@dataclass
class TeacherConfig:
    """On-policy distillation: a teacher's per-token term -coef * (log pi - log pi_teacher) of each sampled token,
    added to credit's token_rewards (train/teacher.py; credit.estimator teacher_kl, or any that reads them)."""
    source: str = f("checkpoint", "checkpoint: a local model with the student's tokenizer (teacher.path) | self: "
                                  "the student itself with teacher.hint added to the prompt",
                    choices=("checkpoint", "self"))
    path: str | None = f(None, "source=checkpoint: the teacher model (a local folder, e.g. runs/main/final)")
    coef: float = f(1.0, "weight of the teacher term (in the per-token rewards, or of the exact loss term)", gt=0)
    estimator: str = f("sampled", "sampled: -coef * (log pi - log pi_teacher) of each sampled token as a per-token "
                                  "reward, through credit | exact: coef * the exact KL(pi || pi_teacher) over the "
                                  "vocabulary at each response position as a loss term (GKD; no sampling noise; "
                                  "N x T x vocabulary floats of memory)", choices=("sampled", "exact"))
    hint: str = f("\n\nA correct worked answer: {demonstration}", "source=self: text appended to the user prompt the "
                  "teacher reads; {answer} = the reference answer, {demonstration} = a worked answer")


@dataclass
class TrainConfig:
    preset: str | None = f(None, "named preset applied under the file and overrides")
    model: ModelConfig = f(ModelConfig(), "policy model")
    task: TaskConfig = f(TaskConfig(), "prompts and answers")
    rollout: RolloutConfig = f(RolloutConfig(), "sampling")
    reward: RewardConfig = f(RewardConfig(), "reward terms")
    credit: CreditConfig = f(CreditConfig(), "credit assignment (advantages)")
    critic: CriticConfig = f(CriticConfig(), "value model, when credit.values is critic")
    objective: ObjectiveConfig = f(ObjectiveConfig(), "policy loss")
    optim: OptimConfig = f(OptimConfig(), "optimizer")
    run: RunConfig = f(RunConfig(), "run bookkeeping")
    sandbox: SandboxConfig = f(SandboxConfig(), "the sandbox that runs model-written code")
    teacher: TeacherConfig | None = f(None, "on-policy distillation: the teacher whose per-token log-probs join the "
                                            "rewards (null = none)")

    def check(self) -> None:
        """Rules across fields, run after every field is checked on its own."""
        if self.teacher is not None and self.teacher.source == "checkpoint" and not self.teacher.path:
            raise ConfigError("teacher.source=checkpoint needs teacher.path (or teacher.source=self)")
        if self.teacher is not None and self.teacher.estimator == "exact" and self.objective.update != "gradient":
            raise ConfigError(f"teacher.estimator=exact is a loss term of the gradient update; objective.update="
                              f"{self.objective.update!r} takes none (use teacher.estimator=sampled)")
        check_jsonl_task(self.task)
        if not self.reward.terms:
            raise ConfigError("reward.terms must list at least one reward term")
        if len(set(self.rollout.tools)) != len(self.rollout.tools):
            raise ConfigError(f"rollout.tools lists a tool twice: {self.rollout.tools}")
        if not DEVICE_SPEC.fullmatch(self.run.device):
            raise ConfigError(f"run.device must be auto, cpu, cuda or cuda:N (N a GPU index), got {self.run.device!r}")
        names = [term.name for term in self.reward.terms]
        for i, term in enumerate(self.reward.terms):
            if not math.isfinite(term.weight):
                raise ConfigError(f"reward.terms[{i}].weight must be finite, got {term.weight}")
            if term.gate is not None and term.gate not in names:
                raise ConfigError(f"reward.terms[{i}].gate {term.gate!r} is not a term; terms: {', '.join(names)}")


SECTIONS: dict[str, type] = sections(TrainConfig)


def validate_names(cfg: TrainConfig, *, rewards: Iterable[str], credit: Iterable[str], objectives: Iterable[str],
                   tools: Iterable[str] | None = None) -> None:
    """Check the registry-backed names (the registries live elsewhere) against the given valid names."""
    rewards, credit, objectives = sorted(rewards), sorted(credit), sorted(objectives)
    checks = [(f"reward.terms[{i}].name", term.name, rewards) for i, term in enumerate(cfg.reward.terms)]
    checks += [("credit.estimator", cfg.credit.estimator, credit), ("objective.name", cfg.objective.name, objectives)]
    if tools is not None:
        checks += [(f"rollout.tools[{i}]", name, sorted(tools)) for i, name in enumerate(cfg.rollout.tools)]
    for key, name, valid in checks:
        if name not in valid:
            raise ConfigError(_not_one_of(key, name, valid))
