"""Response shapes of OpenAI-compatible completion servers, parsed by shape: OpenAI legacy /
vLLM (`tokens`, `token_logprobs`, `top_logprobs`, `text_offset`), older mlx-lm (int tokens,
top dicts keyed by id), chat-style `content` lists, bare number lists and vLLM
`prompt_logprobs`; and the character span of each echoed token.

An answer is checked as it is read: any part of the wrong type, a non-finite log-prob or a
body that is not a JSON object raises `AnswerError` naming its JSON path, never a bare
TypeError or KeyError from deep inside the parse."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sway_engine.errors import BackendError
from sway_engine.requests import TokenDist

CHOICE = "choices[0]"  # the backend asks for one completion and reads only the first choice
_MISSING = object()


class AnswerError(BackendError):
    """An answer that is not the shape it should be. `where` is the JSON path of the wrong
    part (`choices[0].logprobs.token_logprobs[3]`), `problem` says what is wrong with it."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"{where} {problem}")


@dataclass(frozen=True)
class Alt:
    """One alternative at a position: decoded token text, id where the server gives it."""

    token: str
    id: int | None
    logprob: float


@dataclass(frozen=True)
class Position:
    """One token of a response (prompt or generated) with its log-prob and top alternatives;
    `top_at` is the JSON path of those alternatives, for messages about them."""

    token: str
    id: int | None
    logprob: float | None
    offset: int | None = None
    top: tuple[Alt, ...] = ()
    top_at: str = ""


# ---- the body and its first choice -----------------------------------------------------------


def parse_body(raw: bytes) -> dict[str, Any]:
    """The answer as a JSON object. NaN and Infinity are read here and refused where they sit."""
    try:
        body = json.loads(raw)
    except UnicodeDecodeError as exc:
        why = f"is not UTF-8 text ({exc.reason} at byte {exc.start})"
        raise AnswerError("the answer", why) from None
    except json.JSONDecodeError as exc:
        begins = raw[:60].decode("utf-8", "replace")
        raise AnswerError(
            "the answer", f"is not valid JSON ({exc.msg} at char {exc.pos}); it begins {begins!r}"
        ) from None
    except RecursionError:
        raise AnswerError("the answer", "is nested too deeply to be a completions answer") from None
    except ValueError as exc:  # e.g. an integer literal longer than int() accepts
        raise AnswerError("the answer", f"is not usable JSON ({str(exc)[:80]})") from None
    if not isinstance(body, dict):
        raise _expected("the answer", body, "a JSON object with `choices`")
    return body


def first_choice(body: Mapping[str, Any]) -> Mapping[str, Any]:
    """`choices[0]`; when it is missing, the server's own error message if it sent one."""
    choices = body.get("choices", _MISSING)
    if choices is _MISSING:
        said = _error_message(body)
        why = f"the server said: {said}" if said else f"the answer has keys {sorted(body)[:6]}"
        raise AnswerError("choices", f"is missing ({why})")
    if not isinstance(choices, list) or not choices:
        raise _expected("choices", choices, "a non-empty list")
    if not isinstance(choices[0], Mapping):
        raise _expected(CHOICE, choices[0], "an object")
    return choices[0]


def completion_text(choice: Mapping[str, Any]) -> str:
    """The generated text of a choice."""
    text = choice.get("text", _MISSING)
    if not isinstance(text, str):
        raise _expected(f"{CHOICE}.text", text, "a string")
    return text


def _error_message(body: Mapping[str, Any]) -> str:
    """`error.message` (or `error`) of a body, as one short line; "" when there is none."""
    err = body.get("error")
    if isinstance(err, Mapping):
        err = err.get("message", err)
    return " ".join(str(err).split())[:200] if err else ""


# ---- log-probs --------------------------------------------------------------------------------


def parse_positions(choice: Mapping[str, Any], at: str = CHOICE) -> list[Position]:
    """Every position a completion choice reports, whatever shape the server uses.

    - OpenAI legacy / vLLM: `logprobs = {tokens, token_logprobs, top_logprobs: [{tok: lp}],
      text_offset}`; vLLM's `token_id:123` tokens carry ids.
    - older mlx-lm: the same keys, but `tokens` are ids and top dicts are keyed by id.
    - chat style (mlx-lm >= 0.2x, OpenAI chat, vLLM chat): `logprobs = {content: [{token,
      id?, logprob, top_logprobs: [{token, id?, logprob}]}]}`.
    - a bare list of numbers: per-token log-probs only.
    - vLLM `prompt_logprobs` (echo of the prompt): read by `parse_prompt_logprobs`.
    """
    where = f"{at}.logprobs"
    lp = choice.get("logprobs")
    if lp is None:
        return []
    if isinstance(lp, list):
        return [Position("", None, _num(v, f"{where}[{i}]")) for i, v in enumerate(lp)]
    if not isinstance(lp, Mapping):
        raise _expected(where, lp, "an object or a list")
    content = lp.get("content")
    if isinstance(content, list):
        return [_chat_position(e, f"{where}.content[{i}]") for i, e in enumerate(content)]
    if "token_logprobs" in lp or "tokens" in lp:
        return _legacy_positions(lp, where)
    if content is not None:
        raise _expected(f"{where}.content", content, "a list")
    raise AnswerError(where, f"has none of the known keys (got {sorted(lp)[:6]})")


