"""An evaluation kept in the store step by step (the Dagster path): begun as an incomplete
run, its null cells and probe rows written as each step finishes, then scored from the stored
rows and completed in one transaction. Rows of an incomplete run are never shown, so a run
that dies never shows half a suite. The CLI writes a whole evaluation at once
(`history.record_cli_run`); both end in the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sway_engine import __version__
from sway_engine.calibration import NullMatrix
from sway_engine.errors import SwayError
from sway_engine.probes.registry import Entry
from sway_engine.result import ProbeResult, SuiteResult
from sway_engine.runner import error_results, gate, null_result, score_stored
from sway_engine.store import INCOMPLETE, ResultStore, RunRecord, run_record
from sway_engine.suite import Suite


def evaluation_id(dagster_run_id: str, key: str) -> str:
    """The store's run id of one adapter's evaluation inside one Dagster run (a ranged run
    evaluates several adapters, each its own store run)."""
    return f"{dagster_run_id}:{key}"


def _incomplete(dagster_run_id: str, key: str, suite: Suite, kind: str) -> RunRecord:
    return RunRecord(
        run_id=evaluation_id(dagster_run_id, key),
        adapter_id=key,
        spec_hash=suite.spec_hash,
        engine_version=__version__,
        dagster_run_id=dagster_run_id,
        backend_kind=kind,
        origin="dagster",
        status=INCOMPLETE,
    )


def begin(store: ResultStore, dagster_run_id: str, key: str, suite: Suite, kind: str) -> str:
    """Register this evaluation as an incomplete run (once); return its id."""
    record = _incomplete(dagster_run_id, key, suite, kind)
    store.begin_run(record)
    return record.run_id


def null_matrix_for(store: ResultStore, key: str, suite: Suite, run_id: str) -> NullMatrix | None:
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


def record_calibration(
    store: ResultStore,
    run_id: str,
    key: str,
    suite: Suite,
    null_entry: Entry,
    matrix: NullMatrix | None,
    error: str | None,
    dagster_run_id: str,
) -> tuple[ProbeResult, int]:
    """Write the null calibration of this evaluation: its cells and the null_adapter entry's
    row (ERROR when the adapter could not open, SKIP when the backend has no null views).
    Returns that row and the number of cells written."""
    if error is not None:
        (row,) = error_results([null_entry], error)
        written = 0
    elif matrix is None:
        row, written = null_result(null_entry, None, 0.0), 0
    else:
        written = store.write_null_cells(run_id, key, suite.spec_hash, matrix.cells)
        row = null_result(null_entry, matrix, 0.0)
    store.write_probe_results(run_id, key, suite.spec_hash, [row], dagster_run_id)
    return row, written


def record_probe(
    store: ResultStore,
    dagster_run_id: str,
    key: str,
    suite: Suite,
    result: ProbeResult,
    kind: str,
) -> int:
    """Write one probe's row of this evaluation, registering the evaluation (once) in the
    same transaction; return rows written."""
    record = _incomplete(dagster_run_id, key, suite, kind)
    return store.write_probe_results(
        record.run_id, key, suite.spec_hash, [result], dagster_run_id, begin=record
    )


def to_complete(store: ResultStore, key: str, suite: Suite) -> tuple[dict[str, Any], str | None]:
    """The evaluation to score: the adapter's newest incomplete run under this suite if it
    holds a row of every entry, else its newest complete one (scored again: the same rows,
    the same score). A partial evaluation (one probe materialised alone) is never completed;
    the second value says why it was passed over. Raises when there is nothing to score."""
    wanted = {e.spec.name for e in suite.entries}
    passed_over = None
    newest = store.latest_run(key, suite.spec_hash, status="incomplete")
    if newest is not None:
        have = {r["probe"] for r in store.probe_results(run_id=newest["run_id"])}
        missing = sorted(wanted - have)
        if not missing:
            return dict(newest), None
        if have:
            passed_over = (
                f"evaluation {newest['run_id']} is partial (no row of {', '.join(missing[:5])}"
                f"{' ...' if len(missing) > 5 else ''}): not scored; materialize every probe "
                "of the suite to evaluate the adapter again"
            )
    done = store.latest_run(key, suite.spec_hash, status="complete")
    if done is not None:
        return dict(done), passed_over
    raise SwayError(
        passed_over or f"no evaluation of {key} under this suite: materialize its probes first"
    )


@dataclass(frozen=True)
class Completed:
    result: SuiteResult
    passed: bool
    why: str


def complete(
    store: ResultStore,
    suite: Suite,
    run: dict[str, Any],
    key: str,
    *,
    base_model: str,
    backend_kind: str,
    backend_stats: dict[str, float],
    dagster_run_id: str,
) -> Completed:
    """Score the evaluation from its stored rows (declaration order, Benjamini-Hochberg,
    score), judge the gate, and complete the run: final rows, score and run row in one
    transaction."""
    weights = {e.spec.name: e.spec.weight for e in suite.entries}
    result = score_stored(
        suite,
        store.results_of(run["run_id"], weights),
        adapter=key,
        base_model=base_model,
        backend_kind=run.get("backend_kind") or backend_kind,
        backend_stats=backend_stats,
    )
    passed, why = gate(suite.spec, result)
    record = run_record(
        run["run_id"],
        key,
        result,
        dagster_run_id=run.get("dagster_run_id") or dagster_run_id,
        origin="dagster",
    )
    store.complete_run(record, result, passed)
    return Completed(result, passed, why)
