"""Results from many machines: each worker exports every completed run as Parquet under a
shared folder, and one writer imports the folder into the team's DuckDB store.

DuckDB allows one writer per file and cannot share a file over NFS, so workers never write the
team's store. A worker keeps its own local store (its SWAY_HOME) and, when a run completes,
writes `<root>/<run_id>/<table>.parquet` for every data table (the run's rows only) into a
hidden folder and renames it into place: a reader sees a whole run or none. `import_runs`
copies each run the store does not hold yet, in one transaction per run, so importing twice
adds nothing and nothing already stored is replaced. Nothing here deletes a file it did not
write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from sway_engine.store.db import StoreError
from sway_engine.store.results import ResultStore
from sway_engine.store.rows import COMPLETE
from sway_engine.store.schema import DATA_TABLES, MIGRATIONS

if TYPE_CHECKING:
    import duckdb

MANIFEST = "sway-run.json"
# The rows of one run in each table (the adapter's row for `adapters`).
_OF_RUN = {table: "run_id = ?" for table in DATA_TABLES if table != "adapters"}
_OF_RUN["adapters"] = "adapter_id = (SELECT adapter_id FROM runs WHERE run_id = ?)"


@dataclass
class ImportReport:
    """What one import did: runs copied, runs already held, folders refused (and why)."""

    imported: list[str] = field(default_factory=list)
    held: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)


def run_folder(root: Path, run_id: str) -> Path:
    """The folder of `run_id` under `root` (its id made safe as a file name)."""
    return root / re.sub(r"[^A-Za-z0-9._-]", "_", run_id)


def export_run(store: ResultStore, run_id: str, root: str | Path) -> Path | None:
    """Write a completed run's rows under `root`; None when that run was exported already.
    An incomplete or unknown run is an error: only whole evaluations leave a worker."""
    root = Path(root).expanduser().absolute()
    final = run_folder(root, run_id)
    if final.exists():
        return None
    row = store.run_row(run_id)
    if row is None or row["status"] != COMPLETE:
        state = "unknown" if row is None else row["status"]
        raise StoreError(f"run {run_id} is {state}; only completed runs are exported")
    staging = root / f".incoming-{uuid.uuid4().hex}"
    staging.mkdir(parents=True)
    try:

        def work(con: duckdb.DuckDBPyConnection) -> None:
            for table, where in _OF_RUN.items():
                target = _literal(staging / f"{table}.parquet")
                con.execute(
                    f"COPY (SELECT * FROM {table} WHERE {where}) TO {target} (FORMAT parquet)",
                    [run_id],
                )

        store.read(work)
        manifest = {"run_id": run_id, "schema": MIGRATIONS[-1].version, "tables": DATA_TABLES}
        (staging / MANIFEST).write_text(json.dumps(manifest))
        os.rename(staging, final)
    except FileExistsError:
        return None  # another process exported the same run first
    except OSError as exc:
        raise StoreError(f"{final}: cannot export run {run_id}: {exc}") from exc
    finally:
        if staging.exists():
            shutil.rmtree(staging)  # our own staging folder only
    return final


def import_runs(store: ResultStore, root: str | Path) -> ImportReport:
    """Copy every exported run under `root` that `store` does not hold, one transaction each."""
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise StoreError(f"{root}: no such folder of exported runs (SWAY_RESULTS_EXPORT)")
    report = ImportReport()
    held = {r["run_id"] for r in store.runs()}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            run_id = _manifest_run(folder)
        except StoreError as exc:
            report.refused[folder.name] = str(exc)
            continue
        if run_id in held:
            report.held.append(run_id)
            continue
        store.run(partial(_copy_run, folder=folder))
        held.add(run_id)
        report.imported.append(run_id)
    return report


def _manifest_run(folder: Path) -> str:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise StoreError(f"{folder}: not an exported sway run ({MANIFEST} unreadable)") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("run_id"), str):
        raise StoreError(f"{folder}: {MANIFEST} names no run_id")
    schema = manifest.get("schema")
    if not isinstance(schema, int) or schema > MIGRATIONS[-1].version:
        raise StoreError(
            f"{folder}: exported by a sway with store schema {schema}, newer than this one "
            f"({MIGRATIONS[-1].version}); upgrade sway where you import"
        )
    missing = [t for t in DATA_TABLES if not (folder / f"{t}.parquet").is_file()]
    if missing:
        raise StoreError(f"{folder}: missing {', '.join(missing)} (a partial copy?)")
    return str(manifest["run_id"])


def _copy_run(con: duckdb.DuckDBPyConnection, folder: Path) -> None:
    """Insert one exported run's rows by column name (an older export's missing columns are
    NULL); the adapter's row only when the store does not know the adapter yet."""
    for table in DATA_TABLES:
        source = f"read_parquet({_literal(folder / f'{table}.parquet')})"
        if table == "adapters":
            con.execute(
                f"INSERT INTO adapters BY NAME SELECT * FROM {source} "
                "WHERE adapter_id NOT IN (SELECT adapter_id FROM adapters)"
            )
        else:
            con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {source}")


def _literal(path: Path) -> str:
    """`path` as a SQL string literal (COPY and read_parquet take no parameters there)."""
    return "'" + str(path).replace("'", "''") + "'"