def require_positions(choice: Mapping[str, Any], at: str = CHOICE) -> list[Position]:
    """`parse_positions`, refusing an answer that left out the log-probs asked for."""
    positions = parse_positions(choice, at)
    if not positions:
        raise _expected(
            f"{at}.logprobs", choice.get("logprobs", _MISSING), "the log-probs asked for"
        )
    return positions


def _legacy_positions(lp: Mapping[str, Any], where: str) -> list[Position]:
    tokens = _list(lp, "tokens", where)
    values = _list(lp, "token_logprobs", where)
    tops = _list(lp, "top_logprobs", where)
    offsets = _list(lp, "text_offset", where)
    if tokens and values and len(tokens) != len(values):
        raise AnswerError(where, f"has {len(tokens)} tokens but {len(values)} token_logprobs")
    ids_are_tokens = bool(tokens) and all(_is_int(t) for t in tokens)
    out = []
    for i in range(max(len(tokens), len(values))):
        text, tid = _legacy_token(tokens, i, ids_are_tokens, where)
        logprob = _num(values[i], f"{where}.token_logprobs[{i}]") if i < len(values) else None
        top_at = f"{where}.top_logprobs[{i}]"
        alts = _alts(tops[i], top_at, ids_are_tokens) if i < len(tops) else ()
        offset = _offset(offsets, i, where)
        out.append(Position(text, tid, logprob, offset, alts, top_at))
    return out


def _legacy_token(
    tokens: list[Any], i: int, ids_are_tokens: bool, where: str
) -> tuple[str, int | None]:
    if i >= len(tokens):
        return "", None
    if ids_are_tokens:
        return "", int(tokens[i])
    if not isinstance(tokens[i], str):
        raise _expected(f"{where}.tokens[{i}]", tokens[i], "a string or a token id")
    return _token_and_id(tokens[i])


def _offset(offsets: list[Any], i: int, where: str) -> int | None:
    if i >= len(offsets) or offsets[i] is None:
        return None
    if not _is_int(offsets[i]):
        raise _expected(f"{where}.text_offset[{i}]", offsets[i], "an integer")
    return int(offsets[i])


def _alts(top: Any, where: str, keys_are_ids: bool) -> tuple[Alt, ...]:
    """The alternatives at one position: `{token: lp}` or a list of `{token, id?, logprob}`."""
    if top is None:
        return ()
    if isinstance(top, Mapping):
        return tuple(
            _keyed_alt(key, value, f"{where}[{json.dumps(key)}]", keys_are_ids)
            for key, value in top.items()
        )
    if isinstance(top, list):
        return tuple(_dict_alt(entry, f"{where}[{j}]") for j, entry in enumerate(top))
    raise _expected(where, top, "an object or a list")


def _keyed_alt(key: str, value: Any, where: str, keys_are_ids: bool) -> Alt:
    logprob = _required(value, where)
    if not keys_are_ids:
        text, tid = _token_and_id(key)
        return Alt(text, tid, logprob)
    if not _is_id_text(key):
        raise AnswerError(where, "is not a token id, yet this answer's tokens are ids")
    return Alt("", int(key), logprob)


def _chat_position(entry: Any, where: str) -> Position:
    if not isinstance(entry, Mapping):
        raise _expected(where, entry, "an object")
    text, tid = _token_of(entry, where, "token")
    top_at = f"{where}.top_logprobs"
    alts = _alts(entry.get("top_logprobs"), top_at, False)
    return Position(text, tid, _num(entry.get("logprob"), f"{where}.logprob"), None, alts, top_at)


def _dict_alt(entry: Any, where: str) -> Alt:
    if not isinstance(entry, Mapping):
        raise _expected(where, entry, "an object")
    if "logprob" not in entry:
        raise AnswerError(f"{where}.logprob", f"is missing (the entry is {_shown(entry)})")
    text, tid = _token_of(entry, where, "token", "decoded_token")
    return Alt(text, tid, _required(entry["logprob"], f"{where}.logprob"))


def _token_of(entry: Mapping[str, Any], where: str, *names: str) -> tuple[str, int | None]:
    """(text, id) of an entry: the first of `names` it has, and its `id` if given."""
    name = next((n for n in names if entry.get(n) is not None), None)
    text, tid = "", None
    if name is not None:
        if not isinstance(entry[name], str):
            raise _expected(f"{where}.{name}", entry[name], "a string")
        text, tid = _token_and_id(entry[name])
    if entry.get("id") is not None:
        if not _is_int(entry["id"]):
            raise _expected(f"{where}.id", entry["id"], "an integer")
        tid = int(entry["id"])
    return text, tid


