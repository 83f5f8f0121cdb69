"""DuckDB result store: adapters, null calibration, probe results, scores and runs.

Every public method opens its own connection, runs one transaction and closes it, so several
processes (Dagster steps, the CLI, a notebook) can share one file; writers wait for the lock.
"""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sway_engine.errors import SwayError
from sway_engine.result import ProbeResult, SuiteResult, SwayScore, finite, json_safe

if TYPE_CHECKING:
    import duckdb  # imported when a connection opens: `import sway_dagster` stays light

T = TypeVar("T")

_DUCKDB_MAGIC = b"DUCK"
_DUCKDB_MAGIC_OFFSET = 8
_DATA_TABLES = ("adapters", "null_calibration", "probe_results", "scores", "runs")
_JSON_COLUMNS = frozenset({"target_modules", "evidence", "components", "findings", "stats"})


class StoreError(SwayError):
    """The result store could not be opened, migrated, read or written."""


@dataclass(frozen=True)
class Migration:
    """One numbered schema step; its statements run in a single transaction."""

    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "adapters registry",
        (
            """CREATE TABLE adapters (
                adapter_id VARCHAR PRIMARY KEY,
                name VARCHAR,
                path VARCHAR,
                sha256 VARCHAR,
                size_bytes BIGINT,
                base_model VARCHAR,
                rank INTEGER,
                alpha DOUBLE,
                target_modules VARCHAR,
                preflight_ok BOOLEAN,
                preflight_message VARCHAR,
                registered_at TIMESTAMP
            )""",
        ),
    ),
    Migration(
        2,
        "null calibration samples",
        (
            """CREATE TABLE null_calibration (
                adapter_id VARCHAR NOT NULL,
                spec_hash VARCHAR NOT NULL,
                probe VARCHAR NOT NULL,
                kind VARCHAR,
                seed INTEGER,
                rank_scale DOUBLE,
                raw DOUBLE
            )""",
        ),
    ),
    Migration(
        3,
        "probe results and scores",
        (
            """CREATE TABLE probe_results (
                adapter_id VARCHAR NOT NULL,
                spec_hash VARCHAR NOT NULL,
                probe VARCHAR NOT NULL,
                kind VARCHAR,
                category VARCHAR,
                verdict VARCHAR,
                score DOUBLE,
                raw DOUBLE,
                z DOUBLE,
                p DOUBLE,
                ci_lo DOUBLE,
                ci_hi DOUBLE,
                null_mean DOUBLE,
                null_std DOUBLE,
                null_n INTEGER,
                message VARCHAR,
                evidence VARCHAR,
                duration_s DOUBLE,
                dagster_run_id VARCHAR,
                recorded_at TIMESTAMP
            )""",
            """CREATE TABLE scores (
                adapter_id VARCHAR NOT NULL,
                spec_hash VARCHAR NOT NULL,
                overall DOUBLE,
                band VARCHAR,
                components VARCHAR,
                gate_passed BOOLEAN,
                findings VARCHAR,
                dagster_run_id VARCHAR,
                recorded_at TIMESTAMP
            )""",
        ),
    ),
    Migration(
        4,
        "run ledger",
        (
            """CREATE TABLE runs (
                run_id VARCHAR PRIMARY KEY,
                adapter_id VARCHAR,
                spec_hash VARCHAR,
                engine_version VARCHAR,
                dagster_run_id VARCHAR,
                mlflow_run_id VARCHAR,
                backend_kind VARCHAR,
                started_at TIMESTAMP,
                finished_at TIMESTAMP,
                wall_s DOUBLE,
                forward_passes BIGINT,
                tokens_forwarded BIGINT,
                cache_hits BIGINT,
                stats VARCHAR
            )""",
        ),
    ),
)


@dataclass(frozen=True)
class AdapterRecord:
    """One registered adapter, as found on disk and checked by preflight."""

    adapter_id: str
    name: str
    path: str
    sha256: str | None = None
    size_bytes: int | None = None
    base_model: str | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: tuple[str, ...] = ()
    preflight_ok: bool | None = None
    preflight_message: str | None = None
    registered_at: datetime | None = None


