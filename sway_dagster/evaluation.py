"""Per-partition plumbing the assets share: the suite, the adapter session, the null matrix,
the MLflow run. Assets talk to each other through DuckDB, never through process memory.
"""

import base64
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import AssetExecutionContext

from sway_dagster.adapter_store import AdapterStore
from sway_dagster.resources import MlflowTracker, ModelBackend
from sway_engine import __version__
from sway_engine.adapters import AdapterInfo
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import NullCell, NullMatrix, NullPlan, plan_for
from sway_engine.errors import SwayError
from sway_engine.probes.base import Context
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry
from sway_engine.runner import context_for, document_of, null_entry, preflight
from sway_engine.spec import SuiteSpec, load_spec
from sway_engine.store import ResultStore as DuckStore


@dataclass(frozen=True)
class Suite:
    """The sway.yaml this code location evaluates every adapter with."""

    path: Path
    spec: SuiteSpec
    entries: tuple[Entry, ...]

    @classmethod
    def load(cls, path: Path) -> "Suite":
        spec, entries = load_spec(path)
        document_of(spec)  # fail at load with the document's path and line, not mid-run
        return cls(path=path, spec=spec, entries=tuple(entries))

    @property
    def spec_hash(self) -> str:
        return self.spec.spec_hash()

    def plan(self) -> NullPlan | None:
        entry = null_entry(list(self.entries))
        if entry is None:
            return None
        assert isinstance(entry.spec, NullAdapterSpec)
        return plan_for(entry.spec, self.spec.defaults.null)

    def weight(self, probe: str) -> float:
        return next((e.spec.weight for e in self.entries if e.spec.name == probe), 1.0)


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


def open_session(key: str, backend: ModelBackend, adapters: AdapterStore) -> Session:
    """Verify the partition's weights and load them onto the (already loaded) base.

    Only the hash is checked here: the tensors' finiteness is checked once, by the manifest
    and by the backend when it loads the adapter, not again in every asset.
    """
    try:
        info = adapters.verify(key, check_finite=False)
    except SwayError as exc:
        return Session(key, None, None, str(exc))
    try:
        session = backend.session(str(info.path))
        preflight(session)
    except SwayError as exc:
        return Session(key, info, None, f"preflight failed: {exc}")
    return Session(key, info, session, None)


def matrix_from_store(store: DuckStore, key: str, suite: Suite) -> NullMatrix | None:
    plan = suite.plan()
    if plan is None:
        return None
    rows = [r for r in store.null_calibration(key) if r["spec_hash"] == suite.spec_hash]
    cells = tuple(
        NullCell(r["probe"], r["kind"], int(r["seed"]), float(r["rank_scale"]), float(r["raw"]))
        for r in rows
        if r["raw"] is not None
    )
    return NullMatrix(plan=plan, cells=cells)


def mlflow_run(
    tracker: MlflowTracker, context: AssetExecutionContext, info: AdapterInfo | None
) -> tuple[Any, str]:
    """The MLflow run of this (adapter, Dagster run), created once, found again on retry."""
    tracking = tracker.tracking()
    key = context.partition_key
    tags = {"dagster.partition": key, "sway.engine_version": __version__}
    if info is not None:
        tags["sway.adapter_sha"] = info.sha256
    return tracking, tracking.run_for(key, context.run.run_id, tags)


def png_markdown(png: bytes, alt: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})")


def num(value: float | None) -> float:
    """Metadata floats: Dagster's UI plots them, so NaN stands for 'none'."""
    return float("nan") if value is None else float(value)
