"""One history for every path: a CLI evaluation is recorded into the sway home's DuckDB store
and MLflow exactly as a Dagster run records it (same adapter key, same rows, same MLflow
experiment and params), apart from its origin.

`mlflow_params` is the one definition of an evaluation's MLflow params, and `registered_model`
of the registered model a passing adapter joins, for both paths.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sway_engine.adapters import partition_key, read_adapter
from sway_engine.calibration import NullCell
from sway_engine.diff import compare_probes
from sway_engine.errors import SwayError
from sway_engine.home import Settings
from sway_engine.mirror import Mirror, Published
from sway_engine.result import SuiteResult
from sway_engine.store import AdapterRecord, ResultStore, RunRecord
from sway_engine.suite import Suite
from sway_engine.tracking import MlflowTracking


def experiment_for(spec_path: str | Path) -> str:
    """The MLflow experiment of a suite file: `sway-<file stem>` (Dagster's too)."""
    return f"sway-{Path(spec_path).stem}"


def mlflow_params(suite: Suite, adapter: Mapping[str, Any]) -> dict[str, str | int | float]:
    """An evaluation's MLflow params: the adapter's shape and the suite that judged it."""
    plan = suite.plan()
    return {
        "base_model": str(adapter.get("base_model") or suite.spec.models.ft.base),
        "rank": int(adapter.get("rank") or 0),
        "alpha": float(adapter.get("alpha") or 0.0),
        "target_modules": json.dumps(list(adapter.get("target_modules") or [])),
        "spec_hash": suite.spec_hash,
        "null_mode": plan.mode if plan is not None else "none",
    }


def registered_model(suite: Suite) -> str | None:
    """The registered model a gate-passing adapter of this suite becomes a version of
    (`defaults.mlflow.model_name`, else the suite's experiment), or None unless it registers."""
    options = suite.spec.defaults.mlflow
    if not options.register_adapters:
        return None
    return options.model_name or experiment_for(suite.source)


def record_cli_run(
    settings: Settings,
    suite: Suite,
    result: SuiteResult,
    gate_passed: bool,
    warn: Callable[[str], None] = lambda _message: None,
) -> tuple[str, str, Published]:
    """Record a finished CLI evaluation: (adapter key, run id, what became of the MLflow copy).
    The adapter must be a local directory (its weights name the key)."""
    if not result.adapter or not Path(result.adapter).is_dir():
        raise SwayError(
            f"cannot record this evaluation in {settings.database}: its adapter "
            f"{result.adapter or '(none)'} is not a local directory (the key is its weights hash)"
        )
    info = read_adapter(result.adapter, check_finite=False)
    key = partition_key(info.path.name, info.sha256)
    store = ResultStore(settings.database)
    record = AdapterRecord.checked(key, info)
    store.record_adapter(record)
    run_id = f"cli:{uuid.uuid4().hex[:12]}:{key}"
    store.begin_run(RunRecord(run_id=run_id, adapter_id=key, spec_hash=result.spec_hash))
    store.write_null_cells(run_id, key, result.spec_hash, null_cells(suite, result))
    store.write_suite(key, result, gate_passed, run_id, origin="cli")
    tracking = MlflowTracking(
        settings.mlflow_uri,
        experiment_for(suite.source),
        artifact_root=settings.mlflow_artifacts,
        ui_url=settings.mlflow_ui,
    )
    params = mlflow_params(suite, record.__dict__)
    published = Mirror(tracking, store, warn).publish(
        run_id, params, register=registered_model(suite)
    )
    return key, run_id, published


def null_cells(suite: Suite, result: SuiteResult) -> list[NullCell]:
    """The null samples each calibrated probe was judged against, as the store's cells (one
    per null seed, as Dagster's null_calibration writes them). A probe whose samples do not
    match the plan's seeds one to one (a NaN draw was left out) has none written."""
    plan = suite.plan()
    if plan is None:
        return []
    cells = []
    for r in result.probes:
        samples = r.null.samples if r.null is not None else ()
        if samples and len(samples) == len(plan.seeds):
            cells += [
                NullCell(r.name, r.kind, seed, 1.0, raw)
                for seed, raw in zip(plan.seeds, samples, strict=True)
            ]
    return cells


def lineage(store: ResultStore, adapter: str, *, prefix: bool = False) -> list[dict[str, Any]]:
    """Every run of an adapter, oldest first (`ResultStore.lineage`)."""
    return store.lineage(adapter, prefix=prefix)


def spending(row: Mapping[str, Any]) -> str:
    """A lineage row's forgetting_budget spending as `1.92 [1.84, 2.00]` ("" without one)."""
    raw, lo, hi = row.get("nats_per_token"), row.get("nats_ci_lo"), row.get("nats_ci_hi")
    if raw is None:
        return ""
    interval = "" if lo is None or hi is None else f" [{lo:.4g}, {hi:.4g}]"
    return f"{raw:.4g}{interval}"


def latest_run_of(store: ResultStore, adapter: str) -> dict[str, Any]:
    """The newest complete run of an adapter key, directory name or run id."""
    runs = [r for r in lineage(store, adapter) if r["status"] == "complete"]
    if not runs:
        runs = [r for r in store.runs() if r["run_id"] == adapter and r["status"] == "complete"]
    if not runs:
        raise SwayError(f"no complete evaluation of {adapter!r} in {store.path}")
    return runs[-1]


def compare(store: ResultStore, a: str, b: str) -> list[dict[str, Any]]:
    """`diff.compare_probes` of the latest complete evaluations of `a` and `b`, which must be
    of one suite (numbers of different suites are not comparable)."""
    run_a, run_b = latest_run_of(store, a), latest_run_of(store, b)
    if run_a["spec_hash"] != run_b["spec_hash"]:
        raise SwayError(
            f"{a} was evaluated with suite {run_a['spec_hash']} and {b} with "
            f"{run_b['spec_hash']}: results of different suites are not comparable"
        )
    return compare_probes(
        store.suite_of(run_a["run_id"]).probes, store.suite_of(run_b["run_id"]).probes
    )
