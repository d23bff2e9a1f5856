"""Append-only label files that survive a killed server, two open tabs and two servers on the same folder.

    store = LabelStore(Path("labels/pairs.jsonl"))
    store.append({"prompt": ..., "chosen": ..., "rejected": ...}, key="pair:3f2a...", labeller="ann")  # True
    store.append({...}, key="pair:3f2a...", labeller="bob")                                             # False
    "pair:3f2a..." in store.keys()                                                                       # True

Each label is one JSON line carrying `key` (the item's idempotency key), `labeller` and `time` (UTC, ISO 8601).
`append` takes an exclusive `flock` on a lock file beside the label file, reads the lines other processes
appended since it last looked, and writes only when the key is new: one `os.write` of the whole line to a file
opened with O_APPEND, then `fsync`. So a label is on disk before the browser is told it was saved, a second label
of the same item (another tab, a resubmitted form) is refused, and a kill leaves at most one torn last line,
which readers skip and the next append starts after on a line of its own.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from datetime import datetime, timezone
from pathlib import Path


class LabelStore:
    def __init__(self, path: Path, *, share_lock_with: "LabelStore | None" = None):
        """`share_lock_with`: another store whose lock this one uses, so that `append(..., exclusive_with=...)`
        can check both files' keys under one lock (a pair labelled "tie" in one file, "A" in the other)."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        base = share_lock_with
        self._lock_path = base._lock_path if base else self.path.with_name(self.path.name + ".lock")
        # flock is per open file; the threads of one server share this lock
        self._thread_lock = base._thread_lock if base else threading.Lock()
        self._keys: set[str] = set()
        self._offset = 0                          # bytes of the file already read into _keys

    def _refresh(self) -> None:
        """Read the complete lines appended since the last look (by any process) into the key set."""
        if not self.path.exists():
            return
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        end = data.rfind(b"\n") + 1               # a torn last line (a kill mid-write) is not read, and not skipped
        for line in data[:end].splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("key"), str):
                self._keys.add(row["key"])
        self._offset += end

    def keys(self) -> set[str]:
        with self._thread_lock, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)
            self._refresh()
            return set(self._keys)

    def rows(self) -> list[dict]:
        """Every complete, readable label line (torn or foreign lines skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_bytes().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict):
                out.append(row)
        return out

    def append(self, record: dict, *, key: str, labeller: str, exclusive_with: tuple["LabelStore", ...] = ()) -> bool:
        """Write `record` + key, labeller and time as one line, unless `key` is already labelled here or in one of
        `exclusive_with` (stores sharing this one's lock); True if written."""
        if any(o._lock_path != self._lock_path for o in exclusive_with):
            raise ValueError("exclusive_with needs stores that share this store's lock (share_lock_with=)")
        row = {**record, "key": key, "labeller": labeller,
               "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds")}
        line = (json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8")
        with self._thread_lock, open(self._lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._refresh()
            for other in exclusive_with:
                other._refresh()
            if key in self._keys or any(key in o._keys for o in exclusive_with):
                return False
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                size = os.fstat(fd).st_size
                if size and _last_byte(self.path, size) != b"\n":
                    line = b"\n" + line           # start after a torn line, never glued onto it
                if os.write(fd, line) != len(line):
                    raise OSError(f"short write to {self.path}")
                os.fsync(fd)
            finally:
                os.close(fd)
            self._keys.add(key)
            return True


def _last_byte(path: Path, size: int) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(size - 1)
        return fh.read(1)
