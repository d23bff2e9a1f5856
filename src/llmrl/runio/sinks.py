"""Where metric records go besides RUN_DIR/metrics.jsonl: TensorBoard and Weights & Biases.

A sink takes the same records `MetricsLog.write` does (`{"kind": "train", "step": 3, "reward": 0.5, ...}`) and
logs every numeric field as a scalar named `KIND/FIELD` (train/reward, eval/heldout_accuracy) at the record's
step. Every recipe opens its log with `open_metrics(cfg, run_dir)`, so RL, DPO, RM and PRM runs all get them:

    run.tensorboard: true | false | null     RUN_DIR/tensorboard (null: when the tensorboard package is installed)
    run.wandb_project: NAME                  wandb.init(project=NAME, name=run.name, config=the resolved config,
                                             dir=RUN_DIR); WANDB_MODE=offline works without a network

Resuming at step k: TensorBoard drops the events of the killed run after step k (`purge_step`); W&B continues the
same run (its id is kept in RUN_DIR/wandb_run_id) and plots against the logged `step`, so records the killed run
wrote after its checkpoint stay there beside the new ones.
"""

from __future__ import annotations

import importlib.util
import math
import uuid
from pathlib import Path

from llmrl.config import config_to_dict
from llmrl.runio.metrics import MetricsLog


def scalars(record: dict) -> tuple[int | None, dict[str, float]]:
    """(step, {"KIND/FIELD": value}) for every finite int or float field of a record but kind and step."""
    kind = record.get("kind") or "metrics"
    values = {f"{kind}/{k}": float(v) for k, v in record.items()
              if k not in ("kind", "step") and isinstance(v, (int, float)) and not isinstance(v, bool)
              and math.isfinite(v)}
    return record.get("step"), values


class TensorBoardSink:
    def __init__(self, log_dir: Path, *, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError("run.tensorboard=true needs the tensorboard package: pip install tensorboard "
                             "(or set run.tensorboard=false)") from e
        self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        for tag, v in values.items():
            self.writer.add_scalar(tag, v, global_step=step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, project: str, *, name: str, config: dict, run_dir: Path, resume: bool):
        try:
            import wandb
        except ImportError as e:
            raise ValueError(f"run.wandb_project={project!r} needs the wandb package: pip install wandb "
                             "(or set run.wandb_project=null)") from e
        id_file = Path(run_dir) / "wandb_run_id"
        run_id = id_file.read_text().strip() if resume and id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        self.run = wandb.init(project=project, name=name, config=config, dir=str(run_dir), id=run_id,
                              resume="allow")
        self.run.define_metric("step")
        self.kinds: set[str] = set()

    def write(self, record: dict) -> None:
        step, values = scalars(record)
        kind = record.get("kind") or "metrics"
        if kind not in self.kinds:                  # plot against the recipe's step, not W&B's own counter
            self.kinds.add(kind)
            self.run.define_metric(f"{kind}/*", step_metric="step")
        if values:
            self.run.log({"step": step, **values})

    def close(self) -> None:
        self.run.finish()


def open_metrics(cfg, run_dir: Path, *, start: int = 0, enabled: bool = True) -> MetricsLog:
    """RUN_DIR/metrics.jsonl with the sinks `cfg.run` asks for; `start` > 0: a run resumed after that step
    (the file is appended to; its earlier records were put back by `checkpoint.restore`). enabled=False: a log
    that writes nothing and opens no sink (the ranks other than 0 under torchrun)."""
    run, run_dir = cfg.run, Path(run_dir)
    if not enabled:
        return MetricsLog(run_dir / "metrics.jsonl", enabled=False)
    sinks = []
    if run.tensorboard or (run.tensorboard is None and importlib.util.find_spec("tensorboard") is not None):
        sinks.append(TensorBoardSink(run_dir / "tensorboard", purge_step=start + 1 if start else None))
    if run.wandb_project:
        sinks.append(WandbSink(run.wandb_project, name=run.name, config=config_to_dict(cfg), run_dir=run_dir,
                               resume=start > 0))
    return MetricsLog(run_dir / "metrics.jsonl", "a" if start else "w", sinks=sinks)
