"""One DuckDB file, short-lived connections: every call opens a connection, runs one
transaction and closes it, so several processes (Dagster steps, the CLI, a notebook) share a
file; writers wait for another process's lock with jittered backoff."""

from __future__ import annotations

import json
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from sway_engine.errors import SwayError
from sway_engine.result import finite, json_safe
from sway_engine.store.schema import JSON_COLUMNS, MIGRATIONS, Migration

if TYPE_CHECKING:
    import duckdb  # imported when a connection opens: `import sway_dagster` stays light

T = TypeVar("T")

_DUCKDB_MAGIC = b"DUCK"
_DUCKDB_MAGIC_OFFSET = 8


class StoreError(SwayError):
    """The result store could not be opened, migrated, read or written."""


class Database:
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
        return self.query(
            "SELECT version, description, applied_at FROM schema_migrations ORDER BY version"
        )

    def query(self, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]]:
        """Run one SELECT; rows as dicts with JSON text columns decoded."""

        def work(con: duckdb.DuckDBPyConnection) -> list[dict[str, Any]]:
            cursor = con.execute(sql, params or [])
            names = [d[0] for d in cursor.description or []]
            return [decode_row(dict(zip(names, row, strict=True))) for row in cursor.fetchall()]

        return self.run(work)

    def run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
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
        "INSERT INTO schema_migrations VALUES (?, ?, ?)", [step.version, step.description, now()]
    )


def _rollback(con: duckdb.DuckDBPyConnection) -> None:
    try:
        con.rollback()
    except duckdb.Error:
        return


def count(value: float | int | None) -> int | None:
    number = finite(value)
    return int(number) if number is not None else None


def json_text(value: Any) -> str:
    return json.dumps(json_safe(value), sort_keys=True, allow_nan=False, default=str)


def decode_row(row: dict[str, Any]) -> dict[str, Any]:
    for name in JSON_COLUMNS.intersection(row):
        if isinstance(row[name], str):
            row[name] = json.loads(row[name])
    return row


def now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


def naive_utc(moment: datetime | None) -> datetime | None:
    """TIMESTAMP columns hold naive UTC; aware datetimes are converted."""
    if moment is None or moment.tzinfo is None:
        return moment
    return moment.astimezone(UTC).replace(tzinfo=None)


def parse_time(name: str, text: str) -> datetime | None:
    if not text:
        return None
    try:
        return naive_utc(datetime.fromisoformat(text))
    except ValueError as exc:
        raise StoreError(f"suite.{name}: not an ISO 8601 time: {text!r}") from exc
