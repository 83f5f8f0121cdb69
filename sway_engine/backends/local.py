"""What the two backends that hold a model in this process share (hf and mlx).

A local backend loads one base model and answers requests from rows: `rows.plan` turns each
request into token rows under a view's name, rows are deduplicated, packed into batches and
forwarded, and results are assembled from the rows' log-probs (numpy, float32 or float64).
Subclasses say how to load adapters, register views and run one forward pass or one
generation; the bookkeeping (counters, labels of extra adapters, the row cache, batching,
exact divergences, close) is here once.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from sway_engine import stats
from sway_engine.adapters import CONFIG, AdapterInfo, file_sha256
from sway_engine.backends.base import ALL_CAPABILITIES
from sway_engine.backends.rows import (
    KLRow,
    Plan,
    Row,
    RowCache,
    answer,
    collect,
    finite_or_raise,
    generation_prompts,
    logprob_result,
    sequence_divergence_result,
    token_dist,
)
from sway_engine.backends.rows import plan as plan_rows
from sway_engine.errors import BackendError
from sway_engine.requests import (
    AdapterWeights,
    AdapterWeightsResult,
    ContinuationLogprob,
    Divergence,
    DivergenceResult,
    Generate,
    GenerationResult,
    ModuleWeights,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    SequenceDivergence,
    views_of,
)
from sway_engine.score_cache import (
    Identity,
    ScoreCache,
    decode_row,
    encode_row,
    row_key,
    view_identity,
)
from sway_engine.views import Base, Finetuned, Null, Scaled, View, canonical

Derived = Finetuned | Scaled | Null  # a view on a trained adapter

COUNTERS = (
    "forward_passes",
    "rows_forwarded",
    "tokens_forwarded",
    "padded_tokens",
    "row_cache_hits",
    "base_loads",
    "adapters_loaded",
    "views_registered",
    "stored_rows",
)


class LocalBackend:
    """One base model in this process; the trained adapter, its nulls and scaled copies as views.

    Subclasses implement `_load_primary`, `_load_extra`, `_registered`, `_register_views`,
    `_name_of`, `_forward`, `_generate_all` and `_release`, and may override `_row_groups`
    (which rows forward together) and `_scope` (a device context around execution).
    """

    kind: str
    capabilities = ALL_CAPABILITIES
    BASE_ROW: ClassVar[str]  # the name base rows are computed under

    tokenizer: Any
    max_len: int
    base_id: str

    def _setup(
        self,
        *,
        batch_tokens: int,
        max_batch_rows: int,
        row_cache_bytes: int,
        extra_counters: Sequence[str] = (),
    ) -> None:
        self.batch_tokens = batch_tokens
        self.max_batch_rows = max_batch_rows
        # Close a batch where one more row adds more padding than this many tokens (the cost
        # of one more forward pass); None: no limit (right padding, see the mlx backend).
        self.pad_tokens_per_pass: int | None = None
        self.adapter: AdapterInfo | None = None
        self.extra_adapters: dict[str, AdapterInfo] = {}
        self._row_cache = RowCache(row_cache_bytes, lambda v: int(v.nbytes))
        # The persistent cache's base rows (`share_base_rows`): every adapter of this base
        # reuses them across runs.
        self._base_rows: tuple[ScoreCache, str] | None = None
        self._counters: dict[str, float] = dict.fromkeys((*COUNTERS, *extra_counters), 0)
        self._counters["base_loads"] = 1

    # ---- adapters and views ----

    def load_adapter(self, path: str) -> None:
        """Swap the trained adapter in place: every adapter registered before (the primary
        and those from `add_adapter`) and every derived view is dropped."""
        self.adapter = self._load_primary(str(path))
        self.extra_adapters = {}
        self._row_cache.clear()
        self._counters["adapters_loaded"] += 1

    def add_adapter(self, path: Any, label: str) -> str:
        """Register another trained adapter of this base beside the primary one.

        Views with `adapter=label` (`Finetuned(label)`, `Scaled(lam, label)`, `Null(...,
        adapter=label)`) then derive from it, and their rows share batches (and base rows)
        with every other adapter's. `load_adapter` drops all of them.
        """
        if not label:
            raise BackendError("add_adapter needs a non-empty label; '' names the primary adapter")
        if self.adapter is None:
            raise BackendError("load the primary adapter (load_adapter) before adding others")
        if label in self.extra_adapters:
            raise BackendError(f"an adapter labelled {label!r} is already registered")
        self.extra_adapters[label] = self._load_extra(str(path), label)
        self._counters["adapters_loaded"] += 1
        return label

    def _ensure_views(self, views: Iterable[View]) -> None:
        """Register every view not on the model yet, in one pass."""
        todo: list[Derived] = list(
            dict.fromkeys(
                v
                for v in map(canonical, views)
                if not isinstance(v, Base) and not self._registered(v.key)
            )
        )
        if not todo:
            return
        if self.adapter is None:
            raise BackendError(f"view {todo[0].key} needs a trained adapter; none is loaded")
        hint = f"{type(self).__name__}.add_adapter registers one"
        for view in todo:
            if isinstance(view, Finetuned):
                raise BackendError(
                    f"no trained adapter labelled {view.adapter!r} is registered ({hint})"
                )
            if not self._registered(Finetuned(view.adapter).key):
                raise BackendError(
                    f"view {view.key} derives from adapter {view.adapter!r}, which is not "
                    f"registered ({hint})"
                )
        self._register_views(todo)
        self._counters["views_registered"] += len(todo)

    def _row_name(self, view: View) -> str:
        """The name rows of `view` are computed under (registering the view on first use)."""
        view = canonical(view)
        if isinstance(view, Base):
            return self.BASE_ROW
        if not self._registered(view.key):
            self._ensure_views([view])
        return self._name_of(view.key)

    # ---- execution ----

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        if any(isinstance(req, AdapterWeights) for req in requests):
            return self._with_weights(requests)
        self._ensure_views(v for req in requests for v in views_of(req))
        rows, plans = collect(requests, self._plan)
        with self._scope():
            self._forward_all(rows)
            gens = self._generate_all(generation_prompts(requests, plans))
        return answer(requests, plans, rows, gens, self._assemble)

    def _with_weights(self, requests: Sequence[Request]) -> list[Result]:
        """AdapterWeights requests are read from the loaded weights (no row, no forward pass,
        no counter); the other requests are answered as usual."""
        others = [req for req in requests if not isinstance(req, AdapterWeights)]
        answered = iter(self.execute(others) if others else [])
        return [
            self._adapter_weights(req.view) if isinstance(req, AdapterWeights) else next(answered)
            for req in requests
        ]

    def _adapter_weights(self, view: View) -> AdapterWeightsResult:
        view = canonical(view)
        if isinstance(view, Base):
            raise BackendError(
                "AdapterWeights needs a view of a trained adapter; the base has none"
            )
        self._ensure_views([view])
        return AdapterWeightsResult(tuple(sorted(self._module_weights(view), key=lambda m: m.name)))

    def _plan(self, req: Request) -> Plan:
        return plan_rows(req, self.tokenizer, self.max_len, self._row_name)

    def _scope(self) -> Any:
        return nullcontext()

    def _forward_all(self, rows: dict[Row | KLRow, Any]) -> None:
        kl_rows = [r for r in rows if isinstance(r, KLRow)]
        if kl_rows:
            self._forward_kl(kl_rows, rows)
        todo, hits = self._row_cache.fill(rows)
        self._counters["row_cache_hits"] += hits
        if self._base_rows is not None:
            todo = self._stored_base_rows(todo, rows)
        computed: list[Row] = []
        for last, group in self._row_groups(todo):
            for batch in self._batches(group):
                batch.sort(key=lambda r: r.adapter)  # one contiguous block of rows per view
                for row, value in zip(batch, self._forward(batch, last), strict=True):
                    rows[row] = value
                    computed.append(row)
                    if last:
                        self._row_cache.put(row, value)
        if self._base_rows is not None:
            store, backend = self._base_rows
            store.put(
                {
                    row_key(backend, row): encode_row(rows[row])
                    for row in computed
                    if row.adapter == self.BASE_ROW
                }
            )

    def share_base_rows(self, store: ScoreCache, backend: str) -> None:
        """Keep base rows in the persistent cache under this backend's identity `backend`: a new
        adapter of an already-scored base forwards none of them."""
        self._base_rows = (store, backend)

    def _stored_base_rows(self, todo: list[Row], rows: dict[Row | KLRow, Any]) -> list[Row]:
        """Fill base rows from the persistent cache; return the rows still to forward."""
        assert self._base_rows is not None
        store, backend = self._base_rows
        keys = {row: row_key(backend, row) for row in todo if row.adapter == self.BASE_ROW}
        found = store.get(keys.values())
        left = []
        for row in todo:
            blob = found.get(keys[row]) if row in keys else None
            value = decode_row(blob) if blob is not None else None
            if value is None:
                left.append(row)
                continue
            rows[row] = value
            self._counters["stored_rows"] += 1
            if row.last:
                self._row_cache.put(row, value)
        return left

    def _forward_kl(self, pairs: list[KLRow], rows: dict[Row | KLRow, Any]) -> None:
        """Fill each KL row: KL(ref || adapter) per position, from both views' log-softmax
        over the whole vocabulary (never leaving the backend). Every distinct (view, window)
        is forwarded once, so a base shared by many treatments is computed once, and a
        whole-sequence row of the same view and window asked for too (a perplexity over the
        same corpus) is read from those distributions, not forwarded again; a reference's
        distributions are held only until the pairs that need them are done. Two views
        computed under one name (base vs base, a zero adapter) give exactly 0."""
        todo: list[KLRow] = []
        for pair in pairs:
            if pair.ref == pair.adapter:
                rows[pair] = np.zeros(max(0, len(pair.ids) - 1))
            else:
                todo.append(pair)
        if not todo:
            return
        by_ids: dict[tuple[int, ...], list[KLRow]] = {}
        for pair in todo:
            by_ids.setdefault(pair.ids, []).append(pair)
        waiting = Counter(Row(p.ref, p.ids, False) for p in todo)
        held: dict[Row, Any] = {}
        for run in self._kl_runs(by_ids):
            for batch in self._batches(run):
                batch.sort(key=lambda r: r.adapter)  # one contiguous block of rows per view
                fresh = dict(zip(batch, self._forward_dists(batch), strict=True))
                held.update((row, d) for row, d in fresh.items() if row in waiting)
                for row, d in fresh.items():  # the same window's log-probs, asked for too
                    if row in rows and rows[row] is None:
                        rows[row] = self._next_logprobs(d, row.ids)
                for ids in dict.fromkeys(row.ids for row in batch):
                    for pair in by_ids[ids]:
                        ref, ft = Row(pair.ref, ids, False), Row(pair.adapter, ids, False)
                        a = held.get(ref)
                        b = fresh.get(ft, held.get(ft))
                        if rows[pair] is not None or a is None or b is None:
                            continue
                        rows[pair] = self._token_kl(a, b)
                        waiting[ref] -= 1
                        if not waiting[ref]:
                            del held[ref]

    def _kl_runs(self, by_ids: dict[tuple[int, ...], list[KLRow]]) -> Iterator[list[Row]]:
        """The plain rows KL rows need, in forwarding order (`_batches` packs each run): window
        by window, shortest first, each window's references before its other views."""
        order: list[Row] = []
        for ids in sorted(by_ids, key=len):
            refs = dict.fromkeys(p.ref for p in by_ids[ids])
            views = refs | dict.fromkeys(p.adapter for p in by_ids[ids])
            order += [Row(name, ids, False) for name in views]
        yield order

    def _row_groups(self, rows: list[Row]) -> Iterator[tuple[bool, list[Row]]]:
        """Rows that may share batches, each group sorted by length: last-position rows, then
        whole-sequence rows, every view mixed (the forward pass applies each row's view)."""
        for last in (True, False):
            yield last, sorted((r for r in rows if r.last == last), key=lambda r: len(r.ids))

    def _batches(self, rows: list[Row]) -> list[list[Row]]:
        """Pack rows (sorted by length) into batches within the token and row budgets, and
        the padding budget `pad_tokens_per_pass` where one is set."""
        pad_budget = self.pad_tokens_per_pass
        batches: list[list[Row]] = []
        current: list[Row] = []
        for row in rows:
            width = len(row.ids)
            if current and (
                (len(current) + 1) * width > self.batch_tokens
                or len(current) >= self.max_batch_rows
                or (
                    pad_budget is not None
                    and (width - len(current[-1].ids)) * len(current) > pad_budget
                )
            ):
                batches.append(current)
                current = []
            current.append(row)
        if current:
            batches.append(current)
        return batches

    def _count_pass(self, batch: Sequence[Row]) -> None:
        width = max(len(r.ids) for r in batch)
        self._counters["forward_passes"] += 1
        self._counters["rows_forwarded"] += len(batch)
        self._counters["tokens_forwarded"] += sum(len(r.ids) for r in batch)
        self._counters["padded_tokens"] += width * len(batch)

    def _assemble(self, req: Request, plan: Plan, rows: dict[Row | KLRow, Any]) -> Result:
        values = [rows[r] for r in plan.rows]
        if isinstance(req, NextToken):
            logp = values[0]
            finite_or_raise(logp, req.view, req.prompt)
            ids = top_ids(logp, req.top_k)
            return token_dist(self.tokenizer, ids, logp[ids], int(logp.shape[-1]))
        if isinstance(req, Divergence):
            finite_or_raise(values[0], req.view_a, req.prompt)
            finite_or_raise(values[1], req.view_b, req.prompt)
            la, lb = values[0].astype(np.float64), values[1].astype(np.float64)
            return DivergenceResult(
                js=stats.js(la, lb),
                kl_b_a=stats.kl(lb, la),
                kl_a_b=stats.kl(la, lb),
                exact=True,
                top_a=self._decode_top(la, req.evidence_k),
                top_b=self._decode_top(lb, req.evidence_k),
            )
        if isinstance(req, RollingLogprob | ContinuationLogprob):
            return logprob_result(req, plan.meta, values)
        if isinstance(req, SequenceDivergence):
            return sequence_divergence_result(req, plan.meta, values)
        raise BackendError(f"{self.kind} backend cannot answer {type(req).__name__}")

    def _decode_top(self, logp: np.ndarray, k: int) -> tuple[tuple[str, float], ...]:
        ids = top_ids(logp, k)
        toks = self.tokenizer.convert_ids_to_tokens(ids.tolist())
        return tuple((t, math.exp(float(logp[i]))) for t, i in zip(toks, ids.tolist(), strict=True))

    def counters(self) -> dict[str, float]:
        return dict(self._counters)

    # ---- the persistent scoring cache (score_cache.py) ----

    def cache_identity(self, cache: ScoreCache) -> Identity | None:
        """What this backend computes with, for the persistent cache: kind, library versions,
        dtype, device, context length and the base model's content (its files' hashes, or the
        hub revision). None where the base cannot be named by content (its results are then
        computed every run)."""
        base = local_base(self.base_id, cache)
        if base is None:
            revision = self._hub_revision()
            if revision is None:
                return None
            base = f"hub:{self.base_id}@{revision}"
        return Identity(
            backend=backend_digest(self.kind, self._numerics(), self._named_max_len(), base),
            view=self._view_identity,
            decode=self.tokenizer.convert_ids_to_tokens,
        )

    def _named_max_len(self) -> int:
        """The context length in the cache's name of this backend (`max_len`, the limit rows
        are cut to; `HFBackend` names a local base's as its config.json gives it)."""
        return self.max_len

    def _view_identity(self, view: View) -> str | None:
        return named_view(view, self.adapter, self.extra_adapters)

    def _numerics(self) -> str:
        """Library versions, dtype and device: what the numbers depend on besides weights."""
        raise NotImplementedError

    def _hub_revision(self) -> str | None:
        """The base's hub commit where it was loaded from the hub (None: unknown)."""
        return None

    def forget_rows(self) -> None:
        """Drop the cached rows, so the next execute computes everything (`sway doctor`)."""
        self._row_cache.clear()

    def close(self) -> None:
        self._row_cache.clear()
        self._release()

    # ---- what a subclass provides ----

    def _load_primary(self, path: str) -> AdapterInfo:
        raise NotImplementedError

    def _load_extra(self, path: str, label: str) -> AdapterInfo:
        raise NotImplementedError

    def _registered(self, key: str) -> bool:
        raise NotImplementedError

    def _register_views(self, views: list[Derived]) -> None:
        raise NotImplementedError

    def _name_of(self, key: str) -> str:
        raise NotImplementedError

    def _forward(self, batch: list[Row], last: bool) -> list[np.ndarray]:
        raise NotImplementedError

    def _forward_dists(self, batch: list[Row]) -> list[Any]:
        """Per row, the fp32-or-wider log-softmax over the vocabulary at every position but
        the last ([len(ids) - 1, vocab]), in the backend's own array type."""
        raise NotImplementedError

    def _token_kl(self, logp_a: Any, logp_b: Any) -> np.ndarray:
        """KL(a || b) at each position of two `_forward_dists` values, float64 numpy."""
        raise NotImplementedError

    def _next_logprobs(self, dists: Any, ids: tuple[int, ...]) -> np.ndarray:
        """A `_forward_dists` value's log-prob of each next token (float64): the value a
        whole-sequence `Row` of the same view and ids has."""
        raise NotImplementedError

    def _generate_all(
        self, prompts: dict[Generate, tuple[int, ...]]
    ) -> dict[Generate, GenerationResult]:
        raise NotImplementedError

    def _module_weights(self, view: Derived) -> list[ModuleWeights]:
        """Per module `view` adapts: the base weight (float32, (out, in), read-only and shared
        between calls) and the factors the model uses for `view`."""
        raise NotImplementedError

    def _release(self) -> None:
        raise NotImplementedError


