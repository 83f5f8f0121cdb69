"""Response shapes of OpenAI-compatible completion servers, parsed by shape: OpenAI legacy /
vLLM (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), older mlx-lm (int tokens,
top dicts keyed by id), chat-style `content` lists, bare number lists and vLLM
`prompt_logprobs`; and the character span of each echoed token."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sway_engine.requests import TokenDist


@dataclass(frozen=True)
class Alt:
    """One alternative at a position: decoded token text, id where the server gives it."""

    token: str
    id: int | None
    logprob: float


@dataclass(frozen=True)
class Position:
    """One token of a response (prompt or generated) with its log-prob and top alternatives."""

    token: str
    id: int | None
    logprob: float | None
    offset: int | None = None
    top: tuple[Alt, ...] = ()


def parse_positions(choice: Mapping[str, Any]) -> list[Position]:
    """Every position a completion choice reports, whatever shape the server uses.

    - OpenAI legacy / vLLM: `logprobs = {tokens, token_logprobs, top_logprobs: [{tok: lp}],
      text_offset}`; vLLM's `token_id:123` tokens carry ids.
    - older mlx-lm: the same keys, but `tokens` are ids and top dicts are keyed by id.
    - chat style (mlx-lm >= 0.2x, OpenAI chat, vLLM chat): `logprobs = {content: [{token,
      id?, logprob, top_logprobs: [{token, id?, logprob}]}]}`.
    - a bare list of numbers: per-token log-probs only.
    - vLLM `prompt_logprobs` (echo of the prompt): read by `parse_prompt_logprobs`.
    """
    lp = choice.get("logprobs")
    if lp is None:
        return []
    if isinstance(lp, list):
        return [Position("", None, _num(v)) for v in lp]
    if not isinstance(lp, Mapping):
        raise ValueError(f"`logprobs` is a {type(lp).__name__}, not an object or list")
    if isinstance(lp.get("content"), list):
        return [_chat_position(entry) for entry in lp["content"]]
    if "token_logprobs" in lp or "tokens" in lp:
        return _legacy_positions(lp)
    raise ValueError(f"`logprobs` has none of the known keys (got {sorted(lp)[:6]})")


def _legacy_positions(lp: Mapping[str, Any]) -> list[Position]:
    tokens = list(lp.get("tokens") or [])
    values = list(lp.get("token_logprobs") or [])
    tops = list(lp.get("top_logprobs") or [])
    offsets = list(lp.get("text_offset") or [])
    n = max(len(tokens), len(values))
    if tokens and values and len(tokens) != len(values):
        raise ValueError(f"{len(tokens)} tokens but {len(values)} token_logprobs")
    ids_are_tokens = bool(tokens) and all(isinstance(t, int) for t in tokens)
    out = []
    for i in range(n):
        raw = tokens[i] if i < len(tokens) else ""
        text, tid = ("", int(raw)) if ids_are_tokens else _token_and_id(str(raw))
        top = tops[i] if i < len(tops) else None
        alts: tuple[Alt, ...] = ()
        if isinstance(top, Mapping):
            alts = tuple(_legacy_alt(k, v, ids_are_tokens) for k, v in top.items())
        elif isinstance(top, list):
            alts = tuple(_dict_alt(a) for a in top)
        offset = offsets[i] if i < len(offsets) and isinstance(offsets[i], int) else None
        out.append(Position(text, tid, _num(values[i]) if i < len(values) else None, offset, alts))
    return out


def _legacy_alt(key: str, value: Any, keys_are_ids: bool) -> Alt:
    if keys_are_ids:
        return Alt("", int(key), _required(value))
    text, tid = _token_and_id(str(key))
    return Alt(text, tid, _required(value))


def _chat_position(entry: Any) -> Position:
    if not isinstance(entry, Mapping):
        raise ValueError(f"a `content` entry is a {type(entry).__name__}, not an object")
    tops = entry.get("top_logprobs") or []
    if isinstance(tops, Mapping):
        alts = tuple(_legacy_alt(k, v, False) for k, v in tops.items())
    else:
        alts = tuple(_dict_alt(a) for a in tops)
    text, tid = _token_and_id(str(entry.get("token", "")))
    if entry.get("id") is not None:
        tid = int(entry["id"])
    return Position(text, tid, _num(entry.get("logprob")), None, alts)


def _dict_alt(entry: Any) -> Alt:
    if not isinstance(entry, Mapping) or "logprob" not in entry:
        raise ValueError(f"a top_logprobs entry has no logprob: {str(entry)[:80]}")
    text, tid = _token_and_id(str(entry.get("token", entry.get("decoded_token", ""))))
    if entry.get("id") is not None:
        tid = int(entry["id"])
    return Alt(text, tid, _required(entry["logprob"]))


def parse_prompt_logprobs(choice: Mapping[str, Any]) -> list[Position] | None:
    """vLLM's `prompt_logprobs`: [None, {id: {logprob, rank, decoded_token}}, ...].

    Each dict holds the prompt token and up to n alternatives; the prompt token is the one
    named by `prompt_token_ids` when given, else the dict must hold exactly one entry.
    """
    plp = choice.get("prompt_logprobs")
    if not isinstance(plp, list):
        return None
    ids = choice.get("prompt_token_ids")
    out = []
    for i, entry in enumerate(plp):
        want = int(ids[i]) if isinstance(ids, list) and i < len(ids) else None
        if entry is None:
            out.append(Position("", want, None))
            continue
        if not isinstance(entry, Mapping):
            raise ValueError(f"prompt_logprobs[{i}] is not an object")
        if want is None and len(entry) != 1:
            return None  # cannot tell which entry is the prompt token
        key = str(want) if want is not None else next(iter(entry))
        info = entry.get(key)
        if not isinstance(info, Mapping):
            raise ValueError(f"prompt_logprobs[{i}] lacks the prompt token {key}")
        text = str(info.get("decoded_token") or "")
        out.append(Position(text, int(key), _num(info.get("logprob"))))
    return out


def _token_and_id(token: str) -> tuple[str, int | None]:
    """vLLM `return_tokens_as_token_ids` spells a token `token_id:123`."""
    if token.startswith("token_id:") and token[9:].isdigit():
        return "", int(token[9:])
    return token, None


def _num(value: Any) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    return float(value)


def _required(value: Any) -> float:
    number = _num(value)
    if number is None:
        raise ValueError(f"log-prob {value!r} is not a number")
    return number


def top_dist(position: Position, k: int, vocab_size: int = 0) -> TokenDist:
    """The top-k alternatives of one position, sorted, as a truncated distribution.

    Aligned downstream by id when every alternative has one (`tokens` left empty), else
    by decoded text (ids are then -1: unknown, never rank positions).
    """
    alts = {(a.id if a.id is not None else a.token): a for a in position.top}
    ranked = sorted(alts.values(), key=lambda a: -a.logprob)[:k]
    if not ranked:
        raise ValueError("the response has no top log-probs at this position")
    lps = np.asarray([a.logprob for a in ranked], dtype=np.float64)
    if not np.all(np.isfinite(lps)) or np.any(lps > 1e-6):
        raise ValueError(f"top log-probs are not valid log-probabilities: {lps[:4].tolist()}")
    by_id = all(a.id is not None for a in ranked)
    ids = np.asarray([a.id if by_id else -1 for a in ranked], dtype=np.int64)
    return TokenDist(
        token_ids=ids,
        logprobs=lps,
        vocab_size=vocab_size,
        tail_mass=float(min(1.0, max(0.0, 1.0 - np.exp(lps).sum()))),
        tokens=() if by_id else tuple(a.token for a in ranked),
    )


def char_spans(positions: Sequence[Position], text: str) -> list[tuple[int, int]]:
    """(start, end) character span of each position inside `text`.

    From the server's `text_offset` when given, else by walking the decoded tokens; a
    leading token that is not part of the text (a BOS like `<s>`) is zero-width.
    """
    if positions and all(p.offset is not None for p in positions):
        starts = [int(p.offset or 0) for p in positions]
        ends = [*starts[1:], len(text)]
        return [(s, max(s, e)) for s, e in zip(starts, ends, strict=True)]
    joined = "".join(p.token for p in positions)
    skip = 0
    if joined != text:
        if positions and "".join(p.token for p in positions[1:]) == text:
            skip = 1
        else:
            raise ValueError(
                "the echoed tokens do not spell the text and the server gave no text_offset"
            )
    spans = [(0, 0)] * skip
    at = 0
    for p in positions[skip:]:
        spans.append((at, at + len(p.token)))
        at += len(p.token)
    return spans
