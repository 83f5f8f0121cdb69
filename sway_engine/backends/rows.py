"""Request planning shared by the backends that hold a model (hf, mlx).

A request becomes rows: token sequences under one view. Each backend forwards every
distinct row once, then assembles each request's result from its rows' log-probs. The
tokenisation rules and the cut of prompts longer than the context live here, so every backend
scores and generates from exactly the same tokens.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from sway_engine.errors import BackendError
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Divergence,
    Generate,
    NextToken,
    Request,
    RollingLogprob,
    RollingResult,
    SequenceDivergence,
    SequenceDivergenceResult,
    TokenDist,
    check_prompt,
)
from sway_engine.views import View


@dataclass(frozen=True)
class Row:
    """One sequence to forward under one view (`adapter`: the backend's name for it).
    `last`: keep only the final position's distribution."""

    adapter: str
    ids: tuple[int, ...]
    last: bool


@dataclass(frozen=True)
class KLRow:
    """One sequence under two views: its value is KL(ref || adapter) at every position but the
    last (float64, one entry per next token). Computed in pairs from both views' full
    distributions, never cached, never stored."""

    ref: str
    adapter: str
    ids: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """How a request is answered: its rows, what assembling the result needs (`meta`; the
    prompt's ids for a generation), and how many prompt tokens were cut to fit the context."""

    meta: Any
    rows: list[Row | KLRow]
    cut: int = 0


def token_ids(tokenizer: Any, text: str, *, special: bool = True) -> list[int]:
    """Token ids of `text`; with special tokens, never empty (BOS, else EOS, for "")."""
    ids = list(tokenizer(text, add_special_tokens=special)["input_ids"])
    if special and not ids:
        fallback = tokenizer.bos_token_id
        ids = [fallback if fallback is not None else tokenizer.eos_token_id]
    return ids


def plan(req: Request, tokenizer: Any, max_len: int, name: Callable[[View], str]) -> Plan:
    """The rows one request needs; `name` maps a view to the backend's row name.

    ContinuationLogprob tokenises prompt and completion separately (no BPE merge across
    the boundary); RollingLogprob entry i scores token i+1, in half-overlapping windows of
    `max_len`; SequenceDivergence compares two views over the same windows (KLRow). A prompt
    that does not fit keeps its last tokens (`fit_prompt`).
    """
    if isinstance(req, RollingLogprob):
        text_ids = token_ids(tokenizer, req.text)
        spans = windows(text_ids, max_len)
        key = name(req.view)
        return Plan((text_ids, [keep for _, keep in spans]), [Row(key, w, False) for w, _ in spans])
    if isinstance(req, SequenceDivergence):
        text_ids = token_ids(tokenizer, req.text)
        spans = windows(text_ids, max_len)
        a, b = name(req.view_a), name(req.view_b)
        return Plan((text_ids, [keep for _, keep in spans]), [KLRow(a, b, w) for w, _ in spans])
    if not isinstance(req, NextToken | Divergence | ContinuationLogprob | Generate):
        raise BackendError(f"no backend plan for {type(req).__name__}")
    check_prompt(req)
    p_ids = token_ids(tokenizer, req.prompt)
    if isinstance(req, NextToken | Divergence):
        ids, cut = fit_prompt(p_ids, max_len, tokenizer.bos_token_id)
        if isinstance(req, NextToken):
            return Plan(ids, [Row(name(req.view), ids, True)], cut)
        return Plan(ids, [Row(name(req.view_a), ids, True), Row(name(req.view_b), ids, True)], cut)
    if isinstance(req, ContinuationLogprob):
        c_ids = token_ids(tokenizer, req.completion, special=False)
        if not c_ids:
            raise BackendError(f"completion {req.completion!r} tokenizes to zero tokens")
        if len(c_ids) >= max_len:
            raise BackendError(
                f"ContinuationLogprob: the completion {req.completion[:40]!r} is {len(c_ids)} "
                f"tokens, which leaves no room for the prompt in the model's {max_len}-token "
                "context; score a shorter completion"
            )
        ids, cut = fit_prompt(p_ids, max_len - len(c_ids), tokenizer.bos_token_id)
        seq = ids + tuple(c_ids)
        return Plan((seq, len(c_ids)), [Row(name(req.view), seq, False)], cut)
    if req.max_new_tokens >= max_len:
        raise BackendError(
            f"Generate: max_new_tokens={req.max_new_tokens} leaves no room for the prompt in "
            f"the model's {max_len}-token context; lower max_new_tokens"
        )
    name(req.view)  # registers the view before generation
    ids, cut = fit_prompt(p_ids, max_len - req.max_new_tokens, tokenizer.bos_token_id)
    return Plan(ids, [], cut)


def fit_prompt(ids: list[int], room: int, bos: int | None) -> tuple[tuple[int, ...], int]:
    """The prompt cut to `room` >= 1 tokens, and how many it lost: the last tokens stay, and so
    does a leading BOS (a model reads position 0 as BOS; docs/PROBES.md "Prompt length")."""
    if len(ids) <= room:
        return tuple(ids), 0
    head = ids[:1] if room > 1 and bos is not None and ids[0] == bos else []
    kept = head + ids[len(ids) - (room - len(head)) :]
    return tuple(kept), len(ids) - len(kept)


def windows(ids: list[int], max_len: int) -> list[tuple[tuple[int, ...], int]]:
    """(window, how many trailing positions it newly scores) covering a long text.

    Each later window advances by max_len // 2 and keeps at least half a window of context.
    """
    if len(ids) < 2:
        return []
    if len(ids) <= max_len:
        return [(tuple(ids), len(ids) - 1)]
    stride = max_len // 2
    out = [(tuple(ids[:max_len]), max_len - 1)]
    end = max_len
    while end < len(ids):
        new_end = min(end + stride, len(ids))
        out.append((tuple(ids[new_end - max_len : new_end]), new_end - end))
        end = new_end
    return out


def finite_or_raise(lps: np.ndarray, view: View, text: str) -> None:
    if not np.all(np.isfinite(lps)):
        raise BackendError(
            f"view {view.key} produced non-finite log-probs on {text[:40]!r}; "
            "the adapter or model is corrupt"
        )


def token_dist(tokenizer: Any, ids: np.ndarray, lps: np.ndarray, vocab_size: int) -> TokenDist:
    """A top-k distribution (ids by descending probability) with its tail mass.

    Token strings are decoded only on demand (`TokenDist.texts`): two distributions from this
    tokenizer align by id, which the `vocabulary` tag (path and size) lets consumers see.
    """
    lps = lps.astype(np.float64)
    return TokenDist(
        token_ids=ids,
        logprobs=lps,
        vocab_size=vocab_size,
        tail_mass=float(max(0.0, 1.0 - np.exp(lps).sum())),
        vocabulary=vocabulary_tag(tokenizer),
        decode=tokenizer.convert_ids_to_tokens,
    )


def vocabulary_tag(tokenizer: Any) -> str:
    """Which vocabulary ids come from: the tokenizer's path and its size."""
    try:
        size = len(tokenizer)
    except TypeError:  # mlx-lm's TokenizerWrapper forwards attributes, not len()
        size = getattr(tokenizer, "vocab_size", 0)
    return f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__}:{size}"


