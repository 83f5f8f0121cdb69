"""Per-partition plumbing the assets share: the adapter session on the run's backend and
metadata helpers. What is stored and scored is the engine's (`sway_engine.evaluations`);
assets talk to each other through DuckDB, never through process memory.
"""

import base64
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import dagster as dg

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.resources import ModelResource
from sway_engine import __version__
from sway_engine.adapters import AdapterInfo
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.errors import SwayError
from sway_engine.probes.base import Context
from sway_engine.runner import context_for, preflight
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
    """compute(session) for every partition of the run, one adapter after another on the
    run's one loaded base, in key order. A session that could not open reaches `compute` with
    its `error` set.

    Several keys come from a single-run backfill. Their requests once ran in lockstep, every
    adapter's rows in shared batches (multi.py); on the full battery (17 views per adapter)
    that made 8 adapters cost 14.2x one, one after another 5.2x (bench/backfill.py): batches
    are already full of one adapter's nulls, and the lockstep only adds its overhead.
    """
    return [(s, compute(s)) for s in (open_session(k, backend, adapters) for k in keys)]


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
