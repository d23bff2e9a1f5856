"""Plain-text tables for the terminal (the before/after table of `llmrl train`, `llmrl eval`'s results)."""

from __future__ import annotations


def text_table(rows: list[tuple[str, ...]]) -> str:
    """rows (the first is the header) as a Markdown-style table with padded columns."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(rows[0]), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows[1:])])
