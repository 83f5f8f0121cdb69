"""`make run`: build the fixtures, evaluate every fixture adapter through Dagster, print the
leaderboard from DuckDB and where to look. Uses the sensor's own code path: one sensor
tick registers the partitions and requests the runs, which then execute on the instance.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_home(home: Path) -> None:
    """A clean home with the fixture adapters, the full probe battery and a Dagster instance."""
    from sway_engine.fixtures import build_fixtures
    from sway_engine.fixtures.battery import write_battery

    fx = build_fixtures()
    if home.exists():
        shutil.rmtree(home)
    (home / "adapters").mkdir(parents=True)
    (home / "dagster").mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    write_battery(fx, home / "sway.yaml")
    settled = time.time() - 3600
    for name, src in fx.adapters.items():
        dst = home / "adapters" / name
        shutil.copytree(src, dst)
        for path in [dst, *dst.iterdir()]:
            os.utime(path, (settled, settled))


def evaluate_all(home: Path) -> list[str]:
    import dagster as dg

    from sway_dagster.definitions import JOB_NAME, build_definitions
    from sway_dagster.settings import Settings

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    settings = Settings.from_env({**os.environ, "SWAY_HOME": str(home)})
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.get()
    sensor = defs.resolve_sensor_def("adapter_sensor")
    with dg.build_sensor_context(instance=instance, resources=defs.resources) as ctx:
        tick = sensor(ctx)
    assert isinstance(tick, dg.SensorResult), f"sensor found nothing: {tick}"
    for req in tick.dynamic_partitions_requests or []:
        instance.add_dynamic_partitions(req.partitions_def_name, list(req.partition_keys or []))
    job = defs.resolve_job_def(JOB_NAME)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    keys = []
    for run in tick.run_requests or []:
        assert run.partition_key is not None
        start = time.perf_counter()
        result = job.execute_in_process(
            partition_key=run.partition_key,
            instance=instance,
            tags=dict(run.tags),
            run_config=quiet,
        )
        status = "ok" if result.success else "FAILED"
        took = time.perf_counter() - start
        print(f"  {run.partition_key:<24} run {result.run_id[:8]} {status} in {took:.1f}s")
        keys.append(run.partition_key)
    board = defs.resolve_implicit_global_asset_job_def()
    board.execute_in_process(
        instance=instance, asset_selection=[dg.AssetKey("leaderboard")], run_config=quiet
    )
    return keys


def summary(home: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    from sway_engine.store import ResultStore

    store = ResultStore(home / "sway.duckdb")
    probes = store.probe_results()
    table = Table(title="sway leaderboard (from DuckDB)")
    for col in ("rank", "adapter", "overall", "band", "gate", "verdicts"):
        table.add_column(col)
    for row in store.leaderboard():
        verdicts = " ".join(
            f"{p['probe']}={p['verdict']}" for p in probes if p["adapter_id"] == row["adapter_id"]
        )
        gate = "[green]pass[/green]" if row["gate_passed"] else "[red]fail[/red]"
        table.add_row(
            str(row["rank"]),
            row["adapter_id"],
            f"{row['overall']:.2f}",
            row["band"],
            gate,
            verdicts,
        )
    Console(width=160).print(table)


def main() -> int:
    home = Path(os.environ.get("SWAY_HOME", REPO / ".sway_home")).resolve()
    start = time.perf_counter()
    print(f"sway home: {home}")
    prepare_home(home)
    print("evaluating every fixture adapter through Dagster (sensor tick -> runs):")
    evaluate_all(home)
    summary(home)
    print(f"\ndone in {time.perf_counter() - start:.0f}s. Where to look:")
    print(f"  DuckDB:    {home / 'sway.duckdb'}")
    print("  UIs:       make ui   (Dagster http://127.0.0.1:3000, MLflow http://127.0.0.1:5000)")
    dagster_env = f"DAGSTER_HOME={home / 'dagster'} SWAY_HOME={home}"
    print(f"  Dagster:   {dagster_env} .venv/bin/dagster dev -w workspace.yaml -h 127.0.0.1")
    mlflow_db = f"sqlite:///{home / 'mlflow.db'}"
    print(f"  MLflow:    .venv/bin/mlflow ui --backend-store-uri {mlflow_db} --host 127.0.0.1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
