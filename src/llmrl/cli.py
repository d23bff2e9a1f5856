"""`llmrl` command line: train | eval | presets | doctor | report | dpo | rm | pairs | prm | prm-data.

    llmrl train examples/grpo_arithmetic.yaml rollout.group_size=8 optim.lr=2e-5
    llmrl train examples/grpo_arithmetic.yaml run.save_every=10 --resume     # continue a killed run
    llmrl eval --model runs/grpo/final --task arithmetic
    llmrl eval --model smollm2-135m-instruct --suite gsm8k,humaneval,bfcl,arithmetic --limit 50
    llmrl presets
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from llmrl.report.text import text_table


def before_after_table(summary: dict) -> str:
    b, a = summary["before"], summary["after"]
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    return text_table([
        ("", "before", "after"),
        ("held-out accuracy", fmt(b["heldout_accuracy"]), fmt(a["heldout_accuracy"])),
        ("share given full credit", fmt(b.get("heldout_exact")), fmt(a.get("heldout_exact"))),
        ("mean response tokens", f"{b['heldout_response_length']:.1f}", f"{a['heldout_response_length']:.1f}"),
        ("KL(policy || reference), nats/seq", fmt(b.get("heldout_kl_to_ref")), fmt(a.get("heldout_kl_to_ref"))),
        ("share given the commonest answer", fmt(b.get("heldout_top_answer_share")),
         fmt(a.get("heldout_top_answer_share"))),
    ])


def sandbox_for(pieces: list, allow_weak: bool):
    """(the sandbox's status, 0) when a piece runs model-written code (`runs_model_code`) and a sandbox layer can
    run it; (None, 0) when none does; (None, 2) after printing what is missing when none can."""
    from llmrl import sandbox

    sandbox.configure(allow_weak=allow_weak)
    if not any(getattr(p, "runs_model_code", False) for p in pieces):
        return None, 0
    try:
        return sandbox.require(), 0
    except sandbox.SandboxUnavailable as e:
        print(f"error: {e}", file=sys.stderr)
        return None, 2


def cmd_doctor(args) -> int:
    """Which sandbox layer runs model-written code here, what it lets the code see, and what is missing."""
    from llmrl import sandbox

    sandbox.configure(allow_weak=args.allow_weak)
    st = sandbox.status()
    print(st.describe())
    return 0 if st.mode else 1


def cmd_train(args) -> int:
    from llmrl.cli_supervised import split_config_arg
    from llmrl.config import ConfigError, validate_names
    from llmrl.config_loader import load_config
    from llmrl.credit import CREDIT
    from llmrl.objectives.policy import OBJECTIVES
    from llmrl.presets import PRESETS
    from llmrl.rewards import REWARDS
    from llmrl.rollout.tools import TOOLS

    split_config_arg(args)
    if args.resume:
        args.overrides.append("run.resume=must")
    try:
        cfg = load_config(args.config, args.overrides, presets=PRESETS)
        validate_names(cfg, rewards=REWARDS.names(), credit=CREDIT.names(), objectives=OBJECTIVES.names(),
                       tools=TOOLS.names())
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    pieces = [REWARDS.get(t.name) for t in cfg.reward.terms] + [TOOLS.get(n) for n in cfg.rollout.tools]
    sandbox_status, code = sandbox_for(pieces, cfg.sandbox.allow_weak)
    if code:
        return code
    from llmrl.distributed import runtime as distributed
    from llmrl.train.rl import train

    try:
        summary = train(cfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        main = distributed.is_main()    # under torchrun rank 0 reports; one process: always
        distributed.shutdown()
    if not main:
        return 0
    if summary.get("interrupted"):
        print(f"interrupted at step {summary['step']}; run folder: {summary['run_dir']}")
        return 130
    from llmrl.report import write_report

    if sandbox_status is not None:       # the report says which sandbox layer ran the model's code
        Path(summary["run_dir"], "sandbox.json").write_text(json.dumps(sandbox_status.as_dict(), indent=1))
    report = write_report(summary["run_dir"])
    print()
    print(before_after_table(summary))
    print(f"\n{summary['steps']} steps; checkpoint: {summary['checkpoint']}; metrics: {summary['run_dir']}/metrics.jsonl; "
          f"report: {report}")
    return 0


def cmd_eval(args) -> int:
    if args.suite or args.compare:           # standard suites (llmrl/evals/cli.py)
        from llmrl.evals import cli as evals_cli

        if args.compare:
            return evals_cli.cmd_compare(args)
        return evals_cli.cmd_suites(args)
    if not args.model:
        print("error: --model is required", file=sys.stderr)
        return 2
    from functools import partial

    import torch

    from llmrl.data import make_task
    from llmrl.models import load_model
    from llmrl.rollout.collect import collect_rollout
    from llmrl.rollout.episodes import collect_episodes
    from llmrl.rollout.tools import demonstration, resolve_tools, system_prompt
    from llmrl.compute.settings import resolve_autocast
    from llmrl.train.evaluate import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    collect, prompt = collect_rollout, None
    if args.tools:                       # the multi-turn loop, prompted as `llmrl train` prompts with rollout.tools
        names = [n.strip() for n in args.tools.split(",") if n.strip()]
        try:
            tools = resolve_tools(names)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        if sandbox_for(list(tools.values()), False)[1]:
            return 2
        collect = partial(collect_episodes, tools=tools, max_turns=args.max_turns,
                          max_observation_tokens=args.max_observation_tokens, demo=demonstration(names))
        prompt = system_prompt(names)
    task = make_task(args.task, seed=args.seed, train_path=args.train_path, heldout_path=args.heldout_path)
    examples = task.heldout(args.n)
    model, tokenizer = load_model(args.model)
    amp = resolve_autocast(args.autocast)
    result = evaluate(model, tokenizer, examples, max_new_tokens=args.max_new_tokens or 32, autocast_dtype=amp,
                      chat_template=not args.no_chat_template, system_prompt=prompt, collect=collect,
                      progress=not args.no_progress)
    calls = f" | tool calls per episode {result['tool_calls']:.2f}" if "tool_calls" in result else ""
    print(f"model {args.model} | task {args.task} | held-out n={result['n']} | "
          f"accuracy {result['accuracy']:.3f} | mean response tokens {result['response_length']:.1f}{calls}")
    for s in result["samples"][:args.show]:
        print(f"  [{'ok' if s['correct'] else 'x '}] {s['prompt']!r} -> {s['completion']!r}")
    return 0


def cmd_presets(args) -> int:
    from llmrl.presets import PRESETS, describe_preset

    for name in sorted(PRESETS):
        print(f"{name:13s} {describe_preset(name)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="llmrl", description="Reinforcement-learning post-training of language models.")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="run RL training from a YAML config plus key=value overrides")
    p.add_argument("config", nargs="?", help="YAML config file (omit to use the defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. rollout.group_size=8 optim.lr=2e-5")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's newest checkpoint "
                   "(run.resume=must; the default, auto, continues when there is one)")
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("eval", help="greedy held-out accuracy of a model on a task, or standard eval suites")
    p.add_argument("--model", default=None, help="HF id, local path, run folder, 'smollm2-135m-instruct' or 'tiny'")
    p.add_argument("--task", default="arithmetic", help="arithmetic | jsonl | reasoning_gym:<dataset>")
    p.add_argument("--n", type=int, default=200, help="held-out examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-path", default=None)
    p.add_argument("--heldout-path", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 for --task, the suite's own for --suite")
    p.add_argument("--autocast", default="auto", choices=["auto", "bfloat16", "none"],
                   help="auto: bfloat16 where the CPU computes it natively (AVX-512 BF16, AMX), else fp32")
    p.add_argument("--no-chat-template", action="store_true")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--show", type=int, default=3, help="sample completions to print")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tools", default=None, help="comma-separated tools for multi-turn episodes, e.g. calculator,python")
    p.add_argument("--max-turns", type=int, default=4, help="with --tools: most model turns per episode")
    p.add_argument("--max-observation-tokens", type=int, default=64, help="with --tools: a tool output's token cap")
    from llmrl.evals.cli import add_arguments as add_suite_arguments

    add_suite_arguments(p)
    p.set_defaults(fn=cmd_eval)

    p = sub.add_parser("presets", help="list the named algorithm compositions")
    p.set_defaults(fn=cmd_presets)

    p = sub.add_parser("doctor", help="which sandbox layer runs model-written code here, and what is missing")
    p.add_argument("--allow-weak", action="store_true", help="as with sandbox.allow_weak: true")
    p.set_defaults(fn=cmd_doctor)

    from llmrl.cli_supervised import add_subcommands as add_supervised_subcommands

    add_supervised_subcommands(sub)       # dpo | rm | prm | pairs | prm-data
    from llmrl.report import add_subcommand as add_report_subcommand

    add_report_subcommand(sub)            # report RUN_DIR [--out FILE]
    from llmrl.audit import add_subcommand as add_audit_subcommand
    from llmrl.studio import add_subcommand as add_studio_subcommand

    add_audit_subcommand(sub)             # audit RUN_DIR [--config YAML] [--set D.OPT=V] [--warn-only]
    add_studio_subcommand(sub)            # studio [RUN_DIR ...] [--host H] [--port P] [--labels DIR]

    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()       # our own bar is the one to watch
    hf_logging.set_verbosity_error()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
