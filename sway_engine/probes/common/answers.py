"""What a generation answered: the text up to its first stop string (multi_turn's turns,
adapter_revert's answers)."""

from __future__ import annotations

from collections.abc import Sequence


def answer_of(text: str, stops: Sequence[str]) -> str:
    """A generation cut at the first stop string after its first non-blank character, stripped."""
    start = len(text) - len(text.lstrip())
    end = len(text)
    for stop in stops:
        at = text.find(stop, start + 1) if stop else -1
        if at >= 0:
            end = min(end, at)
    return text[start:end].strip()
