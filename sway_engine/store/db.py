"""One DuckDB file, short-lived connections: every call opens a connection, runs one
transaction and closes it, so several processes (Dagster steps, the CLI, a notebook) share a
file; writers wait for another process's lock with jittered backoff.

DuckDB lets one process write or many read (read-only), never both. So sway's reads open
read-only (they run beside a notebook's read-only connection), writes wait up to
`lock_timeout_s` (a minute: the rows of a computed probe are worth waiting for), and a
notebook that wants to keep a connection open takes a private copy with `snapshot`."""

from __future__ import annotations

import json
import random
import re
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
        lock_timeout_s: float = 60.0,
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

        return self.read(work)

    def read(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Run `work` on a read-only connection (it must not write). A store not yet created
        or migrated is migrated first, which writes once."""
        if not self._migrated and not self._current_readonly():
            self.migrate()
        return self._transact(work, read_only=True)

    def run(self, work: Callable[[duckdb.DuckDBPyConnection], T]) -> T:
        """Migrate if this store has not yet, then run `work` in one transaction."""
        if not self._migrated:
            self.migrate()
        return self._transact(work)

    def _current_readonly(self) -> bool:
        """True when the file exists at the schema this sway knows (checked read-only)."""
        if not self.path.is_file():
            return False
        try:
            version = self._transact(_applied_version, read_only=True)
        except StoreError:
            return False
        self._migrated = version == MIGRATIONS[-1].version
        return self._migrated

    def _transact(
        self, work: Callable[[duckdb.DuckDBPyConnection], T], *, read_only: bool = False
    ) -> T:
        """Run `work` in one transaction on a fresh connection, retrying lock and conflicts."""
        deadline = time.monotonic() + self.lock_timeout_s
        delay = self.retry_initial_s
        while True:
            try:
                return self._attempt(work, read_only)
            except _Contended as busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StoreError(
                        f"{self.path}: another process holds the lock on this DuckDB database "
                        f"(gave up after {self.lock_timeout_s:g} s){_holder(str(busy))}. A "
                        "connection left open blocks every writer (a notebook: close it, or read "
                        "a private copy from sway_engine.store.snapshot)"
                    ) from busy.__cause__
                time.sleep(min(delay * (0.5 + random.random()), remaining))
                delay = min(delay * 2, self.retry_max_s)

    def _attempt(self, work: Callable[[duckdb.DuckDBPyConnection], T], read_only: bool) -> T:
        import duckdb

        con = self._connect(read_only)
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

    def _connect(self, read_only: bool = False) -> duckdb.DuckDBPyConnection:
        import duckdb

        self._refuse_foreign_file()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"{self.path}: cannot create its folder: {exc}") from exc
        try:
            return duckdb.connect(str(self.path), read_only=read_only)
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


def snapshot(database: str | Path, dest: str | Path | None = None) -> duckdb.DuckDBPyConnection:
    """A read-only connection to a private, consistent copy of the store (taken under a brief
    shared lock), for notebooks: keep it open as long as you like, evaluations keep writing.
    The copy goes to `dest`, else to a temporary file removed when the process exits."""
    import atexit
    import os
    import tempfile

    import duckdb

    source = Path(database).expanduser().absolute()
    if not source.is_file():
        raise StoreError(f"{source}: no result store there")
    if dest is None:
        handle, name = tempfile.mkstemp(prefix="sway-snapshot-", suffix=".duckdb")
        os.close(handle)
        os.unlink(name)
        target = Path(name)
        atexit.register(lambda: target.unlink(missing_ok=True))
    else:
        target = Path(dest).expanduser().absolute()
        if target.exists():
            raise StoreError(f"{target}: already exists; snapshot writes only new files")
    copier = duckdb.connect()
    try:
        copier.execute(f"ATTACH {_literal(source)} AS live (READ_ONLY)")
        copier.execute(f"ATTACH {_literal(target)} AS copy")
        copier.execute("COPY FROM DATABASE live TO copy")
    except duckdb.Error as exc:
        raise StoreError(f"{source}: cannot copy a snapshot: {exc}") from exc
    finally:
        copier.close()
    return duckdb.connect(str(target), read_only=True)


def _literal(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def _holder(message: str) -> str:
    """', held by PID N (program)' from DuckDB's lock error, when it names the holder."""
    found = re.search(r"held in (.+?) \(PID (\d+)\)", message)
    return f", held by PID {found.group(2)} ({found.group(1)})" if found else ""


def _applied_version(con: duckdb.DuckDBPyConnection) -> int:
    """The applied schema version, 0 for a store without a migrations table (read-only)."""
    tables = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'schema_migrations'"
    ).fetchone()
    if not tables or not tables[0]:
        return 0
    row = con.execute("SELECT coalesce(max(version), 0) FROM schema_migrations").fetchone()
    return int(row[0]) if row else 0


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
