"""`sway doctor check SPEC`: the backend checks itself on the suite's model and prompts.

- batch invariance: each request scored alone equals it scored in batches of 8, and in one
  batch mixing every view (adapter, nulls, scaled copies), within BATCH_BOUND;
- determinism: the same batch scored twice is bit-exact;
- cache integrity: a row served from the backend's cache equals the row recomputed;
- stored results: the persistent scoring cache's results for these requests (where it holds
  any) equal the results recomputed, within BATCH_BOUND (they were computed in other batches),
  and every recomputed result survives the cache's encoding bit for bit;
- cross-backend: where the suite runs on hf and mlx is installed, mlx scores the same
  requests within CROSS_BOUND;
- calibration (`--calibration`): the audit of `sway doctor calibration` on fewer draws; a
  probe fails when its false-claim rate on random adapters is above FALSE_RATE_BOUND with 95%
  confidence (the interval's lower end exceeds it).

Scores compared are per-token log-probs (rolling) and next-token top-k log-probs. Measured on
the fixture doc-strong (fp32, CPU, 32 requests over 4 views): batch composition moves a log-p
by at most 2.9e-6, determinism and the cache are exact, hf and mlx differ by 1.1e-5; the
bounds leave room for other CPUs and BLAS builds.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from sway_engine import score_cache
from sway_engine.backends.base import Backend
from sway_engine.requests import (
    NextToken,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
    TokenDist,
)
from sway_engine.views import BASE, FINETUNED, Null, Scaled, View

BATCH_BOUND = 1e-4  # max |Δ log p| between batch compositions (nats)
CROSS_BOUND = 1e-3  # max |Δ log p| between backends (nats)
FALSE_RATE_BOUND = 0.01  # false claims on random adapters (the audit's lower 95% bound)
TOP_K = 8


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    # The largest |Δ log p| seen (nats; 0 when bit-exact), or a calibration check's false rate.
    measured: float
    bound: float
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def requests_for(prompts: Sequence[str], views: Sequence[View]) -> list[Request]:
    """Rolling and next-token requests of every prompt under every view."""
    out: list[Request] = []
    for view in views:
        for prompt in prompts:
            out += [RollingLogprob(prompt, view), NextToken(prompt, view, TOP_K)]
    return out


def scores(results: Sequence[Result]) -> list[np.ndarray]:
    """The log-probs each result carries, comparable across runs and backends."""
    out = []
    for r in results:
        if isinstance(r, RollingResult | TokenDist):
            out.append(np.asarray(r.logprobs, dtype=np.float64))
        else:
            raise TypeError(f"doctor compares log-probs, got {type(r).__name__}")
    return out


def largest_gap(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    """Max |a - b| over all results (inf when their shapes differ: different tokens)."""
    gap = 0.0
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return float("inf")
        if x.size:
            gap = max(gap, float(np.max(np.abs(x - y))))
    return gap


def _forget(backend: Backend) -> None:
    forget = getattr(backend, "forget_rows", None)
    if callable(forget):
        forget()


def check(
    backend: Backend,
    prompts: Sequence[str],
    *,
    views: Sequence[View] | None = None,
    other: Callable[[], Backend] | None = None,
    store: score_cache.ScoreCache | None = None,
) -> list[Check]:
    """Run every check on `backend` (a loaded adapter); `other` builds a second backend of the
    same model for the cross-backend check; `store`: the persistent cache to audit."""
    views = list(views or [BASE, FINETUNED, Null(1), Scaled(0.5)])
    reqs = requests_for(prompts, views)
    _forget(backend)
    alone = [s for req in reqs for s in scores(backend.execute([req]))]
    _forget(backend)
    eights = [s for i in range(0, len(reqs), 8) for s in scores(backend.execute(reqs[i : i + 8]))]
    _forget(backend)
    mixed = scores(backend.execute(reqs))
    batch_gap = max(largest_gap(alone, eights), largest_gap(alone, mixed))
    out = [
        Check(
            "batch invariance",
            batch_gap <= BATCH_BOUND,
            batch_gap,
            BATCH_BOUND,
            f"{len(reqs)} requests over {len(views)} views: alone, in 8s, all in one batch",
        )
    ]
    _forget(backend)
    again = scores(backend.execute(reqs))
    rerun_gap = largest_gap(mixed, again)
    out.append(Check("determinism", rerun_gap == 0.0, rerun_gap, 0.0, "one batch scored twice"))
    cached = scores(backend.execute(reqs))  # next-token rows come from the backend's cache
    _forget(backend)
    fresh = scores(backend.execute(reqs))
    cache_gap = largest_gap(cached, fresh)
    out.append(
        Check(
            "cache integrity",
            cache_gap == 0.0,
            cache_gap,
            0.0,
            "rows served from the cache against the same rows recomputed",
        )
    )
    if store is not None and store.usable:
        stored = stored_check(backend, store, reqs, fresh)
        if stored is not None:
            out.append(stored)
    if other is not None:
        second = other()
        try:
            theirs = scores(second.execute(reqs))
        finally:
            second.close()
        cross = largest_gap(fresh, theirs)
        out.append(
            Check(
                f"{getattr(backend, 'kind', '?')} vs {getattr(second, 'kind', '?')}",
                cross <= CROSS_BOUND,
                cross,
                CROSS_BOUND,
                "the same requests on the other backend",
            )
        )
    return out


def stored_check(
    backend: Backend,
    store: score_cache.ScoreCache,
    reqs: Sequence[Request],
    fresh: Sequence[np.ndarray],
) -> Check | None:
    """The persistent cache's results for `reqs` against `fresh` (the same requests just
    recomputed), and every recomputed result through encode/decode (None: the backend does not
    take part in the persistent cache)."""
    provider = getattr(backend, "cache_identity", None)
    identity = provider(store) if callable(provider) else None
    if identity is None:
        return None
    recomputed = backend.execute(list(reqs))
    trip = [score_cache.decode(score_cache.encode(r) or b"", identity.decode) for r in recomputed]
    trip_gap = largest_gap(scores(recomputed), scores(trip))
    keys = [score_cache.request_key(identity, r) for r in reqs]
    found = store.get(k for k in keys if k is not None)
    pairs = [
        (fresh[i], scores([score_cache.decode(found[k], identity.decode)])[0])
        for i, k in enumerate(keys)
        if k is not None and k in found
    ]
    gap = largest_gap([a for a, _ in pairs], [b for _, b in pairs]) if pairs else 0.0
    return Check(
        "stored results",
        trip_gap == 0.0 and gap <= BATCH_BOUND,
        max(gap, trip_gap),
        BATCH_BOUND,
        f"{len(pairs)} of {len(reqs)} requests found in {store.path} against the same "
        f"recomputed; {len(reqs)} results through the cache's encoding "
        + ("bit for bit" if trip_gap == 0.0 else f"off by {trip_gap:.3g}"),
    )


def calibration_checks(rows: Sequence[Any]) -> list[Check]:
    """One check per audited probe (`audit.ProbeAudit` rows)."""
    out = []
    for r in rows:
        lo, hi = r.interval
        claim = "FAIL" if r.claim == "harm" else "PASS"
        out.append(
            Check(
                f"calibration {r.probe}",
                lo <= FALSE_RATE_BOUND,
                r.rate,
                FALSE_RATE_BOUND,
                f"{r.false}/{r.draws} random adapters got a false {claim} "
                f"(95% CI {lo:.1%} to {hi:.1%})",
            )
        )
    return out


def run(
    spec_path: str,
    adapter: str | None = None,
    prompts: int = 8,
    cache_dir: Any = None,
    calibration_draws: int = 0,
) -> list[Check]:
    """The checks on the suite's fine-tuned model (or `adapter`) with up to `prompts` of the
    prompts the suite names; hf against mlx where mlx is installed; and the calibration audit
    on `calibration_draws` random adapters when that is not 0."""
    import importlib.util

    from sway_engine.backends.build import build_backend
    from sway_engine.errors import SwayError
    from sway_engine.mine import suite_prompts
    from sway_engine.suite import load_spec

    spec, entries = load_spec(spec_path)
    model = spec.models.ft
    if adapter is not None:
        model = model.model_copy(update={"adapter": adapter})
    texts = suite_prompts(spec, entries)[:prompts]
    if not texts:
        raise SwayError(f"{spec_path} names no prompts and no document: nothing to score")
    other = None
    if model.kind == "hf" and importlib.util.find_spec("mlx_lm") is not None:
        mlx = model.model_copy(update={"kind": "mlx"})
        other = lambda: build_backend(mlx)  # noqa: E731
    store = None  # the doctor audits a cache that exists, and creates none
    if score_cache.default_path(cache_dir).exists():
        store = score_cache.ScoreCache.open_default(cache_dir)
    backend = build_backend(model)
    try:
        checks = check(backend, texts, other=other, store=store)
        if calibration_draws:
            from sway_engine.audit import audit
            from sway_engine.backends.instrumentation import Instrumented

            rows = audit(spec, entries, Instrumented(backend), draws=calibration_draws)
            checks += calibration_checks(rows)
        return checks
    finally:
        backend.close()
        if store is not None:
            store.close()
