"""Per-partition plumbing the assets share: the suite, the adapter session, the null matrix,
the MLflow run. Assets talk to each other through DuckDB, never through process memory.
"""

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import dagster as dg

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.resources import ModelResource
from sway_engine import __version__
from sway_engine.adapters import AdapterInfo
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import NullMatrix
from sway_engine.errors import SwayError
from sway_engine.multi import each_adapter
from sway_engine.probes.base import Context
from sway_engine.runner import context_for, preflight
from sway_engine.store import ResultStore as DuckStore
from sway_engine.store import RunRecord
from sway_engine.suite import Suite

T = TypeVar("T")


@dataclass
class Session:
    """An adapter partition opened on the run's backend, or the reason it could not be."""

    key: str
    info: AdapterInfo | None
    backend: Instrumented | None
    error: str | None

    def context(self, suite: Suite) -> Context:
        assert self.backend is not None
        return context_for(suite.spec, self.backend)


def per_adapter(
    keys: Sequence[str],
    backend: ModelResource,
    adapters: AdapterStoreResource,
    compute: Callable[[Session], T],
) -> list[tuple[Session, T]]:
    """compute(session) for every partition of the run, in key order.

    One key (the usual sensor run) takes `open_session`. Several keys (a multi-partition run
    from a single-run backfill) register every verified adapter on the one loaded base and run
    `compute` for each in its own thread, their requests in shared batches (multi.py); a
    backend that holds one adapter at a time runs them one after another. A session that
    could not open reaches `compute` with its `error` set. An exception in `compute` is
    raised here once every adapter is done; nothing is written from a compute thread, so the
    caller writes results in this thread.
    """
    if len(keys) == 1 or not backend.holds_many():
        return [(s, compute(s)) for s in (open_session(k, backend, adapters) for k in keys)]
    sessions = [_verified(key, adapters) for key in keys]
    ok = [i for i, s in enumerate(sessions) if s.info is not None]
    out: dict[int, tuple[Session, T]] = {}
    if ok:
        paths = [str(sessions[i].info.path) for i in ok]  # type: ignore[union-attr]
        shared, registration = backend.many(paths)
        live = [i for i, label in zip(ok, registration.labels, strict=True) if label is not None]
        for i, error in zip(ok, registration.errors, strict=True):
            if error is not None:
                sessions[i] = replace(sessions[i], error=error)

        def one(slot: int, session: Instrumented) -> tuple[Session, T]:
            opened = sessions[live[slot]]
            try:
                preflight(session)
            except SwayError as exc:
                opened = replace(opened, error=f"preflight failed: {exc}")
                return opened, compute(opened)
            opened = replace(opened, backend=session)
            return opened, compute(opened)

        labels = [registration.labels[ok.index(i)] or "" for i in live]
        done = each_adapter(shared, labels, [paths[ok.index(i)] for i in live], one)
        failures = [r for r in done if isinstance(r, BaseException)]
        if failures:
            raise failures[0]
        out.update({i: r for i, r in zip(live, done, strict=True)})  # type: ignore[misc]
    for i, session in enumerate(sessions):
        if i not in out:
            out[i] = (session, compute(session))
    return [out[i] for i in range(len(keys))]


def _verified(key: str, adapters: AdapterStoreResource) -> Session:
    try:
        return Session(key, adapters.verify(key, check_finite=False), None, None)
    except SwayError as exc:
        return Session(key, None, None, str(exc))


def open_session(key: str, backend: ModelResource, adapters: AdapterStoreResource) -> Session:
    """Verify the partition's weights and load them onto the (already loaded) base.

    Only the hash is checked here: the tensors' finiteness is checked once, by the manifest
    and by the backend when it loads the adapter, not again in every asset.
    """
    verified = _verified(key, adapters)
    if verified.info is None:
        return verified
    info = verified.info
    try:
        session = backend.session(str(info.path))
        preflight(session)
    except SwayError as exc:
        return Session(key, info, None, f"preflight failed: {exc}")
    return Session(key, info, session, None)


def evaluation_id(dagster_run_id: str, key: str) -> str:
    """The store's run id of one adapter's evaluation inside one Dagster run (a ranged run
    evaluates several adapters, each its own store run)."""
    return f"{dagster_run_id}:{key}"


def ensure_run(store: DuckStore, dagster_run_id: str, key: str, suite: Suite, kind: str) -> str:
    """Register this evaluation as an incomplete run (once); return its id. Its rows stay
    invisible until sway_score completes it, so a run that dies never shows half a suite."""
    run_id = evaluation_id(dagster_run_id, key)
    store.begin_run(
        RunRecord(
            run_id=run_id,
            adapter_id=key,
            spec_hash=suite.spec_hash,
            engine_version=__version__,
            dagster_run_id=dagster_run_id,
            backend_kind=kind,
            origin="dagster",
        )
    )
    return run_id


def null_matrix_for(store: DuckStore, key: str, suite: Suite, run_id: str) -> NullMatrix | None:
    """The null samples of this evaluation, else of the adapter's latest run that has them
    (null draws are seeded: a probe re-materialised alone reuses them). None without a
    null_adapter entry."""
    plan = suite.plan()
    if plan is None:
        return None
    matrix = store.null_matrix(run_id, plan)
    if matrix.cells:
        return matrix
    for run in store.runs():
        if run["adapter_id"] == key and run["spec_hash"] == suite.spec_hash:
            earlier = store.null_matrix(run["run_id"], plan)
            if earlier.cells:
                return earlier
    return matrix


def adapter_tags(key: str, info: AdapterInfo | None) -> dict[str, str]:
    """Tags of the adapter's MLflow run beside its adapter id and Dagster run."""
    tags = {"dagster.partition": key, "sway.engine_version": __version__}
    if info is not None:
        tags["sway.adapter_sha"] = info.sha256
    return tags


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def num(value: float | None) -> float:
    """Metadata floats: Dagster's UI plots them, so NaN stands for 'none'."""
    return float("nan") if value is None else float(value)
