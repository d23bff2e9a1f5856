"""The supervised subcommands of `llmrl`: dpo | rm | prm | sft | rft | pairs | prm-data | sft-data.
`llmrl.cli` calls `add_subcommands(sub)`.

    llmrl dpo examples/dpo_arithmetic.yaml preference.beta=0.2 lora=null
    llmrl rm examples/rm_arithmetic.yaml optim.lr=1e-5 run.save_every=20
    llmrl rm examples/rm_arithmetic.yaml run.save_every=20 --resume          # continue a killed run
    llmrl pairs --model smollm2-135m-instruct --task arithmetic --n 64 --out pairs.jsonl
    llmrl prm examples/prm_arithmetic.yaml prm.labels=hard
    llmrl sft examples/sft_arithmetic.yaml lora=null                          # worked answers made from the task
    llmrl sft-data --task arithmetic --n 2000 --out sft.jsonl                 # ... or a file of them: sft.data_path
    llmrl rft examples/rft_arithmetic.yaml rft.rounds=4
    llmrl prm-data --model smollm2-135m-instruct --task arithmetic --n 64 --out step_labels.jsonl

dpo, rm and prm load their config with the one loader of every command (`llmrl.config_loader.load_config`) and train on
the shared supervised loop (`llmrl.train.supervised`): run.save_every, --resume / run.resume, run.time_limit_minutes,
TensorBoard / W&B and the progress bar work as for `llmrl train`.
"""

from __future__ import annotations

import sys


def split_config_arg(args) -> None:
    """`llmrl CMD key=value ...` with no config file: the first positional is an override, not a file."""
    if args.config and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        args.overrides, args.config = [args.config, *args.overrides], None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


def summary_table(summary: dict) -> str:
    """Held-out metrics before and after, one row each."""
    b, a = summary["before"], summary["after"]
    keys = [k for k in a if k.startswith("heldout_")]
    width = max(map(len, keys), default=10)
    rows = [f"{'':{width}}  {'before':>8}  {'after':>8}"]
    rows += [f"{k:{width}}  {_fmt(b.get(k)):>8}  {_fmt(a.get(k)):>8}" for k in keys]
    return "\n".join(rows)


