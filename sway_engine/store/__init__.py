"""DuckDB result store: adapters, null calibration, probe results, scores and runs.

`db.py` holds the connections (one transaction per call, lock retries, migrations), `schema.py`
the numbered migrations, `results.py` what sway writes and reads: append-only evaluations.
"""

from sway_engine.store.db import Database, StoreError, snapshot
from sway_engine.store.results import (
    COMPLETE,
    FAILED,
    INCOMPLETE,
    AdapterRecord,
    ResultStore,
    RunRecord,
    result_from_row,
    run_record,
)
from sway_engine.store.schema import MIGRATIONS, Migration

__all__ = [
    "COMPLETE",
    "FAILED",
    "INCOMPLETE",
    "MIGRATIONS",
    "AdapterRecord",
    "Database",
    "Migration",
    "ResultStore",
    "RunRecord",
    "StoreError",
    "result_from_row",
    "run_record",
    "snapshot",
]
