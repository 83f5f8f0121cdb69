"""The persistent scoring cache: model results by content, kept under SWAY_HOME between runs.

A result is stored under a key that names everything it depends on: the request (every field,
with each view replaced by its identity), the backend's identity (kind, library versions,
dtype, device, context length and the content hash of the base model's files) and the digest
of sway's own code. A view's identity is the content of the adapter it derives from (weights
and config hashes) plus the view's own fields: a null's seed, mode and scale, a scaled copy's
lambda. So re-evaluating an unchanged adapter computes nothing, a changed prompt recomputes only
its own requests, and any change to the model, the adapter or sway's code misses.

Storage is one sqlite file (`<home>/cache/scores.sqlite`, see `ScoreCache.open_default`):
several Dagster step processes may write at once, which sqlite serialises and DuckDB refuses.
Values are a small JSON header and raw numpy bytes (never pickle), each stored with its
blake2b digest; an entry whose digest does not match is dropped and recomputed. A file that is
not sway's cache is never written: it is ignored with a warning. The total size is bounded; the
least recently used entries go first.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import numpy as np

from sway_engine.adapters import file_sha256
from sway_engine.requests import (
    AdapterWeights,
    ContinuationResult,
    DivergenceResult,
    Embed,
    EmbeddingResult,
    GenerationResult,
    Request,
    Result,
    RollingResult,
    SequenceDivergenceResult,
    TokenDist,
)
from sway_engine.views import Base, Finetuned, Null, Scaled, View

log = logging.getLogger(__name__)

MAGIC = "sway-score-cache"
SCHEMA = 1
DEFAULT_MB = 2048
FILE_NAME = "scores.sqlite"
OFF = ("0", "off", "false", "no")
# Requests a backend key is never built for: embeddings come from the embedding model, not
# the model under test (`embed_key` names them by that model instead); adapter weights are
# read from memory in milliseconds and would store the base model's tensors.
NOT_STORED = (Embed, AdapterWeights)


@dataclass(frozen=True)
class Identity:
    """What a backend computes with: `backend` digests the model, `view` names a view by
    content (None: this view cannot be named, its requests are not stored), `decode` turns
    token ids back into strings for a stored TokenDist."""

    backend: str
    view: Callable[[View], str | None]
    decode: Callable[[list[int]], list[str]] | None = None


@functools.cache
def code_digest() -> str:
    """sha256 of sway_engine's Python sources: a change to sway's code misses every entry."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def request_key(identity: Identity, req: Request) -> bytes | None:
    """The content key of one request on this backend (None: it is not stored)."""
    if isinstance(req, NOT_STORED):
        return None
    parts = [MAGIC, str(SCHEMA), code_digest(), identity.backend, type(req).__name__]
    for f in fields(req):
        value = getattr(req, f.name)
        if isinstance(value, Base | Finetuned | Scaled | Null):
            named = identity.view(value)
            if named is None:
                return None
            parts.append(f"{f.name}=<{named}>")
        else:
            parts.append(f"{f.name}={value!r}")
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def derived_key(identity: Identity, parts: Sequence[str], views: Sequence[View]) -> bytes | None:
    """The content key of a value derived from `views` on this backend's model (a weight
    probe's measurements: `Instrumented.remember`); None where a view cannot be named."""
    named = [identity.view(v) for v in views]
    if any(n is None for n in named):
        return None
    head = [MAGIC, str(SCHEMA), code_digest(), identity.backend, "derived", *parts]
    return hashlib.sha256("\x1f".join([*head, *(f"<{n}>" for n in named)]).encode()).digest()


def embed_key(embedder: str, req: Embed) -> bytes:
    """The content key of an `Embed` request under the embedding model `embedder`."""
    parts = [MAGIC, str(SCHEMA), code_digest(), "embed", embedder, *req.texts]
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def view_identity(view: View, adapter_id: str | None) -> str | None:
    """A view named by content: its fields with the adapter label replaced by `adapter_id`
    (the identity of the trained adapter it derives from; None: unknown, not stored)."""
    if not hasattr(view, "adapter"):
        return repr(view)  # Base
    if adapter_id is None:
        return None
    named: Any = view
    return repr(replace(named, adapter=adapter_id))


