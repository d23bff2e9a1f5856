"""`llmrl report RUN_DIR`: one self-contained HTML file of a run (curves, per-token credit heatmaps, samples).

    from llmrl.report import write_report
    write_report("runs/grpo")            # -> runs/grpo/report.html

Inputs, all in the run folder; only `metrics.jsonl` is required, any field may be missing or null, unknown
fields are ignored:

- `metrics.jsonl` (written by `llmrl.runio.metrics.MetricsLog`): `"kind": "train"` lines with `step`, `reward`,
  `reward/<term>`, `kl_to_ref`, `entropy`, `clip_fraction`, `response_length`, `time_*`, `lr`, `grad_norm`,
  `loss_*`, ...; `"kind": "eval"` lines with `step`, `heldout_accuracy`, `heldout_response_length`,
  `heldout_kl_to_ref`, `heldout_top_answer_share`, `heldout_constant_answer_accuracy`, `time_eval`.
- `samples.jsonl`: one JSON object per sampled sequence, written every few steps:

      {"step": int, "group": int, "prompt": str, "completion": str,
       "tokens": [str, ...],            # the decoded response tokens, one string each
       "response_mask": [0|1, ...],     # 1 = token the policy chose, 0 = tool output / padding
       "advantages": [float, ...],      # per token
       "step_ids": [int, ...] or null,  # reasoning-step index per token, -1 = none
       "teacher": [float, ...],         # optional (on-policy distillation): the teacher's per-token term
       "reward": float, "reward_components": {name: float}, "correct": float|null,
       "tool_calls": int, "turns": int, "tool_errors": int,      # these three only for tool episodes
       "truncated": bool}                                        # cut at max_new_tokens

  `tokens`, `response_mask`, `advantages` and `step_ids` are aligned (same length T_i, the sample's own response
  length: write them without the batch's right padding). `group` is the prompt's group id within the step, so
  the samples of one prompt share `(step, group)`.
- `config.yaml` (shown in a collapsible block) and `summary.yaml` (the before/after table).
- `audit.json` (written by `llmrl audit`): its findings, shown in an Audit section.
- `sandbox.json` (written by `llmrl train` when a reward or tool ran model-written code): the sandbox layer that
  ran it, its active layers and what was missing (`llmrl.sandbox.Status.as_dict`).
"""

from __future__ import annotations

import sys

from llmrl.report.html import write_report

__all__ = ["write_report", "add_subcommand", "cmd_report"]


def cmd_report(args) -> int:
    try:
        path = write_report(args.run_dir, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {path}")
    return 0


def add_subcommand(subparsers) -> None:
    """Add `report RUN_DIR [--out FILE]` to an argparse sub-parser set (the one `llmrl.cli.main` builds)."""
    p = subparsers.add_parser("report", help="write a self-contained HTML report of a run folder")
    p.add_argument("run_dir", metavar="RUN_DIR", help="run folder written by `llmrl train` (has metrics.jsonl)")
    p.add_argument("--out", default=None, metavar="FILE", help="output file (default RUN_DIR/report.html)")
    p.set_defaults(fn=cmd_report)
