"""Reasoning steps: which step each response token belongs to, for step-level credit (`process`, `vineppo`).

    segment_steps(token_texts, response_mask, mode=...)  -> step id of each token of one response
    step_ids_for_batch(tokenizer, response_ids, response_mask) -> LongTensor [N, T]
    step_boundaries(step_ids)                            -> first token of each step, per row

Notation: N sequences, T response tokens. Step ids count 0, 1, 2, ... in order of appearance within a row;
-1 marks a token in no step. A token cannot be split, so a step starts at the token that holds the first
character of the step's text. Masked tokens (padding, tool outputs) never belong to a step, and a step
never continues across a tool output: the next chosen token after a hole starts a new step.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch

MODES = ("blank_line", "numbered", "regex")

# a new step starts at the first non-whitespace character after a blank line
BLANK_LINE = re.compile(r"\n[ \t\r]*\n\s*(?=\S)")
# ... or at a numbered-step marker at a line start: "Step 3:", "step 3.", "3.", "3)", optionally after
# markdown emphasis or a heading ("**Step 3:**", "### 3."); "3.5" is not a marker
NUMBERED = re.compile(r"^[ \t]*(?P<start>(?:[#*]+[ \t]*)?(?:step[ \t]*\d+[ \t]*[:.)]|\d+[.)])(?=\s|\*|$))",
                      re.IGNORECASE | re.MULTILINE)


def _boundary_chars(text: str, token_starts: list[int], mode: str, pattern: str | None) -> set[int]:
    """Character offsets in `text` where a new step begins."""
    if mode == "blank_line":
        return {m.end() for m in BLANK_LINE.finditer(text)}
    if mode == "numbered":
        return {m.start("start") for m in NUMBERED.finditer(text)}
    if pattern is None:
        raise ValueError("segment_steps(mode='regex') needs pattern=")
    rx = re.compile(pattern)  # matched at each token start; `^` with (?m) means "at a line start"
    return {s for s in token_starts if rx.match(text, s)}


def segment_steps(token_texts: Sequence[str], response_mask: Sequence[int] | torch.Tensor, *,
                  mode: str = "blank_line", pattern: str | None = None) -> list[int]:
    """Step id of each token of one response ([T] -> [T]); -1 for masked tokens.

    mode="blank_line": a step starts after a blank line ("\\n\\n", also split across tokens, or with spaces
    between the two newlines). mode="numbered": at a numbered-step marker at a line start (`Step 3:`, `3.`,
    `3)`). mode="regex": at each token start where `pattern` matches (`re.match` at that offset of the full
    text). Text before the first boundary is step 0. Masked tokens' text still counts for line starts.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; valid: {', '.join(map(repr, MODES))}")
    mask = response_mask.tolist() if isinstance(response_mask, torch.Tensor) else list(response_mask)
    if len(mask) != len(token_texts):
        raise ValueError(f"{len(token_texts)} token texts but a response_mask of {len(mask)}")
    starts, offset = [], 0
    for piece in token_texts:
        starts.append(offset)
        offset += len(piece)
    bounds = sorted(_boundary_chars("".join(token_texts), starts, mode, pattern))
    ids, next_id, in_step, b = [], 0, False, 0
    for start, piece, chosen in zip(starts, token_texts, mask):
        end = start + len(piece)
        while b < len(bounds) and bounds[b] < start:  # boundaries inside earlier tokens are used up
            b += 1
        has_boundary = b < len(bounds) and bounds[b] < end
        if not chosen:
            ids.append(-1)
            in_step = False  # a tool output (or padding) ends the step
            continue
        if not in_step or has_boundary:
            next_id, in_step = next_id + 1, True
        ids.append(next_id - 1)
    return ids


def step_ids_for_batch(tokenizer, response_ids: torch.Tensor, response_mask: torch.Tensor,
                       **kw) -> torch.Tensor:
    """response_ids [N, T], response_mask [N, T] -> step ids [N, T] (long), decoding token by token.

    Each token is decoded alone (special tokens kept, no clean-up), which is exact for byte-level BPE and
    character tokenizers; a SentencePiece tokenizer may drop a token's leading space, which no mode reads.
    `kw` goes to `segment_steps` (mode, pattern).
    """
    rows = []
    for ids, mask in zip(response_ids.tolist(), response_mask.tolist()):
        texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                       clean_up_tokenization_spaces=False)
        rows.append(segment_steps(texts, [int(m > 0) for m in mask], **kw))
    return torch.tensor(rows, dtype=torch.long, device=response_ids.device).reshape(response_ids.shape)


def step_boundaries(step_ids: torch.Tensor) -> list[list[int]]:
    """step_ids [N, T] -> for each row, the index of the first token of each step, in order.

    The response cut just before index b is the prefix VinePPO branches from to estimate V(before step).
    """
    out = []
    for row in step_ids.tolist():
        first: dict[int, int] = {}
        for t, s in enumerate(row):
            if s >= 0 and s not in first:
                first[s] = t
        out.append(sorted(first.values()))
    return out
