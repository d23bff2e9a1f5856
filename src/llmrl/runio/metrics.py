"""Per-step metrics: one JSON object a line in `RUN_DIR/metrics.jsonl`, flushed as written (and sent to the sinks)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return round(v, 6) if isinstance(v, float) else v


class MetricsLog:
    """One JSON line per record; each record also goes to the `sinks` (TensorBoard, W&B: `llmrl.runio.sinks`).
    enabled=False writes nothing (the ranks other than 0 under torchrun)."""

    def __init__(self, path: Path, mode: str = "w", sinks: Sequence = (), *, enabled: bool = True):   # "a": resumed
        self.path = Path(path)
        self._f = None
        self.sinks = list(sinks)
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, mode, buffering=1)

    def write(self, record: dict) -> None:
        if self._f is None:
            return
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()
        for sink in self.sinks:
            sink.write(record)

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
        for sink in self.sinks:
            sink.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def sample_records(step: int, rollout, advantages, rewards, tokenizer, *, groups: int = 2) -> list[dict]:
    """The first `groups` groups of a step as JSON-ready rows: tokens with their mask and advantage (for reports).
    Tool outputs inside a multi-turn response are kept, with response_mask 0; each row also gets its tool calls,
    turns and tool errors when the rollout has them, and whether it was cut at max_new_tokens (`truncated`)."""
    keep = [i for i, g in enumerate(rollout.group_ids.tolist()) if g < groups]
    present = rollout.attention_mask[:, rollout.prompt_len:]                  # [N, T] sampled or tool output
    tool_stats = [k for k in ("tool_calls", "turns", "tool_errors") if k in rollout.extras]
    truncated = rollout.extras.get("truncated")                               # [N] bool: cut at max_new_tokens
    rows = []
    for i in keep:
        n = int(present[i].nonzero().max()) + 1 if present[i].any() else 0
        ids = rollout.response_ids[i, :n].tolist()
        rows.append({
            "step": step, "group": int(rollout.group_ids[i]), "prompt": rollout.examples[i].prompt,
            "completion": rollout.completions[i], "tokens": [tokenizer.decode([t]) for t in ids],
            "response_mask": [int(m) for m in rollout.response_mask[i, :n].tolist()],
            "advantages": [round(float(a), 5) for a in advantages[i, :n].tolist()],
            "step_ids": None if rollout.step_ids is None else rollout.step_ids[i, :n].tolist(),
            "reward": float(rewards.total[i]),
            "reward_components": {k: float(v[i]) for k, v in rewards.components.items()},
            "correct": float(rewards.components["correct"][i]) if "correct" in rewards.components else None,
            **{k: int(rollout.extras[k][i]) for k in tool_stats},
            **({"truncated": bool(truncated[i])} if truncated is not None else {}),
        })
        if "teacher_rewards" in rollout.extras:     # on-policy distillation: the teacher's per-token term
            shown = rollout.extras.get("teacher_shown", rollout.extras["teacher_rewards"])
            rows[-1]["teacher"] = [round(float(a), 5) for a in shown[i, :n].tolist()]
    return rows
