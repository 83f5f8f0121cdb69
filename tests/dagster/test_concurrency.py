"""Two Dagster runs at once on one instance, one DuckDB file and one MLflow db, while a reader
polls: no lost, duplicated or half-visible rows (issue 14). Real processes, real files."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any

import dagster as dg
from mlflow import MlflowClient

from sway_dagster.adapter_store import AdapterStoreResource
from sway_engine.home import Settings
from sway_engine.store import ResultStore, StoreError
from tests.dagster.conftest import REPO, add_adapter, run_worker

PROBES = {"null_baseline", "delta_kl_doc", "ablation"}


class Reader(threading.Thread):
    """Polls the leaderboard and the probe rows, recording anything half-visible."""

    def __init__(self, database: Path) -> None:
        super().__init__(daemon=True)
        self.store = ResultStore(database, lock_timeout_s=120)
        self.stop = threading.Event()
        self.polls = 0
        self.seen_max = 0
        self.problems: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                # The leaderboard first: a run completing between the two reads can only add
                # rows, so every adapter ranked must then have its rows.
                board = self.store.leaderboard()
                self.check(self.store.probe_results(), board)
            except StoreError as exc:
                if "no result store" not in str(exc):
                    self.problems.append(f"read failed: {exc}")
            self.polls += 1
            self.stop.wait(0.2)

    def check(self, rows: list[dict[str, Any]], board: list[dict[str, Any]]) -> None:
        runs: dict[str, set[str]] = defaultdict(set)
        probes: dict[str, list[str]] = defaultdict(list)
        for row in rows:
            runs[row["adapter_id"]].add(row["run_id"])
            probes[row["adapter_id"]].append(row["probe"])
        for adapter, names in probes.items():
            if sorted(names) != sorted(PROBES) or len(runs[adapter]) != 1:
                self.problems.append(f"{adapter}: visible rows {sorted(names)} of {runs[adapter]}")
        for entry in board:
            if entry["adapter_id"] not in probes:
                self.problems.append(f"{entry['adapter_id']} ranked without its probe rows")
        self.seen_max = max(self.seen_max, len(board))


def test_two_concurrent_runs_and_a_reader_lose_and_show_nothing_half_done(
    home: Settings, fx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    for name in ("doc-strong", "doc-weak", "noise", "zero"):
        add_adapter(home, fx.adapters[name])
    keys = sorted(
        str(c.key)
        for c in AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    )
    assert len(keys) == 4
    instance.add_dynamic_partitions("adapters", keys)

    reader = Reader(home.database)
    reader.start()
    workers = [
        run_worker(home, dagster_home, keys[0::2]),
        run_worker(home, dagster_home, keys[1::2]),
    ]
    try:
        errors = [w.communicate(timeout=900)[1].decode(errors="replace") for w in workers]
    finally:
        for w in workers:
            w.kill()
        reader.stop.set()
        reader.join(timeout=60)
    for worker, stderr in zip(workers, errors, strict=True):
        assert worker.returncode == 0, stderr[-3000:]

    assert reader.problems == [] and reader.polls >= 10
    store = ResultStore(home.database)
    runs = store.runs()
    assert len(runs) == 4 and {r["status"] for r in runs} == {"complete"}
    assert sorted(r["adapter_id"] for r in runs) == keys  # none lost, none twice
    counts = store.row_counts()
    assert counts["probe_results"] == 4 * len(PROBES) and counts["scores"] == 4
    assert counts["null_calibration"] == 4 * 2 * 16  # (delta_kl, ablation) x 16 seeds each
    assert sorted(r["adapter_id"] for r in store.leaderboard()) == keys

    # Both processes wrote one sqlite MLflow db: a copy that met a lock is pending, never lost.
    pending = [r for r in runs if r["mlflow_status"] == "pending"]
    if pending:
        synced = subprocess.run(
            [sys.executable, "-m", "sway_engine.cli", "sync-mlflow", "--home", str(home.home)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert synced.returncode == 0, synced.stderr
    assert {r["mlflow_status"] for r in store.runs()} == {"synced"}
    client = MlflowClient(home.mlflow_uri)
    experiment = client.get_experiment_by_name("sway-sway")
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["dagster.partition"] for r in mlflow_runs) == keys
    print(
        f"concurrency: {len(keys)} adapters, 2 workers, reader polls {reader.polls}, "
        f"max ranked while running {reader.seen_max}, MLflow copies pending at the end "
        f"{len(pending)}"
    )
