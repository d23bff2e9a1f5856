"""Reading JSONL data files: one parser per kind of row, errors that name file:line."""

from __future__ import annotations

import json
from pathlib import Path


def read_jsonl(path: str | Path, what: str, parse, *, empty: str = "is empty (no JSON lines)") -> list:
    """`parse(row, "file:line")` of every non-blank line of a JSONL file; every error names file:line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file: {path}")
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            out.append(parse(row, f"{path}:{lineno}"))
    if not out:
        raise ValueError(f"{what}: {path} {empty}")
    return out
