"""Request cache, counters and JSONL trace in front of any backend.

Identical requests are computed once per run: a request is a frozen value and its own key.
A request with an empty prompt is refused here, whatever the backend. `Embed` requests are
answered here by the embedding model (sway_engine.embeddings), never by the model backend, so
probes that need sentence vectors stay requests-in, numbers-out on every backend.

With a persistent `ScoreCache` (score_cache.py), a request missing from this run's cache is
looked up by content before the backend computes it, and what the backend computes is stored;
backends that can name their model by content (`cache_identity`: hf, mlx) take part.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sway_engine import score_cache
from sway_engine.backends.base import Backend
from sway_engine.requests import (
    Embed,
    EmbeddingResult,
    Request,
    Result,
    check_prompt,
    views_of,
)
from sway_engine.views import View

log = logging.getLogger(__name__)
Embedder = Callable[[Sequence[str]], np.ndarray]
# Backend counters whose change during one execute goes into the trace.
TRACED = (
    "rows_forwarded",
    "forward_passes",
    "tokens_forwarded",
    "row_cache_hits",
    "stored_rows",
    "http_requests",
    "generate_row_steps",
    "generated_tokens",
)


def default_embedder(texts: Sequence[str]) -> np.ndarray:
    """The process-wide sentence embedder (loaded on first use; raises EmbeddingsUnavailable
    with an install hint where the model is missing)."""
    from sway_engine import embeddings

    return embeddings.embed(texts)


class Instrumented:
    """Wraps a backend: caches results by request, counts work, optionally traces to JSONL."""

    def __init__(
        self,
        inner: Backend,
        *,
        trace_path: Path | None = None,
        embedder: Embedder = default_embedder,
        store: score_cache.ScoreCache | None = None,
    ) -> None:
        self.inner = inner
        self._store = store if store is not None and store.usable else None
        self._identity: score_cache.Identity | None = None
        self._identity_known = False
        self._embedder_id: str | None = None
        self._embedder = embedder
        self.kind = inner.kind
        self.capabilities = inner.capabilities
        self._cache: dict[Request, Result] = {}
        self._trace = trace_path
        self.label = ""
        self.stats: dict[str, float] = {
            "requests": 0,
            "cache_hits": 0,
            "executes": 0,
            "embedded_texts": 0,
            "stored_hits": 0,
            "wall_s": 0.0,
        }

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        start = time.perf_counter()
        for req in requests:
            check_prompt(req)
        misses = list(dict.fromkeys(r for r in requests if r not in self._cache))
        tracing = self._trace is not None
        hits = [r for r in requests if r in self._cache] if tracing else []
        before = self._inner_counters() if tracing else {}
        stored_before = self.stats["stored_hits"]
        model: list[Request] = [r for r in misses if not isinstance(r, Embed)]
        keys = self._keys(model)
        if keys:
            model = self._from_store(model, keys)
        if model:
            computed = self.inner.execute(model)
            for req, res in zip(model, computed, strict=True):
                self._cache[req] = res
            self.stats["executes"] += 1
            if keys:
                self._to_store(model, computed, keys)
        for req in misses:
            if isinstance(req, Embed):
                self._cache[req] = self._embed(req)
        wall = time.perf_counter() - start
        self.stats["requests"] += len(requests)
        self.stats["cache_hits"] += len(requests) - len(misses)
        self.stats["wall_s"] += wall
        if tracing:
            after = self._inner_counters()
            work = {k: after[k] - before.get(k, 0) for k in TRACED if k in after}
            stored = int(self.stats["stored_hits"] - stored_before)
            self._write_trace(len(requests), wall, misses, hits, work, stored)
        return [self._cache[r] for r in requests]

    # ---- the persistent cache ----

    def _embed(self, req: Embed) -> Result:
        """Sentence vectors: from the persistent cache where the default embedding model's
        were stored, else computed (and stored)."""
        key = self._embed_key(req)
        if key is not None:
            assert self._store is not None
            blob = self._store.get([key]).get(key)
            if blob is not None:
                try:
                    found = score_cache.decode(blob, None)
                    self.stats["stored_hits"] += 1
                    return found
                except (ValueError, KeyError, TypeError) as exc:
                    log.warning("a stored result could not be read (%s); recomputing it", exc)
        result = EmbeddingResult(self._embedder(list(req.texts)))
        self.stats["embedded_texts"] += len(req.texts)
        if key is not None:
            assert self._store is not None
            self._store.put({key: score_cache.encode(result) or b""})
        return result

    def _embed_key(self, req: Embed) -> bytes | None:
        """The key of an Embed request: only the default embedder's vectors are stored (an
        injected embedder has no identity)."""
        if self._store is None or self._embedder is not default_embedder:
            return None
        if self._embedder_id is None:
            from sway_engine import embeddings
            from sway_engine.errors import SwayError

            try:
                self._embedder_id = embeddings.identity(self._store.file_sha256)
            except (SwayError, ImportError, OSError):
                self._embedder_id = ""  # unavailable: the embedder itself says why
        return score_cache.embed_key(self._embedder_id, req) if self._embedder_id else None

    def remember(
        self, parts: Sequence[str], views: Sequence[View], compute: Callable[[], bytes]
    ) -> bytes:
        """`compute()`, kept in the persistent cache under `parts` and the identities of
        `views` on this backend's model: what is derived from requests that are never stored
        (a weight probe's measurements from `AdapterWeights`), so an unchanged adapter needs
        neither the weights nor the model. Computed every time without a persistent cache or
        where a view cannot be named."""
        identity = self._identity_now()
        key = None if identity is None else score_cache.derived_key(identity, parts, views)
        if key is not None:
            assert self._store is not None
            blob = self._store.get([key]).get(key)
            if blob is not None:
                self.stats["stored_hits"] += 1
                return blob
        blob = compute()
        if key is not None:
            assert self._store is not None
            self._store.put({key: blob})
        return blob

    def _identity_now(self) -> score_cache.Identity | None:
        """The backend's identity for the persistent cache (asked once; None: not stored)."""
        if self._store is None:
            return None
        if not self._identity_known:
            provider = getattr(self.inner, "cache_identity", None)
            self._identity = provider(self._store) if callable(provider) else None
            self._identity_known = True
            share = getattr(self.inner, "share_base_rows", None)
            if self._identity is not None and callable(share):
                share(self._store, self._identity.backend)
        return self._identity

    def _keys(self, requests: Sequence[Request]) -> dict[Request, bytes]:
        """Content keys of the requests that can be stored (none without a persistent cache
        or where the backend cannot name its model by content)."""
        if not requests or self._identity_now() is None:
            return {}
        assert self._identity is not None
        keys = {}
        for req in requests:
            key = score_cache.request_key(self._identity, req)
            if key is not None:
                keys[req] = key
        return keys

    def _from_store(self, requests: list[Request], keys: dict[Request, bytes]) -> list[Request]:
        """Fill this run's cache from the persistent one; return the requests still to compute."""
        assert self._store is not None and self._identity is not None
        found = self._store.get(keys.values())
        todo = []
        for req in requests:
            blob = found.get(keys[req]) if req in keys else None
            if blob is not None:
                try:
                    self._cache[req] = score_cache.decode(blob, self._identity.decode)
                    self.stats["stored_hits"] += 1
                    continue
                except (ValueError, KeyError, TypeError) as exc:
                    self._store.stats["corrupt"] += 1
                    log.warning("a stored result could not be read (%s); recomputing it", exc)
            todo.append(req)
        return todo

    def _to_store(
        self, requests: Sequence[Request], results: Sequence[Result], keys: dict[Request, bytes]
    ) -> None:
        assert self._store is not None
        items = {}
        for req, res in zip(requests, results, strict=True):
            if req in keys:
                blob = score_cache.encode(res)
                if blob is not None:
                    items[keys[req]] = blob
        self._store.put(items)

    @property
    def adapter_path(self) -> str | None:
        """The trained adapter's directory where the inner backend knows it."""
        info = getattr(self.inner, "adapter", None)
        path = getattr(info, "path", None)
        return str(path) if path is not None else None

    def reset(self) -> None:
        """Forget cached results (the trained adapter changed)."""
        self._cache.clear()

    def counters(self) -> dict[str, float]:
        inner = getattr(self.inner, "counters", None)
        return {**self.stats, **(inner() if callable(inner) else {})}

    def close(self) -> None:
        self.inner.close()
        if self._store is not None:
            self._store.close()

    def _inner_counters(self) -> dict[str, float]:
        inner = getattr(self.inner, "counters", None)
        return dict(inner()) if callable(inner) else {}

    def _write_trace(
        self,
        n: int,
        wall: float,
        misses: list[Request],
        hits: list[Request],
        work: dict[str, float],
        stored: int = 0,
    ) -> None:
        """One JSONL event per execute: the probe, requests computed and served from the cache
        (in all, by operation and by view; `stored`: how many of the computed came from the
        persistent cache), wall time and the backend's work (rows forwarded,
        passes, tokens: counter deltas). `sway trace FILE` summarises a file of them."""
        assert self._trace is not None
        self._trace.parent.mkdir(parents=True, exist_ok=True)
        ops: dict[str, int] = {}
        for r in misses:
            ops[type(r).__name__] = ops.get(type(r).__name__, 0) + 1
        views: dict[str, dict[str, int]] = {}
        for reqs, field in ((misses, "computed"), (hits, "hits")):
            for r in reqs:
                for key in {v.key for v in views_of(r)} or {"(embedding)"}:
                    slot = views.setdefault(key, {"computed": 0, "hits": 0})
                    slot[field] += 1
        event: dict[str, Any] = {
            "ts": time.time(),
            "probe": self.label,
            "requests": n,
            "computed": len(misses),
            "stored": stored,
            "wall_ms": round(1000 * wall, 3),
            "ops": ops,
            "views": views,
            "backend": work,
        }
        with self._trace.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(event) + "\n")


def session(
    inner: Backend, *, trace_path: Path | None = None, cache_dir: Path | None = None
) -> Instrumented:
    """A run's front on `inner`: with the persistent cache `ScoreCache.open_default` gives
    (in `cache_dir`, a home's `cache/`, unless the environment says otherwise or turns it off)."""
    store = score_cache.ScoreCache.open_default(cache_dir)
    return Instrumented(inner, trace_path=trace_path, store=store)
