"""Text that sandboxed code wrote, made safe to log: one visible line, length-capped.

    escape("boom\\n2026-01-01 INFO fake line\\x1b[2J")   # 'boom\\\\n2026-01-01 INFO fake line\\\\x1b[2J'

Control characters (C0, DEL, C1), line and paragraph separators and invisible format characters (bidi overrides,
zero-width) are written as escapes (\\n, \\r, \\t, \\xNN, \\uNNNN); a backslash is doubled, so an escape in the
output always comes from a character in the input. Past `limit` characters the rest is dropped and counted.
"""

from __future__ import annotations

import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\"}


def _visible(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"):
        code = ord(ch)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
    return ch


def escape(text: object, limit: int = 600) -> str:
    """`text` (str() of anything) on one line with every invisible or control character escaped, cut at `limit`
    characters of output (then "... [N more characters]" says how much was dropped)."""
    s = text if isinstance(text, str) else str(text)
    out, n = [], 0
    for i, ch in enumerate(s):
        piece = ch if " " <= ch <= "~" and ch != "\\" else _visible(ch)
        if n + len(piece) > limit:
            return "".join(out) + f"... [{len(s) - i} more characters]"
        out.append(piece)
        n += len(piece)
    return "".join(out)