def row_key(backend: str, row: Any) -> bytes:
    """The content key of one base-model row (`backends.rows.Row`) on backend `backend`."""
    head = "\x1f".join([MAGIC, str(SCHEMA), code_digest(), backend, "row", str(row.last)])
    ids = np.asarray(row.ids, dtype=np.int64).tobytes()
    return hashlib.sha256(head.encode() + b"\0" + ids).digest()


def encode_row(value: np.ndarray) -> bytes:
    """A row's log-probs: dtype, shape and raw bytes."""
    value = np.ascontiguousarray(value)
    header = json.dumps([value.dtype.str, list(value.shape)]).encode()
    return struct.pack("<I", len(header)) + header + value.tobytes()


def decode_row(blob: bytes) -> np.ndarray | None:
    """The row `encode_row` wrote, or None (with a warning) where it is malformed."""
    try:
        (size,) = struct.unpack_from("<I", blob)
        dtype, shape = json.loads(blob[4 : 4 + size])
        dt = np.dtype(dtype)
        if dt.kind != "f":
            raise ValueError(f"dtype {dtype}")
        out = np.frombuffer(blob, dt, offset=4 + size).reshape(shape)
    except (ValueError, TypeError, struct.error) as exc:
        log.warning("a stored base row could not be read (%s); recomputing it", exc)
        return None
    return out.copy()


# ---- values: a JSON header and raw numpy bytes ----

_TYPES: dict[str, type] = {
    t.__name__: t
    for t in (
        TokenDist,
        DivergenceResult,
        RollingResult,
        SequenceDivergenceResult,
        ContinuationResult,
        GenerationResult,
        EmbeddingResult,
    )
}
_SKIP = ("decode",)  # TokenDist's decoder is reattached on load


def encode(result: Result) -> bytes | None:
    """A result as bytes (None for a type this cache does not store)."""
    name = type(result).__name__
    if name not in _TYPES:
        return None
    scalars: dict[str, Any] = {}
    arrays: list[tuple[str, np.ndarray]] = []
    for f in fields(result):
        if f.name in _SKIP:
            continue
        value = getattr(result, f.name)
        if isinstance(value, np.ndarray):
            arrays.append((f.name, np.ascontiguousarray(value)))
        else:
            scalars[f.name] = value
    header = json.dumps(
        {
            "t": name,
            "s": scalars,
            "a": [[n, a.dtype.str, list(a.shape)] for n, a in arrays],
        },
        allow_nan=True,
    ).encode()
    return struct.pack("<I", len(header)) + header + b"".join(a.tobytes() for _, a in arrays)


def decode(blob: bytes, decoder: Callable[[list[int]], list[str]] | None) -> Result:
    """The result `encode` wrote (raises ValueError/KeyError on a malformed value)."""
    (size,) = struct.unpack_from("<I", blob)
    header = json.loads(blob[4 : 4 + size])
    cls = _TYPES[header["t"]]
    values: dict[str, Any] = dict(header["s"])
    offset = 4 + size
    for name, dtype, shape in header["a"]:
        dt = np.dtype(dtype)
        if dt.hasobject:
            raise ValueError("object arrays are never stored")
        count = int(np.prod(shape, dtype=np.int64))
        values[name] = np.frombuffer(blob, dt, count, offset).reshape(shape).copy()
        offset += count * dt.itemsize
    if offset != len(blob):
        raise ValueError(f"stored value has {len(blob) - offset} trailing bytes")
    for name, value in values.items():  # JSON gives lists where the result holds tuples
        if isinstance(value, list):
            values[name] = _tuples(value)
    if cls is TokenDist:
        values["decode"] = decoder
    out: Result = cls(**values)
    return out


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def _digest(blob: bytes) -> bytes:
    return hashlib.blake2b(blob, digest_size=16).digest()


# ---- the store ----