@dataclass(frozen=True)
class NullRow:
    """The raw metric of one probe under one null adapter (seed, rank multiplier)."""

    probe: str
    kind: str
    seed: int
    rank_scale: float
    raw: float | None


@dataclass(frozen=True)
class RunRecord:
    """One sway run of one adapter: provenance, timings and backend counters."""

    run_id: str
    adapter_id: str
    spec_hash: str
    engine_version: str | None = None
    dagster_run_id: str | None = None
    mlflow_run_id: str | None = None
    backend_kind: str | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    wall_s: float | None = None
    forward_passes: int | None = None
    tokens_forwarded: int | None = None
    cache_hits: int | None = None
    stats: Mapping[str, Any] = field(default_factory=dict)


class ResultStore:
    """Short-lived connections to one DuckDB file; schema migrated on first use."""

    def __init__(
        self,
        database: str | Path,
        *,
        lock_timeout_s: float = 10.0,
        retry_initial_s: float = 0.05,
        retry_max_s: float = 1.0,
    ) -> None:
        self.path = Path(database).expanduser().absolute()
        self.lock_timeout_s = lock_timeout_s
        self.retry_initial_s = retry_initial_s
        self.retry_max_s = retry_max_s
        self._migrated = False

    def migrate(self) -> int:
        """Apply missing migrations in order, one transaction each; return the schema version."""
        current = self._transact(_prepare_migrations)
        known = MIGRATIONS[-1].version
        if current > known:
            raise StoreError(
                f"{self.path}: schema version {current} is newer than this sway knows "
                f"({known}); upgrade sway or point SWAY_HOME elsewhere"
            )
        for step in MIGRATIONS:
            if step.version > current:
                self._transact(partial(_apply_migration, step=step))
        self._migrated = True
        return known

    def migrations(self) -> list[dict[str, Any]]:
        """Applied migrations, oldest first."""
        return self._query(
            "SELECT version, description, applied_at FROM schema_migrations ORDER BY version"
        )

    def upsert_adapter(self, record: AdapterRecord) -> None:
        """Insert or replace the adapter row keyed by `adapter_id`."""
        row = [
            record.adapter_id,
            record.name,
            record.path,
            record.sha256,
            record.size_bytes,
            record.base_model,
            record.rank,
            finite(record.alpha),
            _json_text(list(record.target_modules)),
            record.preflight_ok,
            record.preflight_message,
            _naive_utc(record.registered_at) or _now(),
        ]
        self._run(
            lambda con: con.execute(
                "INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", row
            )
        )

    def write_null_calibration(
        self, adapter_id: str, spec_hash: str, rows: Iterable[NullRow]
    ) -> int:
        """Replace the null samples of every probe present in `rows`; return rows written."""
        listed = list(rows)
        values = [
            [adapter_id, spec_hash, r.probe, r.kind, r.seed, finite(r.rank_scale), finite(r.raw)]
            for r in listed
        ]
        probes = sorted({r.probe for r in listed})

        def work(con: duckdb.DuckDBPyConnection) -> int:
            for probe in probes:
                con.execute(
                    "DELETE FROM null_calibration WHERE adapter_id = ? AND spec_hash = ? "
                    "AND probe = ?",
                    [adapter_id, spec_hash, probe],
                )
            if values:
                con.executemany("INSERT INTO null_calibration VALUES (?, ?, ?, ?, ?, ?, ?)", values)
            return len(values)

        return self._run(work)

    def write_probe_result(
        self,
        adapter_id: str,
        spec_hash: str,
        result: ProbeResult,
        dagster_run_id: str | None = None,
    ) -> int:
        """Replace the row of (adapter, probe, spec); return rows written."""
        recorded_at = _now()
        return self._run(
            lambda con: _put_probe(con, adapter_id, spec_hash, result, dagster_run_id, recorded_at)
        )

    def write_score(
        self,
        adapter_id: str,
        spec_hash: str,
        score: SwayScore,
        gate_passed: bool,
        dagster_run_id: str | None = None,
    ) -> None:
        """Replace the score of (adapter, spec)."""
        recorded_at = _now()
        self._run(
            lambda con: _put_score(
                con, adapter_id, spec_hash, score, gate_passed, dagster_run_id, recorded_at
            )
        )

    def write_run(self, record: RunRecord) -> None:
        """Insert or replace the run row keyed by `run_id`."""
        self._run(lambda con: _put_run(con, record))

    def write_suite(
        self,
        adapter_id: str,
        suite: SuiteResult,
        gate_passed: bool,
        run_id: str,
        dagster_run_id: str | None = None,
        mlflow_run_id: str | None = None,
    ) -> int:
        """Write a suite's probe rows, score and run in one transaction; return probe rows."""
        record = RunRecord(
            run_id=run_id,
            adapter_id=adapter_id,
            spec_hash=suite.spec_hash,
            engine_version=suite.sway_version,
            dagster_run_id=dagster_run_id,
            mlflow_run_id=mlflow_run_id,
            backend_kind=suite.backend_kind,
            started_at=_parse_time("started_at", suite.started_at),
            finished_at=_parse_time("finished_at", suite.finished_at),
            wall_s=suite.wall_s,
            forward_passes=_count(suite.backend_stats.get("forward_passes")),
            tokens_forwarded=_count(suite.backend_stats.get("tokens_forwarded")),
            cache_hits=_count(suite.backend_stats.get("cache_hits")),
            stats=dict(suite.backend_stats),
        )
        recorded_at = _now()

        def work(con: duckdb.DuckDBPyConnection) -> int:
            written = 0
            for result in suite.probes:
                written += _put_probe(
                    con, adapter_id, suite.spec_hash, result, dagster_run_id, recorded_at
                )
            _put_score(
                con,
                adapter_id,
                suite.spec_hash,
                suite.score,
                gate_passed,
                dagster_run_id,
                recorded_at,
            )
            _put_run(con, record)
            return written

        return self._run(work)

    def probe_results(self, adapter_id: str | None = None) -> list[dict[str, Any]]:
        """Probe rows (JSON columns decoded), optionally of one adapter."""
        sql = "SELECT * FROM probe_results"
        params: list[Any] = []
        if adapter_id is not None:
            sql += " WHERE adapter_id = ?"
            params.append(adapter_id)
        return self._query(sql + " ORDER BY adapter_id, spec_hash, probe", params)

    def null_calibration(self, adapter_id: str | None = None) -> list[dict[str, Any]]:
        """Null calibration rows, optionally of one adapter."""
        sql = "SELECT * FROM null_calibration"
        params: list[Any] = []
        if adapter_id is not None:
            sql += " WHERE adapter_id = ?"
            params.append(adapter_id)
        return self._query(sql + " ORDER BY adapter_id, spec_hash, probe, rank_scale, seed", params)

    def scores(self) -> list[dict[str, Any]]:
        """Every score row, newest first."""
        return self._query("SELECT * FROM scores ORDER BY recorded_at DESC, adapter_id")

    def adapters(self) -> list[dict[str, Any]]:
        """Every registered adapter."""
        return self._query("SELECT * FROM adapters ORDER BY adapter_id")

    def runs(self) -> list[dict[str, Any]]:
        """Every run, newest first."""
        return self._query("SELECT * FROM runs ORDER BY started_at DESC NULLS LAST, run_id")

    def leaderboard(self, spec_hash: str | None = None) -> list[dict[str, Any]]:
        """Latest score per adapter, best first (gate-passing adapters first, then by overall),
        with verdict counts of the same spec."""
        where = "WHERE spec_hash = ?" if spec_hash is not None else ""
        params = [spec_hash] if spec_hash is not None else []
        sql = f"""
            WITH latest AS (
                SELECT * FROM scores {where}
                QUALIFY row_number() OVER (
                    PARTITION BY adapter_id ORDER BY recorded_at DESC, spec_hash
                ) = 1
            ),
            counts AS (
                SELECT adapter_id, spec_hash,
                    count(*) FILTER (WHERE verdict = 'pass') AS n_pass,
                    count(*) FILTER (WHERE verdict = 'fail') AS n_fail,
                    count(*) FILTER (WHERE verdict = 'error') AS n_error,
                    count(*) AS n_probes
                FROM probe_results GROUP BY adapter_id, spec_hash
            )
            SELECT
                row_number() OVER (
                    ORDER BY l.gate_passed DESC NULLS LAST, l.overall DESC NULLS LAST, l.adapter_id
                ) AS rank,
                l.adapter_id,
                coalesce(a.name, l.adapter_id) AS name,
                l.spec_hash,
                l.overall,
                l.band,
                l.gate_passed,
                coalesce(c.n_pass, 0) AS n_pass,
                coalesce(c.n_fail, 0) AS n_fail,
                coalesce(c.n_error, 0) AS n_error,
                coalesce(c.n_probes, 0) AS n_probes,
                l.recorded_at
            FROM latest l
            LEFT JOIN adapters a ON a.adapter_id = l.adapter_id
            LEFT JOIN counts c ON c.adapter_id = l.adapter_id AND c.spec_hash = l.spec_hash
            ORDER BY rank
        """
        return self._query(sql, params)

    def row_counts(self) -> dict[str, int]:
        """Number of rows in each data table."""

        def work(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
            counts: dict[str, int] = {}
            for table in _DATA_TABLES:
                row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
                counts[table] = int(row[0]) if row else 0
            return counts

        return self._run(work)

    def seen_adapter_ids(self) -> set[str]:
        """Adapter ids that appear in any table."""
        union = " UNION ".join(f"SELECT adapter_id FROM {t}" for t in _DATA_TABLES)
        rows = self._query(
            f"SELECT DISTINCT adapter_id FROM ({union}) WHERE adapter_id IS NOT NULL"
        )
        return {r["adapter_id"] for r in rows}

    def _query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run one SELECT; rows as dicts with JSON text columns decoded."""

        def work(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description or []]
            return [_decode_row(dict(zip(names, row, strict=True))) for row in cursor.fetchall()]

        return self._run(work)

    def _run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Migrate if this store has not yet, then run `work` in one transaction."""
        if not self._migrated:
            self.migrate()
        return self._transact(work)

    def _transact(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` in one transaction on a fresh connection, retrying lock and conflicts."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = self.retry_initial_s
        while True:
            try:
                return self._attempt(work)
            except _Contended as busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(
                        f"{self.path}: another process holds the lock on this DuckDB database "
                        f"(gave up after {self.lock_timeout_s:g} s): {busy}"
                    ) from busy.__cause__
                time.sleep(min(delay * (0.5 + random.random()), remaining))
                delay = min(delay * 2, self.retry_max_s)

    def _attempt(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        import duckdb

        con = self._connect()
        try:
            con.begin()
            try:
                result = work(con)
                con.commit()
            except BaseException:
                _rollback(con)
                raise
            return result
        except duckdb.TransactionException as exc:
            if "conflict" in str(exc).lower():
                raise _Contended(str(exc)) from exc
            raise StoreError(f"{self.path}: {exc}") from exc
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        finally:
            con.close()

    def _connect(self) -> duckdb.DuckDBPyConnection:
        import duckdb

        self._refuse_foreign_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create its folder: {exc}") from exc
        try:
            return duckdb.connect(str(self.path))
        except duckdb.IOException as exc:
            text = str(exc)
            if "lock" in text.lower():
                raise _Contended(text) from exc
            if "not a valid duckdb" in text.lower():
                raise self._foreign_error() from exc
            raise StoreError(f"{self.path}: cannot open: {text}") from exc
        except duckdb.Error as exc:
            raise StoreError(f"{self.path}: cannot open: {exc}") from exc

    def _refuse_foreign_file(self) -> None:
        """Raise before DuckDB touches a file whose header is not DuckDB's."""
        if not self.path.is_file():
            return
        with self.path.open("rb") as fh:
            head = fh.read(_DUCKDB_MAGIC_OFFSET + len(_DUCKDB_MAGIC))
        if len(head) == _DUCKDB_MAGIC_OFFSET + len(_DUCKDB_MAGIC) and not head.endswith(
            _DUCKDB_MAGIC
        ):
            raise self._foreign_error()

    def _foreign_error(self) -> StoreError:
        return StoreError(
            f"{self.path}: not a DuckDB database; move it aside or point SWAY_HOME elsewhere"
        )


class _Contended(Exception):
    """Internal: the file lock is held elsewhere or the transaction conflicted; retry."""


def _prepare_migrations(con: duckdb.DuckDBPyConnection) -> int:
    """Create the migrations table if needed; return the applied schema version."""
    con.execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        "version INTEGER PRIMARY KEY, description VARCHAR, applied_at TIMESTAMP)"
    )
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


def _apply_migration(con: duckdb.DuckDBPyConnection, step: Migration) -> None:
    """Apply `step` unless another connection already did."""
    done = con.execute(
        "SELECT count(*) FROM schema_migrations WHERE version = ?", [step.version]
    ).fetchone()
    if done and done[0]:
        return
    for statement in step.statements:
        con.execute(statement)
    con.execute(
        "INSERT INTO schema_migrations VALUES (?, ?, ?)", [step.version, step.description, _now()]
    )


def _put_probe(
    con: duckdb.DuckDBPyConnection,
    adapter_id: str,
    spec_hash: str,
    result: ProbeResult,
    dagster_run_id: str | None,
    recorded_at: datetime,
) -> int:
    con.execute(
        "DELETE FROM probe_results WHERE adapter_id = ? AND spec_hash = ? AND probe = ?",
        [adapter_id, spec_hash, result.name],
    )
    ci_lo, ci_hi = result.ci_95 if result.ci_95 is not None else (None, None)
    null = result.null
    con.execute(
        "INSERT INTO probe_results VALUES "
        "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            adapter_id,
            spec_hash,
            result.name,
            result.kind,
            result.category,
            result.verdict.value,
            finite(result.score),
            finite(result.raw),
            finite(result.z),
            finite(result.p),
            finite(ci_lo),
            finite(ci_hi),
            finite(null.mean) if null else None,
            finite(null.std) if null else None,
            null.n if null else None,
            result.message,
            _json_text(result.evidence),
            finite(result.duration_s),
            dagster_run_id,
            recorded_at,
        ],
    )
    return 1


def _put_score(
    con: duckdb.DuckDBPyConnection,
    adapter_id: str,
    spec_hash: str,
    score: SwayScore,
    gate_passed: bool,
    dagster_run_id: str | None,
    recorded_at: datetime,
) -> None:
    con.execute(
        "DELETE FROM scores WHERE adapter_id = ? AND spec_hash = ?", [adapter_id, spec_hash]
    )
    con.execute(
        "INSERT INTO scores VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            adapter_id,
            spec_hash,
            finite(score.overall),
            score.band,
            _json_text(score.components),
            gate_passed,
            _json_text(list(score.findings)),
            dagster_run_id,
            recorded_at,
        ],
    )


def _put_run(con: duckdb.DuckDBPyConnection, record: RunRecord) -> None:
    con.execute(
        "INSERT OR REPLACE INTO runs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            record.run_id,
            record.adapter_id,
            record.spec_hash,
            record.engine_version,
            record.dagster_run_id,
            record.mlflow_run_id,
            record.backend_kind,
            _naive_utc(record.started_at),
            _naive_utc(record.finished_at),
            finite(record.wall_s),
            record.forward_passes,
            record.tokens_forwarded,
            record.cache_hits,
            _json_text(dict(record.stats)),
        ],
    )


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.rollback()
    except duckdb.Error:
        return


def _count(value: float | int | None) -> int | None:
    number = finite(value)
    return int(number) if number is not None else None


def _json_text(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False, default=str)


def _decode_row(row: dict[str, Any]) -> dict[str, Any]:
    for name in _JSON_COLUMNS.intersection(row):
        if isinstance(row[name], str):
            row[name] = json.loads(row[name])
    return row


def _now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def _naive_utc(moment: datetime | None) -> datetime | None:
    """TIMESTAMP columns hold naive UTC; aware datetimes are converted."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def _parse_time(name: str, text: str) -> datetime | None:
    if not text:
        return None
    try:
        return _naive_utc(datetime.fromisoformat(text))
    except ValueError as exc:
        raise StoreError(f"suite.{name}: not an ISO 8601 time: {text!r}") from exc