def _run_recipe(args, recipe, schema, unit: str = "pairs") -> int:
    from llmrl.config import ConfigError
    from llmrl.config_loader import load_config

    split_config_arg(args)
    if args.resume:
        args.overrides.append("run.resume=must")
    try:
        cfg = load_config(args.config, args.overrides, schema=schema)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    try:
        summary = recipe(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; run folder: {summary['run_dir']}")
        return 130
    print()
    print(summary_table(summary))
    print(f"\n{summary['steps']} steps on {summary[f'train_{unit}']} {unit} ({summary[f'heldout_{unit}']} held out); "
          f"checkpoint: {summary['checkpoint']}; metrics: {summary['run_dir']}/metrics.jsonl")
    return 0


def cmd_dpo(args) -> int:
    from llmrl.config_supervised import PreferenceTrainConfig
    from llmrl.train.dpo import train_dpo
    return _run_recipe(args, train_dpo, PreferenceTrainConfig)


def cmd_rm(args) -> int:
    from llmrl.config_supervised import PreferenceTrainConfig
    from llmrl.train.rm import train_rm
    return _run_recipe(args, train_rm, PreferenceTrainConfig)


def cmd_prm(args) -> int:
    from llmrl.config_supervised import PrmTrainConfig
    from llmrl.train.prm import train_prm
    return _run_recipe(args, train_prm, PrmTrainConfig, "examples")


def cmd_sft(args) -> int:
    from llmrl.config_supervised import SftTrainConfig
    from llmrl.train.sft import train_sft
    return _run_recipe(args, train_sft, SftTrainConfig, "examples")


def cmd_rft(args) -> int:
    from llmrl.config_supervised import SftTrainConfig
    from llmrl.train.rft import round_table, train_rft

    def run(cfg):
        summary = train_rft(cfg)
        print(round_table(summary.get("rounds", [])))
        return summary
    return _run_recipe(args, run, SftTrainConfig, "examples")


def cmd_sft_data(args) -> int:
    import yaml

    from llmrl.data import make_task
    from llmrl.data.sft import worked_examples, write_sft

    try:
        options = yaml.safe_load(args.options) if args.options else {}
        task = make_task(args.task, seed=args.seed, options=options, train_path=args.train_path)
        rows = worked_examples(task, args.n, seed=args.seed)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    write_sft(rows, args.out)
    print(f"{len(rows)} worked answers of task {args.task} -> {args.out}")
    return 0


def _task_and_model(args):
    """(task, model, tokenizer) of a data-building command's --task/--options/--model (and --threads)."""
    import torch
    import yaml

    from llmrl.data import make_task
    from llmrl.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    options = yaml.safe_load(args.options) if args.options else {}
    task = make_task(args.task, seed=args.seed, options=options, train_path=args.train_path)
    return (task, *load_model(args.model))


def cmd_pairs(args) -> int:
    import yaml

    from llmrl.compute.settings import resolve_autocast
    from llmrl.data.pairs import save_pairs
    from llmrl.train.pairs import build_pairs_from_task

    try:
        task, model, tokenizer = _task_and_model(args)
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    amp = resolve_autocast(args.autocast)
    pairs = build_pairs_from_task(model, tokenizer, task, args.n, samples_per_prompt=args.samples_per_prompt,
                                  pairs_per_prompt=args.pairs_per_prompt, temperature=args.temperature,
                                  max_new_tokens=args.max_new_tokens, seed=args.seed,
                                  chat_template=not args.no_chat_template, autocast_dtype=amp,
                                  progress=not args.no_progress)
    save_pairs(pairs, args.out)
    print(f"{len(pairs)} pairs from {args.n} prompts ({args.samples_per_prompt} samples each) -> {args.out}")
    return 0


def cmd_prm_data(args) -> int:
    import yaml

    from llmrl.compute.settings import resolve_autocast
    from llmrl.data.step_labels import save_step_labels
    from llmrl.train.prm import build_step_labels

    try:
        task, model, tokenizer = _task_and_model(args)
        if args.steps == "regex" and not args.step_pattern:
            raise ValueError("--steps regex needs --step-pattern")
    except (ValueError, FileNotFoundError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    amp = resolve_autocast(args.autocast)
    rows = build_step_labels(model, tokenizer, task, args.n, samples_per_prompt=args.samples_per_prompt,
                             mc_samples=args.mc_samples, segmenter=args.steps, pattern=args.step_pattern,
                             labels=args.labels, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                             seed=args.seed, chat_template=not args.no_chat_template, autocast_dtype=amp,
                             progress=not args.no_progress)
    save_step_labels(rows, args.out)
    n_steps = sum(len(r["steps"]) for r in rows)
    print(f"{len(rows)} responses ({n_steps} labelled steps) from {args.n} prompts -> {args.out}")
    return 0


def _add_sampling_args(p, samples_per_prompt: int, max_new_tokens: int) -> None:
    p.add_argument("--model", required=True, help="HF id, local path, 'smollm2-135m-instruct' or 'tiny'")
    p.add_argument("--task", required=True, help="arithmetic | jsonl | reasoning_gym:<dataset>")
    p.add_argument("--n", type=int, required=True, help="training prompts to sample")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--options", default=None, help="task options as YAML, e.g. '{digits: 3}'")
    p.add_argument("--train-path", default=None, help="jsonl task: prompts file")
    p.add_argument("--samples-per-prompt", type=int, default=samples_per_prompt)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--autocast", default="auto", choices=["auto", "bfloat16", "none"],
                   help="auto: bfloat16 where the CPU computes it natively (AVX-512 BF16, AMX), else fp32")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_subcommands(sub) -> None:
    """Add `dpo`, `rm`, `prm`, `sft`, `rft`, `pairs`, `prm-data` and `sft-data` to an argparse subparsers object."""
    for name, fn, what in (("dpo", cmd_dpo, "DPO / IPO / conservative DPO on preference pairs"),
                           ("rm", cmd_rm, "train a Bradley-Terry reward model on preference pairs"),
                           ("prm", cmd_prm, "train a process reward model on step-labelled responses"),
                           ("sft", cmd_sft, "supervised fine-tuning on completions (JSONL, or a task's worked answers)"),
                           ("rft", cmd_rft, "rejection-sampling fine-tuning (STaR / expert iteration): rounds of "
                                            "sampling, keeping passing answers, SFT")):
        p = sub.add_parser(name, help=f"{what}, from a YAML config plus key=value overrides")
        p.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
        p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. preference.beta=0.2 lora=null")
        p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint "
                       "(run.resume=must; the default, auto, continues when there is one)")
        p.set_defaults(fn=fn)

    p = sub.add_parser("sft-data", help="correct worked answers of a task's training prompts (JSONL for `llmrl sft`)")
    p.add_argument("--task", required=True, help="arithmetic | jsonl | reasoning_gym:<dataset>")
    p.add_argument("--n", type=int, required=True, help="training prompts")
    p.add_argument("--out", required=True, help="output JSONL file")
    p.add_argument("--options", default=None, help="task options as YAML, e.g. '{digits: 3}'")
    p.add_argument("--train-path", default=None, help="jsonl task: prompts file")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_sft_data)

    p = sub.add_parser("pairs", help="sample a model on a task and pair passing with failing completions (JSONL)")
    _add_sampling_args(p, samples_per_prompt=8, max_new_tokens=32)
    p.add_argument("--pairs-per-prompt", type=int, default=1,
                   help="distinct (passing, failing) pairs kept per prompt (at most passing x failing)")
    p.set_defaults(fn=cmd_pairs)

    p = sub.add_parser("prm-data", help="sample a model on a task and label each reasoning step by its Monte-Carlo "
                                        "completion rate (Math-Shepherd; JSONL for `llmrl prm`)")
    _add_sampling_args(p, samples_per_prompt=4, max_new_tokens=64)
    p.add_argument("--mc-samples", type=int, default=8, help="completions sampled from each step's end")
    p.add_argument("--steps", default="blank_line", choices=["blank_line", "numbered", "regex"],
                   help="step segmenter")
    p.add_argument("--step-pattern", default=None, help="with --steps regex: the regex that starts a step")
    p.add_argument("--labels", default="soft", choices=["soft", "hard"],
                   help="soft: the completion rate; hard: 1 if any completion is right")
    p.set_defaults(fn=cmd_prm_data)
