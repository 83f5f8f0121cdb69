"""deploy/: the team configurations. The Postgres one runs for real (a local PostgreSQL server,
two workers with stores of their own, Dagster and MLflow on Postgres, results exported as
Parquet and imported once); the Kubernetes and Celery ones load into Dagster's config schema
(no cluster here). docs/DEPLOY.md."""

from __future__ import annotations

import importlib
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from mlflow import MlflowClient

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_engine.errors import SwayError
from sway_engine.home import Settings
from sway_engine.store import ResultStore
from tests.dagster.conftest import REPO, add_adapter, run_worker
from tests.postgres import postgres_server

DEPLOY = REPO / "deploy"
PROBES = {"null_baseline", "delta_kl_doc", "ablation"}
PG_ENV = {
    "DAGSTER_PG_HOST": "db.example",
    "DAGSTER_PG_PORT": "5432",
    "DAGSTER_PG_USERNAME": "dagster",
    "DAGSTER_PG_PASSWORD": "secret",
    "DAGSTER_PG_DB": "dagster",
    "SWAY_IMAGE": "registry.example/sway:1",
    "SWAY_CELERY_BROKER": "redis://redis:6379/0",
    "SWAY_CELERY_BACKEND": "redis://redis:6379/1",
}


def _schema_problems(config_dir: Path) -> list[str]:
    """Every problem Dagster finds in the instance file and its run launcher's config."""
    config, _ = dagster_instance_config(str(config_dir))
    problems = []
    parts = {"storage": config["storage"]["postgres"]}
    from dagster_postgres import PostgresRunStorage

    checks: dict[str, tuple[Any, Any]] = {"storage": (PostgresRunStorage, parts["storage"])}
    if config.get("run_launcher"):
        launcher = config["run_launcher"]
        cls = getattr(importlib.import_module(launcher["module"]), launcher["class"])
        checks["run_launcher"] = (cls, launcher.get("config") or {})
    for part, (cls, value) in checks.items():
        result = process_config(cls.config_type(), value)
        problems += [f"{part}: {e.message}" for e in result.errors or []]
    return problems