def local_base(base_id: str, cache: ScoreCache) -> str | None:
    """A base model in a local folder, named by its files' content (None: not a folder)."""
    local = Path(base_id).expanduser()
    return f"files:{cache.directory_digest(local)}" if local.is_dir() else None


def backend_digest(kind: str, numerics: str, max_len: int, base: str) -> str:
    """The persistent cache's name of a backend: what its numbers depend on, hashed."""
    return hashlib.sha256(f"{kind}|{numerics}|max_len={max_len}|{base}".encode()).hexdigest()


def named_view(
    view: View, primary: AdapterInfo | None, extras: dict[str, AdapterInfo]
) -> str | None:
    """A view named by content: the trained adapter it derives from (the primary, or the one
    registered under its label) by `adapter_identity`."""
    label = getattr(view, "adapter", None)
    info = primary if label == "" else extras.get(label or "")
    return view_identity(view, None if info is None else adapter_identity(info))


@functools.cache
def _config_sha(path: Path, size: int, mtime_ns: int) -> str:
    return file_sha256(path)


def adapter_identity(info: AdapterInfo) -> str:
    """A trained adapter by content: its weights' sha256 and its config file's."""
    cfg = Path(info.path) / CONFIG
    try:
        st = cfg.stat()
        config = _config_sha(cfg, st.st_size, st.st_mtime_ns)
    except OSError:
        config = "?"
    return f"{info.sha256}:{config}"


def top_ids(logp: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries, descending (ties: lower id first)."""
    k = min(k, logp.shape[-1])
    part = np.argpartition(-logp, k - 1)[:k] if k < logp.shape[-1] else np.arange(logp.size)
    return part[np.lexsort((part, -logp[part]))].astype(np.int64)


def cut_at_eos(ids: list[int], eos: Iterable[int]) -> list[int]:
    """A generated row up to and including its first end-of-sequence token."""
    stops = set(eos)
    for i, tok in enumerate(ids):
        if tok in stops:
            return ids[: i + 1]
    return ids