class ScoreCache:
    """Content-addressed results in one sqlite file, bounded in bytes (least recently used
    entries evicted). Every failure to read or write is a warning and a miss, never an error:
    a run computes what the cache cannot give."""

    def __init__(self, path: Path, capacity_bytes: int = DEFAULT_MB << 20) -> None:
        self.path = Path(path)
        self.capacity = int(capacity_bytes)
        self.usable = True
        self.stats = {"hits": 0, "misses": 0, "stored": 0, "corrupt": 0, "evicted": 0}
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            self._db = self._open()
        except (sqlite3.Error, OSError, ValueError) as exc:
            self._disable(f"cannot be used ({exc})")

    @classmethod
    def open_default(
        cls, directory: Path | None = None, env: Mapping[str, str] | None = None
    ) -> ScoreCache | None:
        """The cache a run uses (`default_path`), or None where SWAY_SCORE_CACHE is off.
        SWAY_SCORE_CACHE_MB bounds its size (default 2048)."""
        env = os.environ if env is None else env
        if env.get("SWAY_SCORE_CACHE", "").strip().lower() in OFF:
            return None
        raw = env.get("SWAY_SCORE_CACHE_MB", str(DEFAULT_MB))
        try:
            mb = float(raw)
            if not (mb >= 0 and np.isfinite(mb)):
                raise ValueError
        except ValueError:
            log.warning(
                "SWAY_SCORE_CACHE_MB=%r is not a size in MiB (e.g. 2048); using %d",
                raw,
                DEFAULT_MB,
            )
            mb = DEFAULT_MB
        return cls(default_path(directory, env), int(mb * (1 << 20)))

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
        try:
            db.execute("BEGIN IMMEDIATE")  # two processes opening a new cache: one creates it
            try:
                if not db.execute("SELECT name FROM sqlite_master").fetchall():
                    self._create(db)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            meta = dict(db.execute("SELECT name, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            db.close()
            raise ValueError(f"not sway's score cache: {exc}") from exc
        if meta.get("magic") != MAGIC:
            db.close()
            raise ValueError("not sway's score cache (no sway marker)")
        if meta.get("schema") != str(SCHEMA):
            db.close()
            raise ValueError(
                f"written by another sway (cache schema {meta.get('schema')}, this sway reads "
                f"{SCHEMA}); `sway cache clear` starts a new one"
            )
        db.execute("PRAGMA journal_mode=WAL")  # only on sway's own file: it rewrites the header
        return db

    @staticmethod
    def _create(db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.execute(
            "CREATE TABLE results (key BLOB PRIMARY KEY, value BLOB NOT NULL, "
            "digest BLOB NOT NULL, size INTEGER NOT NULL, used REAL NOT NULL)"
        )
        db.execute("CREATE INDEX results_used ON results (used)")
        db.execute(
            "CREATE TABLE files (path TEXT PRIMARY KEY, size INTEGER NOT NULL, "
            "mtime_ns INTEGER NOT NULL, sha256 TEXT NOT NULL)"
        )
        db.executemany(
            "INSERT INTO meta VALUES (?, ?)", [("magic", MAGIC), ("schema", str(SCHEMA))]
        )

    def _disable(self, why: str) -> None:
        if self.usable:
            log.warning("score cache %s %s; this run computes every result", self.path, why)
        self.usable = False

    # ---- results ----

    def get(self, keys: Iterable[bytes]) -> dict[bytes, bytes]:
        """Stored values of the keys found (entries failing their digest are dropped)."""
        keys = list(dict.fromkeys(keys))
        if not keys or not self.usable or self._db is None:
            return {}
        found: dict[bytes, bytes] = {}
        bad: list[bytes] = []
        try:
            with self._lock:
                for i in range(0, len(keys), 500):
                    chunk = keys[i : i + 500]
                    marks = ",".join("?" * len(chunk))
                    for key, value, digest in self._db.execute(
                        f"SELECT key, value, digest FROM results WHERE key IN ({marks})", chunk
                    ):
                        if _digest(value) == digest:
                            found[key] = value
                        else:
                            bad.append(key)
                if found or bad:  # one transaction, not one commit per row
                    now = time.time()
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        self._db.executemany(
                            "UPDATE results SET used = ? WHERE key = ?", [(now, k) for k in found]
                        )
                        self._db.executemany(
                            "DELETE FROM results WHERE key = ?", [(k,) for k in bad]
                        )
                        self._db.execute("COMMIT")
                    except BaseException:
                        self._db.execute("ROLLBACK")
                        raise
        except sqlite3.Error as exc:
            self._disable(f"could not be read ({exc})")
            return {}
        if bad:
            log.warning(
                "score cache %s: %d stored results failed their checksum and are recomputed",
                self.path,
                len(bad),
            )
        self.stats["corrupt"] += len(bad)
        self.stats["hits"] += len(found)
        self.stats["misses"] += len(keys) - len(found)
        return found

    def put(self, items: Mapping[bytes, bytes]) -> None:
        """Store values (one transaction), then evict down to the bound."""
        if not items or not self.usable or self._db is None:
            return
        now = time.time()
        rows = [
            (k, v, _digest(v), len(v), now) for k, v in items.items() if len(v) <= self.capacity
        ]
        try:
            with self._lock:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    self._db.executemany(
                        "INSERT OR REPLACE INTO results VALUES (?, ?, ?, ?, ?)", rows
                    )
                    self._evict()
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
        except sqlite3.Error as exc:
            self._disable(f"could not be written ({exc})")
            return
        self.stats["stored"] += len(rows)

    def _evict(self) -> None:
        assert self._db is not None
        (used,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM results").fetchone()
        if used <= self.capacity:
            return
        target = int(self.capacity * 0.9)
        gone = 0
        for key, size in self._db.execute("SELECT key, size FROM results ORDER BY used").fetchall():
            if used <= target:
                break
            self._db.execute("DELETE FROM results WHERE key = ?", (key,))
            used -= size
            gone += 1
        self.stats["evicted"] += gone

    # ---- file contents (the base model's identity) ----

    def file_sha256(self, path: Path) -> str:
        """sha256 of a file's bytes, remembered by (path, size, mtime) so a large base model is
        read once, not on every run."""
        path = Path(path).resolve()
        st = path.stat()
        row = None
        if self.usable and self._db is not None:
            try:
                with self._lock:
                    row = self._db.execute(
                        "SELECT sha256 FROM files WHERE path = ? AND size = ? AND mtime_ns = ?",
                        (str(path), st.st_size, st.st_mtime_ns),
                    ).fetchone()
            except sqlite3.Error:
                row = None
        if row is not None:
            return str(row[0])
        digest = file_sha256(path)
        if self.usable and self._db is not None:
            try:
                with self._lock:
                    self._db.execute(
                        "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?)",
                        (str(path), st.st_size, st.st_mtime_ns, digest),
                    )
            except sqlite3.Error:
                pass
        return digest

    def directory_digest(self, root: Path) -> str:
        """One digest of every file under a model directory (names and contents)."""
        root = Path(root).resolve()
        h = hashlib.sha256()
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            rel = path.relative_to(root)
            if any(part.startswith(".") for part in rel.parts):
                continue  # .cache/, .git/: not what the model loads
            h.update(str(rel).encode() + b"\0" + self.file_sha256(path).encode())
        return h.hexdigest()

    # ---- what `sway cache` shows and does ----

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": str(self.path), "usable": self.usable}
        out["capacity_mb"] = round(self.capacity / (1 << 20), 1)
        if self.usable and self._db is not None:
            with self._lock:
                n, size = self._db.execute(
                    "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM results"
                ).fetchone()
            out.update(entries=int(n), size_mb=round(size / (1 << 20), 2))
        return out

    def clear(self) -> int:
        """Remove every stored result; returns how many. A cache another sway wrote (another
        schema) is removed whole; a file that is not sway's cache is refused, untouched."""
        if not self.usable or self._db is None:
            if not is_sway_cache(self.path):
                raise ValueError(f"{self.path} is not a usable sway score cache; nothing removed")
            self.close()
            for suffix in ("", "-wal", "-shm"):
                Path(f"{self.path}{suffix}").unlink(missing_ok=True)
            return 0
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM results").fetchone()
            self._db.execute("DELETE FROM results")
            self._db.execute("DELETE FROM files")
        try:
            with self._lock:
                self._db.execute("VACUUM")
        except sqlite3.Error:
            pass
        return int(n)

    def close(self) -> None:
        if self._db is not None:
            with self._lock:
                self._db.close()
            self._db = None


def default_path(directory: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    """Where a run's cache lives: $SWAY_SCORE_CACHE_DIR, else `directory` (a sway home's
    `cache/`), else sway's cache folder ($SWAY_CACHE_DIR, else $XDG_CACHE_HOME/sway, else
    ~/.cache/sway)."""
    env = os.environ if env is None else env
    where = env.get("SWAY_SCORE_CACHE_DIR") or directory or env.get("SWAY_CACHE_DIR")
    if not where:
        where = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sway"
    return Path(where).expanduser() / FILE_NAME


def is_sway_cache(path: Path) -> bool:
    """Whether `path` is a score cache some sway wrote (read only; any schema)."""
    if not Path(path).is_file():
        return False
    try:
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE name = 'magic'").fetchone()
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return row is not None and row[0] == MAGIC