@pytest.mark.parametrize("setup", ["postgres", "k8s", "celery"])
def test_deploy_configs_load_into_dagsters_schema(
    setup: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    shutil.copyfile(DEPLOY / setup / "dagster.yaml", tmp_path / "dagster.yaml")
    assert _schema_problems(tmp_path) == []

    # The check has the power to fail: a misspelt launcher field is caught.
    config = yaml.safe_load((DEPLOY / setup / "dagster.yaml").read_text())
    if "run_launcher" in config:
        config["run_launcher"]["config"]["job_namespac"] = "sway"
        (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(config))
        assert any("job_namespac" in p for p in _schema_problems(tmp_path))


def test_the_celery_worker_config_fits_the_executor_schema(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dagster_celery.executor import celery_executor

    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    worker = yaml.safe_load((DEPLOY / "celery" / "celery.yaml").read_text())
    result = process_config(
        celery_executor.config_schema.config_type, worker["execution"]["config"]
    )
    assert result.success, [e.message for e in result.errors or []]


def test_run_tags_from_the_environment_reach_the_evaluation_job(home: Settings) -> None:
    gpu = '{"dagster-celery/queue": "gpu", "dagster-k8s/config": {"container_config": {}}}'
    settings = Settings.from_env({"SWAY_HOME": str(home.home), "SWAY_RUN_TAGS": gpu})
    tags = build_definitions(settings).resolve_job_def(JOB_NAME).tags
    assert tags["dagster-celery/queue"] == "gpu"
    assert tags["dagster-k8s/config"] == '{"container_config": {}}'
    assert tags["sway/pipeline"] == "evaluate"


@pytest.mark.slow
def test_two_workers_on_postgres_lose_and_duplicate_nothing(
    home: Settings, fx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    started = time.monotonic()
    with postgres_server() as pg:
        pg.create_database("dagster")
        pg.create_database("mlflow")
        up_s = time.monotonic() - started
        dagster_home = tmp_path / "dagster"
        dagster_home.mkdir()
        shutil.copyfile(DEPLOY / "postgres" / "dagster.yaml", dagster_home / "dagster.yaml")
        pg_env = {
            "DAGSTER_PG_HOST": pg.host,
            "DAGSTER_PG_PORT": str(pg.port),
            "DAGSTER_PG_USERNAME": "sway",
            "DAGSTER_PG_PASSWORD": "unused (trust authentication)",
            "DAGSTER_PG_DB": "dagster",
        }
        mlflow_uri = pg.uri("mlflow")
        shared = tmp_path / "shared"
        for name in ("doc-strong", "doc-weak"):
            add_adapter(home, fx.adapters[name])
        keys = sorted(
            str(c.key)
            for c in AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
        )
        # Two machines: a local store each, one Dagster instance, one MLflow, one shared folder.
        env = {
            **pg_env,
            "MLFLOW_TRACKING_URI": mlflow_uri,
            "SWAY_ADAPTERS_DIR": str(home.adapters_dir),
        }
        env |= {"SWAY_RESULTS_EXPORT": str(shared / "results")}
        env |= {"SWAY_MLFLOW_ARTIFACTS": str(shared / "mlartifacts")}
        homes = [home, _second_home(home, tmp_path / "machine-b")]
        with pytest.MonkeyPatch.context() as mp:
            for name, value in pg_env.items():
                mp.setenv(name, value)
            instance = dg.DagsterInstance.from_config(str(dagster_home))
            instance.add_dynamic_partitions("adapters", keys)
            MlflowClient(mlflow_uri).search_experiments()  # MLflow's schema, created once
            # The pool's limit row, created once: two workers whose first model step starts at
            # the same moment both insert it, and Dagster 1.13.27 goes on in the aborted
            # postgres transaction ("InFailedSqlTransaction"; seen once in a fresh clone).
            instance.event_log_storage.initialize_concurrency_limit_to_default("model")
            workers = [
                run_worker(h, dagster_home, [k], env) for h, k in zip(homes, keys, strict=True)
            ]
            try:
                errors = [w.communicate(timeout=900)[1].decode(errors="replace") for w in workers]
            finally:
                for w in workers:
                    w.kill()
            for worker, stderr in zip(workers, errors, strict=True):
                assert worker.returncode == 0, stderr[-3000:]
            runs = instance.get_runs()
            assert sorted(r.tags["dagster/partition"] for r in runs) == keys
            assert {r.status for r in runs} == {dg.DagsterRunStatus.SUCCESS}
            scored = instance.get_materialized_partitions(dg.AssetKey("sway_score"))
            assert scored == set(keys)
            instance.dispose()
        evaluated_s = time.monotonic() - started

        # Each worker holds only its own run; the team's store gets both from the shared folder.
        for h in homes:
            assert len(ResultStore(h.database).runs()) == 1
        team = tmp_path / "team"
        imported = _sway("results", "import", str(shared / "results"), "--home", str(team))
        assert "imported 2 run(s)" in imported
        again = _sway("results", "import", str(shared / "results"), "--home", str(team))
        assert "imported 0 run(s)" in again and "2 already there" in again
        store = ResultStore(team / "sway.duckdb")
        runs_rows = store.runs()
        assert sorted(r["adapter_id"] for r in runs_rows) == keys  # none lost, none twice
        assert {r["status"] for r in runs_rows} == {"complete"}
        counts = store.row_counts()
        assert counts["probe_results"] == 2 * len(PROBES) and counts["scores"] == 2
        assert counts["null_calibration"] == 2 * 2 * 16  # (delta_kl, ablation) x 16 seeds
        assert counts["adapters"] == 2
        assert sorted(r["adapter_id"] for r in store.leaderboard()) == keys

        client = MlflowClient(mlflow_uri)
        experiment = client.get_experiment_by_name("sway-sway")
        mlflow_runs = client.search_runs([experiment.experiment_id])
        assert sorted(r.data.tags["dagster.partition"] for r in mlflow_runs) == keys
        assert all("sway/score" in r.data.metrics for r in mlflow_runs)
        assert {r["mlflow_status"] for r in runs_rows} == {"synced"}
    print(
        f"postgres deploy: server up {up_s:.1f} s, two concurrent runs done at "
        f"{evaluated_s:.1f} s, imported and checked at {time.monotonic() - started:.1f} s"
    )


def _second_home(first: Settings, root: Path) -> Settings:
    root.mkdir()
    shutil.copyfile(first.suite, root / "sway.yaml")
    return Settings.from_env({"SWAY_HOME": str(root)})


def _sway(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "sway_engine.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.parametrize("bad", ["gpu", "[1, 2]", '{"queue": '])
def test_a_bad_run_tags_variable_names_itself_and_the_fix(bad: str) -> None:
    with pytest.raises(SwayError, match="SWAY_RUN_TAGS") as info:
        Settings.from_env({"SWAY_HOME": "/tmp/h", "SWAY_RUN_TAGS": bad})
    assert "object" in str(info.value)


def test_a_tracking_server_keeps_its_own_artifact_root() -> None:
    served = Settings.from_env({"SWAY_HOME": "/tmp/h", "MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert served.mlflow_artifacts is None
    shared = {"MLFLOW_TRACKING_URI": "postgresql://db/mlflow", "SWAY_MLFLOW_ARTIFACTS": "/shared/a"}
    assert Settings.from_env({"SWAY_HOME": "/tmp/h", **shared}).mlflow_artifacts == Path(
        "/shared/a"
    )
    assert Settings.from_env({"SWAY_HOME": "/tmp/h"}).mlflow_artifacts == Path("/tmp/h/mlartifacts")
