"""A run whose worker dies (kill -9) is marked failed, and its half-written evaluation is never
shown as complete (issue 14). A real run in a worker process on a real Dagster instance
(sqlite, shared between processes), real DuckDB and MLflow."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import dagster as dg
from dagster._core.events import DagsterEventType
from mlflow import MlflowClient

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.resources import MlflowResource, ResultStoreResource
from sway_dagster.run_health import dead_runs, make_reaper_sensor, sway_failed_runs
from sway_engine.home import Settings
from sway_engine.store import ResultStore
from tests.dagster.conftest import REPO, add_adapter, run_worker, wait_until


def test_a_killed_run_worker_is_failed_and_its_evaluation_never_shown(
    home: Settings, fx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    shutil.copyfile(REPO / "dagster.yaml", dagster_home / "dagster.yaml")
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    add_adapter(home, fx.adapters["doc-strong"])
    (candidate,) = AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    key = str(candidate.key)
    instance.add_dynamic_partitions("adapters", [key])

    worker = run_worker(home, dagster_home, [key])
    store = ResultStore(home.database)
    try:
        # Kill it once its evaluation exists in DuckDB and is still incomplete.
        wait_until(
            "an incomplete evaluation",
            lambda: (
                home.database.is_file()
                and any(r["status"] == "incomplete" for r in store.runs())
                or None
            ),
            timeout=240,
            every=0.2,
        )
        os.kill(worker.pid, signal.SIGKILL)
        # Not reaped yet (no wait() so far): the worker is a zombie, which counts as gone.
        ((run, pid),) = wait_until(
            "the killed worker to be gone", lambda: dead_runs(instance) or None, 30, every=0.1
        )
        assert pid == worker.pid
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.STARTED

    reaper = make_reaper_sensor()
    reaper(dg.build_sensor_context(instance=instance))
    failed = instance.get_run_by_id(run.run_id)
    assert failed is not None and failed.status == dg.DagsterRunStatus.FAILURE
    assert dead_runs(instance) == []

    (event,) = instance.all_logs(run.run_id, of_type=DagsterEventType.RUN_FAILURE)
    assert "is gone" in (event.dagster_event.message or "")
    context = dg.build_run_status_sensor_context(
        sensor_name="sway_failed_runs",
        dagster_event=event.dagster_event,
        dagster_instance=instance,
        dagster_run=failed,
        resources={
            "results": ResultStoreResource(database=str(home.database)),
            "mlflow": MlflowResource(tracking_uri=home.mlflow_uri, experiment="sway-sway"),
        },
    ).for_run_failure()
    sway_failed_runs(context)

    (evaluation,) = store.runs()
    assert evaluation["status"] == "failed" and "is gone" in evaluation["message"]
    assert store.leaderboard() == [] and store.probe_results(key) == []
    client = MlflowClient(home.mlflow_uri)
    experiment = client.get_experiment_by_name("sway-sway")
    if experiment is not None:  # the MLflow run exists once a probe step logged to it
        statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
        assert statuses <= {"FAILED"}

    # The re-run (what run_retries launches) completes beside the failed evaluation.
    from sway_dagster.definitions import JOB_NAME, build_definitions

    job = build_definitions(home).resolve_job_def(JOB_NAME)
    assert job.execute_in_process(partition_key=key, instance=instance).success
    assert sorted(r["status"] for r in store.runs()) == ["complete", "failed"]
    assert [r["adapter_id"] for r in store.leaderboard()] == [key]
    assert {r["probe"] for r in store.probe_results(key)} == {
        "null_baseline",
        "delta_kl_doc",
        "ablation",
    }
