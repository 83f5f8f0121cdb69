"""Faults injected into a real evaluation (real Dagster instance, DuckDB, MLflow): MLflow down,
its sqlite db locked, its artifact disk full. MLflow is a mirror of DuckDB: none of these
fails an evaluation that DuckDB recorded, each costs one short try per run (not ~250 s per
probe step), and the copy is caught up later (issue 14, item 7). Worker death: test_run_health;
DuckDB held by a reader: tests/engine/test_store.py; API faults: test_api_backend.py."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sway_engine.home import Settings
from sway_engine.mirror import forget_failures
from sway_engine.store import ResultStore
from sway_engine.tracking import CLIENT_DEADLINES
from tests.dagster.test_evaluate import evaluate


class HangUpServer:
    """A tracking server that accepts each connection and closes it at once, counting them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(autouse=True)
def _fresh_breaker() -> Iterator[None]:
    forget_failures()
    yield
    forget_failures()


@pytest.fixture
def dead_mlflow() -> Iterator[HangUpServer]:
    server = HangUpServer()
    yield server
    server.close()


def test_mlflow_down_leaves_the_evaluation_complete_and_the_copy_pending_then_synced(
    home: Settings, instance, fx, dead_mlflow: HangUpServer, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    down = Settings.from_env(
        {"SWAY_HOME": str(home.home), "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{dead_mlflow.port}"}
    )
    _, results = evaluate(down, instance, ["doc-strong"], fx)
    ((key, result),) = results.items()
    assert result.success  # two probe steps and the score step all succeeded

    store = ResultStore(home.database)
    (run,) = store.runs()
    assert run["status"] == "complete" and run["mlflow_status"] == "pending"
    assert f"127.0.0.1:{dead_mlflow.port}" in run["mlflow_error"]
    # One request and its retries, then the run leaves the dead server alone. Without the
    # cooldown every step tries again: 3 steps x 3 attempts = 9 connections at least.
    attempts = 1 + int(CLIENT_DEADLINES["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    assert 1 <= dead_mlflow.connections <= attempts
    score = result.asset_materializations_for_node("sway_score")[0].metadata
    assert score["mlflow"].value.startswith("pending: ")
    dkl = next(r for r in store.probe_results(key) if r["probe"] == "delta_kl_doc")

    # `sway sync-mlflow` copies it to the home's own MLflow (sqlite) once that is reachable.
    synced = subprocess.run(
        [sys.executable, "-m", "sway_engine.cli", "sync-mlflow", "--home", str(home.home)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert synced.returncode == 0, synced.stderr
    assert "1 of 1 evaluation(s) copied" in synced.stdout
    (run,) = store.runs()
    assert run["mlflow_status"] == "synced" and run["mlflow_run_id"]
    client = MlflowClient(home.mlflow_uri)
    copied = client.get_run(run["mlflow_run_id"])
    assert copied.info.status == "FINISHED"
    assert copied.data.tags["dagster.run_id"] == result.run_id
    assert copied.data.metrics["delta_kl_doc/z"] == pytest.approx(dkl["z"])
    assert copied.data.params["null_mode"] == "matched"
    artifacts = {a.path for a in client.list_artifacts(copied.info.run_id)}
    assert {"results.json", "report.md", "plots"} <= artifacts

    again = subprocess.run(
        [sys.executable, "-m", "sway_engine.cli", "sync-mlflow", "--home", str(home.home)],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)},
        timeout=300,
    )
    assert again.returncode == 0 and "nothing pending" in again.stdout


def test_a_locked_mlflow_db_is_named_and_caught_up_by_the_next_evaluation(
    home: Settings, instance, fx
) -> None:  # type: ignore[no-untyped-def]
    holder = sqlite3.connect(home.home / "mlflow.db", timeout=0)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        defs, results = evaluate(home, instance, ["doc-strong"], fx)
    finally:
        holder.rollback()
        holder.close()
    ((key, first),) = results.items()
    assert first.success
    store = ResultStore(home.database)
    (run,) = store.runs()
    assert run["status"] == "complete" and run["mlflow_status"] == "pending"
    assert "locked" in run["mlflow_error"]
    assert "Traceback" not in run["mlflow_error"]

    # The lock is gone: the next evaluation copies itself and then the pending one.
    forget_failures()
    second = defs.resolve_job_def("evaluate_adapter").execute_in_process(
        partition_key=key, instance=instance
    )
    assert second.success
    runs = store.runs()
    assert len(runs) == 2 and {r["mlflow_status"] for r in runs} == {"synced"}
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    mlflow_runs = client.search_runs([exp.experiment_id])
    assert {r.data.tags["dagster.run_id"] for r in mlflow_runs} == {first.run_id, second.run_id}
    assert {r.info.status for r in mlflow_runs} == {"FINISHED"}


@contextlib.contextmanager
def full_disk(folder: Path) -> Iterator[str]:
    """`folder` on a filesystem with no space left: a tiny tmpfs filled up where this process
    may mount one (root, as in CI containers), else artifact writes fail as a full disk does."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

        def no_space(*_args: object, **_kwargs: object) -> None:
            raise OSError(errno.ENOSPC, "No space left on device", str(folder))

        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(LocalArtifactRepository, "log_artifact", no_space)
            yield "simulated"
        return
    try:
        fd = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        with contextlib.suppress(OSError):
            while True:
                os.write(fd, b"\0" * 1024)
        os.close(fd)
        yield "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_artifact_disk_leaves_the_evaluation_complete_and_the_copy_pending(
    home: Settings, instance, fx
) -> None:  # type: ignore[no-untyped-def]
    with full_disk(home.mlflow_artifacts) as how:
        _, results = evaluate(home, instance, ["doc-strong"], fx)
    ((_, result),) = results.items()
    assert result.success, how
    (run,) = ResultStore(home.database).runs()
    assert run["status"] == "complete" and run["mlflow_status"] == "pending"
    assert "No space left on device" in run["mlflow_error"], run["mlflow_error"]
    # The run that met the full disk is FAILED in MLflow, not left RUNNING.
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    assert {r.info.status for r in client.search_runs([exp.experiment_id])} == {"FAILED"}
