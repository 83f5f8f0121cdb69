"""Results from many machines: completed runs exported as Parquet, imported once by one writer
(sway_engine/store/exports.py, `sway results export|import`). Real DuckDB files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sway_engine.cli import main
from sway_engine.store import AdapterRecord, ResultStore, RunRecord, StoreError
from sway_engine.store.exports import MANIFEST, export_run, import_runs
from tests.engine.test_store import _suite_abc


def _worker_store(path: Path, adapter: str, run_id: str, overall: float) -> ResultStore:
    store = ResultStore(path)
    store.record_adapter(
        AdapterRecord(adapter, adapter, "/a/" + adapter, "f" * 64, 10, "tiny", 4, 8.0, ("q",), True)
    )
    store.write_suite(adapter, _suite_abc(overall), True, run_id, dagster_run_id="d-" + run_id)
    return store


def _counts(store: ResultStore) -> dict[str, int]:
    return store.row_counts()


def test_runs_from_two_workers_arrive_whole_once_and_importing_again_adds_nothing(
    tmp_path: Path,
) -> None:
    root = tmp_path / "shared"
    a = _worker_store(tmp_path / "a.duckdb", "ad-a", "run-a", 0.8)
    b = _worker_store(tmp_path / "b.duckdb", "ad-b", "run-b", 0.4)
    assert export_run(a, "run-a", root) is not None
    assert export_run(b, "run-b", root) is not None
    assert export_run(a, "run-a", root) is None  # already there: never rewritten

    team = ResultStore(tmp_path / "team.duckdb")
    first = import_runs(team, root)
    assert sorted(first.imported) == ["run-a", "run-b"] and not first.refused
    assert _counts(team) == {
        "adapters": 2,
        "null_calibration": 0,
        "probe_results": 6,
        "scores": 2,
        "runs": 2,
    }
    # Every column survives the trip: the imported rows read back as the worker wrote them.
    assert team.suite_of("run-a").probes == a.suite_of("run-a").probes
    assert [r["adapter_id"] for r in team.leaderboard()] == ["ad-a", "ad-b"]

    again = import_runs(team, root)
    assert again.imported == [] and sorted(again.held) == ["run-a", "run-b"]
    assert _counts(team)["probe_results"] == 6


def test_an_incomplete_run_is_not_exported(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "w.duckdb")
    store.begin_run(RunRecord(run_id="r", adapter_id="ad", spec_hash="h"))
    with pytest.raises(StoreError, match="incomplete"):
        export_run(store, "r", tmp_path / "shared")
    assert not (tmp_path / "shared" / "r").exists()


def test_a_partial_or_foreign_folder_is_refused_by_name_and_the_rest_imported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "shared"
    export_run(_worker_store(tmp_path / "a.duckdb", "ad-a", "run-a", 0.8), "run-a", root)
    (root / "holiday-photos").mkdir()
    partial = root / "run-x"
    partial.mkdir()
    (partial / MANIFEST).write_text(json.dumps({"run_id": "run-x", "schema": 1}))
    newer = root / "run-n"
    newer.mkdir()
    (newer / MANIFEST).write_text(json.dumps({"run_id": "run-n", "schema": 999}))

    home = tmp_path / "team"
    code = main(["results", "import", str(root), "--home", str(home)])
    err = capsys.readouterr().err
    assert code == 1
    assert "holiday-photos" in err and "run-x: " in err and "missing" in err
    assert "newer than this one" in err
    team = ResultStore(home / "sway.duckdb")
    assert [r["run_id"] for r in team.runs()] == ["run-a"]
    assert (root / "holiday-photos").is_dir()  # nothing it did not write is touched


def test_cli_export_writes_each_completed_run_once(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home = tmp_path / "worker"
    _worker_store(home / "sway.duckdb", "ad-a", "run-a", 0.8)
    root = tmp_path / "shared"
    assert main(["results", "export", str(root), "--home", str(home)]) == 0
    assert main(["results", "export", str(root), "--home", str(home)]) == 0
    out = capsys.readouterr().out
    assert "exported 1 run(s)" in out and "exported 0 run(s)" in out
    assert sorted(p.name for p in root.iterdir()) == ["run-a"]
