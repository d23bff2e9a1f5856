"""Where llmrl keeps what it builds once: converted models, compiled C kernels."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """`$LLMRL_CACHE`, else `$XDG_CACHE_HOME/llmrl`, else `~/.cache/llmrl`."""
    if os.environ.get("LLMRL_CACHE"):
        return Path(os.environ["LLMRL_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "llmrl"
    return Path.home() / ".cache" / "llmrl"
