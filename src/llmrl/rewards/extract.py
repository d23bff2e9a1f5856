"""Pull the final answer out of a completion, as a string for a task's `check`.

Order of preference, each taken from the *last* occurrence in the text:
    1. the contents of `\\boxed{...}` (braces balanced, so `\\boxed{\\frac{1}{2}}` gives `\\frac{1}{2}`)
    2. the rest of the line after `Answer:` (any case), without markdown `**`, `$` or a final period
    3. a number (integer or decimal, maybe negative; thousands commas removed)
    4. None
"""

from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")
_ANSWER = re.compile(r"\banswer\s*\**\s*:", re.IGNORECASE)
_DECORATION = re.compile(r"^[\s*$]+|[\s*$.]+$")  # markdown bold, math dollars, a final period
# A minus sign counts only where it cannot be subtraction: not right after a digit, letter or closing bracket.
_NUMBER = re.compile(r"(?:(?<![\w)\]}.])-)?(?<![\w.])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?")


def last_boxed(text: str) -> str | None:
    """Contents of the last `\\boxed{...}` whose braces close, or None."""
    for match in reversed(list(_BOXED.finditer(text))):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i].strip()
    return None


def extract_answer(text: str) -> str | None:
    """The answer a completion gives, as a string, or None when it gives none (see the module docstring)."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    answers = list(_ANSWER.finditer(text))
    if answers:
        line = text[answers[-1].end():].split("\n", 1)[0]
        value = _DECORATION.sub("", line)
        if value:
            return value
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None