def logprob_result(
    req: RollingLogprob | ContinuationLogprob, meta: Any, values: Sequence[np.ndarray]
) -> RollingResult | ContinuationResult:
    """Rolling or continuation log-probs from the per-token log-probs of the plan's rows."""
    if isinstance(req, RollingLogprob):
        ids, lps = windowed(meta, values)
        finite_or_raise(lps, req.view, req.text)
        return RollingResult(token_ids=ids, logprobs=lps)
    _, n_c = meta
    lps = values[0][-n_c:]
    finite_or_raise(lps, req.view, req.prompt)
    return ContinuationResult(logprob=float(lps.sum()), num_tokens=int(n_c))


def windowed(meta: Any, values: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """A text's ids and its per-position values, each window contributing the positions it
    newly scores (`windows`)."""
    ids, keeps = meta
    parts = [v[len(v) - keep :] for v, keep in zip(values, keeps, strict=True)]
    out = np.concatenate(parts) if parts else np.zeros(0)
    return np.asarray(ids, dtype=np.int64), out


def sequence_divergence_result(
    req: SequenceDivergence, meta: Any, values: Sequence[np.ndarray]
) -> SequenceDivergenceResult:
    """Per-token KL over a whole text from its windows' KL rows."""
    ids, kl = windowed(meta, values)
    if not np.all(np.isfinite(kl)):
        raise BackendError(
            f"views {req.view_a.key} and {req.view_b.key} gave a non-finite divergence on "
            f"{req.text[:40]!r}; the adapter or model is corrupt"
        )
    return SequenceDivergenceResult(token_ids=ids, kl=kl.astype(np.float64))


class RowCache:
    """LRU of last-position log-prob rows by (view name, token ids), bounded in bytes.

    Only `last` rows are cached: they are what repeats across probes (the same prompt under
    the base view). `nbytes` gives a value's size (a torch tensor or a numpy array).
    """

    def __init__(self, capacity_bytes: int, nbytes: Callable[[Any], int]) -> None:
        self.capacity = capacity_bytes
        self._nbytes = nbytes
        self._items: OrderedDict[tuple[str, tuple[int, ...]], Any] = OrderedDict()
        self._used = 0

    def fill(self, rows: dict[Any, Any]) -> tuple[list[Row], int]:
        """Fill cached rows in place; return the `Row`s still to forward and the hit count."""
        todo: list[Row] = []
        hits = 0
        for row in rows:
            if not isinstance(row, Row) or rows[row] is not None:
                continue  # a KLRow (computed in pairs, never cached), or a row already read
            key = (row.adapter, row.ids)
            hit = self._items.get(key) if row.last else None
            if hit is None:
                todo.append(row)
                continue
            rows[row] = hit
            self._items.move_to_end(key)
            hits += 1
        return todo, hits

    def put(self, row: Row, value: Any) -> None:
        size = self._nbytes(value)
        if not row.last or size > self.capacity:
            return
        self._items[(row.adapter, row.ids)] = value
        self._used += size
        while self._used > self.capacity:
            _, old = self._items.popitem(last=False)
            self._used -= self._nbytes(old)

    def clear(self) -> None:
        self._items.clear()
        self._used = 0


def collect(
    requests: Sequence[Request], plan_of: Callable[[Request], Plan]
) -> tuple[dict[Row | KLRow, Any], list[Plan]]:
    """Every request's plan, and the distinct rows they need (values filled in later)."""
    rows: dict[Row | KLRow, Any] = {}
    plans = [plan_of(req) for req in requests]
    for p in plans:
        for row in p.rows:
            rows.setdefault(row, None)
    return rows, plans


def generation_prompts(
    requests: Sequence[Request], plans: list[Plan]
) -> dict[Generate, tuple[int, ...]]:
    """The prompt ids (already fitted to the context) of every generation request."""
    return {
        req: p.meta for req, p in zip(requests, plans, strict=True) if isinstance(req, Generate)
    }


def answer(
    requests: Sequence[Request],
    plans: list[Plan],
    rows: dict[Row | KLRow, Any],
    generated: dict[Generate, Any],
    assemble: Callable[[Request, Plan, dict[Row | KLRow, Any]], Any],
) -> list[Any]:
    """Results in request order: generations as generated, the rest assembled from rows.
    A result whose prompt was cut says by how many tokens (`prompt_cut`)."""
    out = []
    for req, p in zip(requests, plans, strict=True):
        res = generated[req] if isinstance(req, Generate) else assemble(req, p, rows)
        out.append(replace(res, prompt_cut=p.cut) if p.cut else res)
    return out
