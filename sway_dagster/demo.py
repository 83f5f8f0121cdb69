"""`make run`: build the fixtures, evaluate every fixture adapter through Dagster, print the
leaderboard from DuckDB and where to look. `make clean` removes what the demo made.

The demo lives in a home of its own (`.sway_demo/` in the checkout, or $SWAY_DEMO_HOME),
marked by a file it writes when it creates the folder. It never reads $SWAY_HOME: that is
where users keep their real history. It resets or removes a folder only when the marker is
there, and refuses any other non-empty folder with the reason.

Adapters reach Dagster through the sensor's own path: the demo ticks `adapter_sensor` until
every adapter directory is registered or reported as not an adapter (bounded), then executes
the runs the ticks requested. Only the standard library is imported at module level, so
`make clean` runs with the system Python.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import dagster as dg

    from sway_engine.fixtures.build import FixturePaths

REPO = Path(__file__).resolve().parents[1]
HOME_ENV = "SWAY_DEMO_HOME"
MARKER = ".sway-demo-home"
MARKER_TEXT = (
    "This folder was created by sway's demo (`make run`, sway_dagster/demo.py).\n"
    "`make run` resets it and `make clean` removes it. Keep real results elsewhere (SWAY_HOME).\n"
)
TICK_BUDGET_S = 120.0


class DemoHomeError(Exception):
    """The demo was pointed at a folder it did not create; nothing was touched."""


def demo_home(env: dict[str, str] | None = None) -> Path:
    """$SWAY_DEMO_HOME, else `.sway_demo/` in the checkout. $SWAY_HOME is never used."""
    env = dict(os.environ if env is None else env)
    return Path(env.get(HOME_ENV) or REPO / ".sway_demo").expanduser().resolve()


def owned(home: Path) -> bool:
    """True when `home` carries the marker the demo writes into folders it creates."""
    return (home / MARKER).is_file()


def _check_owned(home: Path, doing: str) -> None:
    """Refuse a folder that exists, is not empty and lacks the demo's marker."""
    if home.is_symlink() or (home.exists() and not home.is_dir()):
        raise DemoHomeError(f"refusing to {doing} {home}: it is not a plain folder")
    if home.is_dir() and any(home.iterdir()) and not owned(home):
        raise DemoHomeError(
            f"refusing to {doing} {home}: the demo did not create it (no {MARKER} marker), "
            f"so it may hold someone's results. Set {HOME_ENV} to a new or empty folder, "
            "or unset it to use .sway_demo/ in the checkout."
        )


def reset_home(home: Path) -> None:
    """Empty the demo's own folder (or create it) and mark it as the demo's."""
    _check_owned(home, "reset")
    if home.is_dir():
        for child in home.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    home.mkdir(parents=True, exist_ok=True)
    (home / MARKER).write_text(MARKER_TEXT)


def remove_home(home: Path) -> bool:
    """Remove the demo's folder; False when there is none. Refuses a folder it did not make."""
    if not home.exists() and not home.is_symlink():
        return False
    _check_owned(home, "remove")
    shutil.rmtree(home)
    return True


def prepare_home(home: Path, fx: FixturePaths, suite: Path | None = None) -> None:
    """The demo home: fixture adapters as copied (their own mtimes), a suite (the full battery
    unless `suite` is given) and a Dagster instance."""
    from sway_engine.fixtures.battery import write_battery

    reset_home(home)
    (home / "adapters").mkdir()
    (home / "dagster").mkdir()
    shutil.copyfile(REPO / "dagster.yaml", home / "dagster" / "dagster.yaml")
    if suite is None:
        write_battery(fx, home / "sway.yaml")
    else:
        shutil.copyfile(suite, home / "sway.yaml")
    for name, src in fx.adapters.items():
        shutil.copytree(src, home / "adapters" / name)


def register_adapters(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    *,
    budget_s: float = TICK_BUDGET_S,
    poll_s: float = 1.0,
) -> list[dg.RunRequest]:
    """Tick the adapter sensor until no directory is still being written (or the budget ends),
    adding its partitions; returns every run it requested."""
    import dagster as dg

    from sway_dagster.adapter_store import WAITING, AdapterStoreResource

    sensor = defs.resolve_sensor_def("adapter_sensor")
    store = (defs.resources or {})["adapter_store"]
    assert isinstance(store, AdapterStoreResource)
    cursor: str | None = None
    requests: list[dg.RunRequest] = []
    deadline = time.monotonic() + budget_s
    said: set[str] = set()
    while True:
        with dg.build_sensor_context(
            instance=instance, resources=defs.resources, cursor=cursor
        ) as ctx:
            tick = sensor(ctx)
            cursor = ctx.cursor
        if isinstance(tick, dg.SensorResult):
            for req in tick.dynamic_partitions_requests or []:
                keys = list(req.partition_keys or [])
                instance.add_dynamic_partitions(req.partitions_def_name, keys)
            requests.extend(tick.run_requests or [])
        waiting = [c for c in store.scan() if c.status in WAITING]
        if not waiting:
            return requests
        if time.monotonic() >= deadline:
            late = ", ".join(f"{c.name} ({c.reason})" for c in waiting)
            print(f"  gave up waiting after {budget_s:.0f}s for: {late}")
            return requests
        names = {c.name for c in waiting}
        if names != said:  # one line when the set changes, not one per adapter per tick
            print(
                f"  waiting for {len(names)} adapter folder(s) to settle "
                f"(no file changed for {store.settle_seconds:g} s): {', '.join(sorted(names))}"
            )
            said = names
        time.sleep(poll_s)


def evaluate_all(home: Path, *, tick_budget_s: float = TICK_BUDGET_S) -> list[str]:
    """Register the home's adapters through the sensor, run each requested evaluation and
    the leaderboard; returns the evaluated partition keys."""
    import dagster as dg

    from sway_dagster.definitions import JOB_NAME, build_definitions
    from sway_engine.home import Settings

    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    settings = Settings.from_env({"SWAY_HOME": str(home)})
    defs = build_definitions(settings)
    instance = dg.DagsterInstance.get()
    requests = register_adapters(defs, instance, budget_s=tick_budget_s)
    job = defs.resolve_job_def(JOB_NAME)
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    keys = []
    for run in requests:
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


def run(home: Path) -> int:
    from sway_engine.fixtures import build_fixtures

    start = time.perf_counter()
    print(f"sway demo home: {home}")
    if os.environ.get("SWAY_HOME"):
        print(f"  (SWAY_HOME={os.environ['SWAY_HOME']} is yours: the demo does not touch it)")
    _check_owned(home, "reset")
    prepare_home(home, build_fixtures())
    print("evaluating every fixture adapter through Dagster (sensor ticks -> runs):")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sway_dagster.demo", description=__doc__)
    parser.add_argument("command", nargs="?", choices=("run", "clean", "home"), default="run")
    args = parser.parse_args(argv)
    home = demo_home()
    try:
        if args.command == "home":
            print(home)
            return 0
        if args.command == "clean":
            print(f"removed {home}" if remove_home(home) else f"no demo home at {home}")
            return 0
        return run(home)
    except DemoHomeError as exc:
        print(f"sway demo: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
