"""Per-step metrics: one JSON object a line in `RUN_DIR/metrics.jsonl`, flushed as written."""

from __future__ import annotations

import json
import math
from pathlib import Path


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return round(v, 6) if isinstance(v, float) else v


class MetricsLog:
    def __init__(self, path: Path, mode: str = "w"):   # "a" to continue a resumed run
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, mode, buffering=1)

    def write(self, record: dict) -> None:
        self._f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