def parse_prompt_logprobs(choice: Mapping[str, Any], at: str = CHOICE) -> list[Position] | None:
    """vLLM's `prompt_logprobs`: [None, {id: {logprob, rank, decoded_token}}, ...].

    Each dict holds the prompt token and up to n alternatives; the prompt token is the one
    named by `prompt_token_ids` when given, else the dict must hold exactly one entry. None
    when the answer has no `prompt_logprobs` or does not say which entry is the prompt token.
    """
    plp = choice.get("prompt_logprobs")
    if plp is None:
        return None
    if not isinstance(plp, list):
        raise _expected(f"{at}.prompt_logprobs", plp, "a list")
    ids = choice.get("prompt_token_ids")
    if ids is not None and not isinstance(ids, list):
        raise _expected(f"{at}.prompt_token_ids", ids, "a list of token ids")
    out = []
    for i, entry in enumerate(plp):
        want = _prompt_id(ids, i, at)
        where = f"{at}.prompt_logprobs[{i}]"
        if entry is None:
            out.append(Position("", want, None))
            continue
        if not isinstance(entry, Mapping):
            raise _expected(where, entry, "an object or null")
        if want is None and len(entry) != 1:
            return None  # cannot tell which entry is the prompt token
        out.append(_prompt_position(entry, want, where))
    return out


def _prompt_id(ids: list[Any] | None, i: int, at: str) -> int | None:
    if ids is None or i >= len(ids):
        return None
    if not _is_int(ids[i]):
        raise _expected(f"{at}.prompt_token_ids[{i}]", ids[i], "an integer")
    return int(ids[i])


def _prompt_position(entry: Mapping[str, Any], want: int | None, where: str) -> Position:
    key = str(want) if want is not None else next(iter(entry))
    here = f"{where}[{json.dumps(key)}]"
    info = entry.get(key)
    if not isinstance(info, Mapping):
        raise _expected(here, info if key in entry else _MISSING, "an object for the prompt token")
    if not _is_id_text(key):
        raise AnswerError(here, "is not a token id")
    text = info.get("decoded_token") or ""
    if not isinstance(text, str):
        raise _expected(f"{here}.decoded_token", text, "a string")
    return Position(text, int(key), _num(info.get("logprob"), f"{here}.logprob"))


# ---- values -----------------------------------------------------------------------------------


def _token_and_id(token: str) -> tuple[str, int | None]:
    """vLLM `return_tokens_as_token_ids` spells a token `token_id:123`."""
    if token.startswith("token_id:") and _is_id_text(token[9:]):
        return "", int(token[9:])
    return token, None


def _is_id_text(text: str) -> bool:
    """Digits only, ASCII: `str.isdigit` alone accepts '²', which `int` refuses."""
    return text.isascii() and text.isdigit()


def _list(lp: Mapping[str, Any], key: str, where: str) -> list[Any]:
    value = lp.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise _expected(f"{where}.{key}", value, "a list")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _num(value: Any, where: str) -> float | None:
    """A finite log-prob, or None where the server gives none (the first prompt token)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _expected(where, value, "a number")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise _expected(where, value, "a finite number")
    return number


def _required(value: Any, where: str) -> float:
    number = _num(value, where)
    if number is None:
        raise _expected(where, value, "a number")
    return number


def _expected(where: str, value: Any, what: str) -> AnswerError:
    return AnswerError(where, f"is {_shown(value)} (expected {what})")


def _shown(value: Any) -> str:
    """`value` as the JSON the server sent (NaN, -Infinity, null), cut to 60 characters."""
    if value is _MISSING:
        return "missing"
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."


# ---- derived values ---------------------------------------------------------------------------


def top_dist(position: Position, k: int, vocab_size: int = 0) -> TokenDist:
    """The top-k alternatives of one position, sorted, as a truncated distribution.

    Aligned downstream by id when every alternative has one (`tokens` left empty), else
    by decoded text (ids are then -1: unknown, never rank positions).
    """
    alts = {(a.id if a.id is not None else a.token): a for a in position.top}
    ranked = sorted(alts.values(), key=lambda a: -a.logprob)[:k]
    where = position.top_at or "top_logprobs"
    if not ranked:
        raise AnswerError(where, "has no top log-probs (expected the top-k asked for)")
    lps = np.asarray([a.logprob for a in ranked], dtype=np.float64)
    if not np.all(np.isfinite(lps)) or np.any(lps > 1e-6):
        raise AnswerError(
            where, f"holds values that are not valid log-probabilities: {lps[:4].tolist()}"
        )
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
            raise AnswerError(
                "the echoed tokens", "do not spell the text and the server gave no text_offset"
            )
    spans = [(0, 0)] * skip
    at = 0
    for p in positions[skip:]:
        spans.append((at, at + len(p.token)))
        at += len(p.token)
    return spans
