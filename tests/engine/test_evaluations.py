"""An evaluation kept step by step (the Dagster path) on a real DuckDB: begun incomplete,
completed from its stored rows, and never completed from a partial set of rows."""

from __future__ import annotations

from pathlib import Path

import pytest

from sway_engine import evaluations
from sway_engine.errors import SwayError
from sway_engine.result import Verdict
from sway_engine.runner import evaluate
from sway_engine.store import ResultStore
from sway_engine.suite import Suite


@pytest.fixture(scope="module")
def computed(fx):  # type: ignore[no-untyped-def]
    """The fixture suite on doc-strong, computed once: (suite, result)."""
    suite = Suite.load(fx.suite)
    return suite, evaluate(suite.spec, list(suite.entries), adapter=str(fx.adapters["doc-strong"]))


def _write_steps(store: ResultStore, suite: Suite, result, dagster_run: str, names) -> str:  # type: ignore[no-untyped-def]
    run = evaluations.evaluation_id(dagster_run, "doc-strong-1")
    for r in result.probes:
        if r.name in names:
            assert evaluations.record_probe(store, dagster_run, "doc-strong-1", suite, r, "hf") == 1
    return run


def test_stored_steps_complete_into_the_suites_score(computed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    suite, result = computed
    store = ResultStore(tmp_path / "sway.duckdb")
    run_id = _write_steps(store, suite, result, "d1", {r.name for r in result.probes})
    assert store.leaderboard() == []  # incomplete: nothing shown yet
    run, passed_over = evaluations.to_complete(store, "doc-strong-1", suite)
    assert run["run_id"] == run_id and passed_over is None
    done = evaluations.complete(
        store,
        suite,
        run,
        "doc-strong-1",
        base_model="b",
        backend_kind="hf",
        backend_stats={},
        dagster_run_id="d1",
    )
    assert done.result.score.overall == pytest.approx(result.score.overall, abs=1e-9)
    assert [p.verdict for p in done.result.probes] == [p.verdict for p in result.probes]
    assert done.passed and store.leaderboard()[0]["adapter_id"] == "doc-strong-1"


def test_a_partial_evaluation_is_never_completed(computed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """One probe materialised alone makes a new evaluation holding only its row; scoring it
    would put a one-probe suite on the leaderboard. It is passed over, by name."""
    suite, result = computed
    store = ResultStore(tmp_path / "sway.duckdb")
    names = [r.name for r in result.probes]
    with pytest.raises(SwayError, match="partial"):  # nothing complete to fall back on
        _write_steps(store, suite, result, "d1", names[-1:])
        evaluations.to_complete(store, "doc-strong-1", suite)
    full = _write_steps(store, suite, result, "d2", set(names))
    run, _ = evaluations.to_complete(store, "doc-strong-1", suite)
    evaluations.complete(
        store,
        suite,
        run,
        "doc-strong-1",
        base_model="b",
        backend_kind="hf",
        backend_stats={},
        dagster_run_id="d2",
    )
    _write_steps(store, suite, result, "d3", names[-1:])  # a later partial one
    again, passed_over = evaluations.to_complete(store, "doc-strong-1", suite)
    assert again["run_id"] == full and again["status"] == "complete"
    assert passed_over is not None and names[0] in passed_over


def test_calibration_rows_say_why_there_are_no_nulls(computed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    suite, _ = computed
    store = ResultStore(tmp_path / "sway.duckdb")
    null_entry = suite.null_entry()
    assert null_entry is not None
    run = evaluations.begin(store, "d1", "k", suite, "hf")
    row, written = evaluations.record_calibration(
        store, run, "k", suite, null_entry, None, "preflight failed: nan", "d1"
    )
    assert row.verdict == Verdict.ERROR and written == 0
    assert evaluations.null_matrix_for(store, "k", suite, run).cells == ()
