"""Records and row codecs of the result store: adapter and run records, an engine result to a
probe row and back, scores and runs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sway_engine.adapters import AdapterInfo
from sway_engine.result import NullStats, ProbeResult, SuiteResult, SwayScore, Verdict, finite
from sway_engine.store.db import count, json_text, naive_utc, now, parse_time

if TYPE_CHECKING:
    import duckdb

COMPLETE, INCOMPLETE, FAILED = "complete", "incomplete", "failed"


@dataclass(frozen=True)
class RunRecord:
    """One evaluation of one adapter: provenance, timings, backend counters and status."""

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
    status: str = INCOMPLETE
    origin: str | None = None
    message: str | None = None


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

    @classmethod
    def checked(cls, adapter_id: str, info: AdapterInfo) -> AdapterRecord:
        """The record of an adapter read and checked by `read_adapter`."""
        return cls(
            adapter_id=adapter_id,
            name=info.path.name,
            path=str(info.path),
            sha256=info.sha256,
            size_bytes=info.size_bytes,
            base_model=info.base_model,
            rank=info.rank,
            alpha=info.alpha,
            target_modules=info.target_modules,
            preflight_ok=True,
            preflight_message="all tensors finite",
        )


def run_record(
    run_id: str,
    adapter_id: str,
    suite: SuiteResult,
    *,
    dagster_run_id: str | None = None,
    mlflow_run_id: str | None = None,
    origin: str = "cli",
) -> RunRecord:
    """The complete run row of a finished suite result."""
    st = suite.backend_stats
    return RunRecord(
        run_id=run_id,
        adapter_id=adapter_id,
        spec_hash=suite.spec_hash,
        engine_version=suite.sway_version,
        dagster_run_id=dagster_run_id,
        mlflow_run_id=mlflow_run_id,
        backend_kind=suite.backend_kind,
        started_at=parse_time("started_at", suite.started_at),
        finished_at=parse_time("finished_at", suite.finished_at),
        wall_s=suite.wall_s,
        forward_passes=count(st.get("forward_passes")),
        tokens_forwarded=count(st.get("tokens_forwarded")),
        cache_hits=count(st.get("cache_hits")),
        stats=dict(st),
        status=COMPLETE,
        origin=origin,
    )


def result_from_row(row: Mapping[str, Any]) -> ProbeResult:
    """A stored probe row as the engine's result (null samples are not stored per row)."""
    null = None
    if row.get("null_n"):
        null = NullStats(
            mean=_num(row["null_mean"]),
            std=_num(row["null_std"]),
            n=int(row["null_n"]),
            samples=(),
            degenerate=row["null_std"] is None,
        )
    ci = (row["ci_lo"], row["ci_hi"]) if row.get("ci_lo") is not None else None
    evidence = row.get("evidence")
    return ProbeResult(
        name=row["probe"],
        kind=row["kind"],
        category=row["category"],
        verdict=Verdict(row["verdict"]),
        message=row["message"] or "",
        score=row["score"],
        raw=row["raw"],
        z=row["z"],
        p=row["p"],
        ci_95=ci,
        null=null,
        evidence=evidence if isinstance(evidence, dict) else {},
        duration_s=row["duration_s"] or 0.0,
    )


def _num(value: float | None) -> float:
    return math.nan if value is None else float(value)


def computed_in(con: duckdb.DuckDBPyConnection, run_id: str, probe: str) -> str | None:
    """The Dagster run that computed the run's stored row of `probe` (kept on rewrite)."""
    row = con.execute(
        "SELECT dagster_run_id FROM probe_results WHERE run_id = ? AND probe = ? LIMIT 1",
        [run_id, probe],
    ).fetchone()
    return row[0] if row else None


def put_probe(
    con: duckdb.DuckDBPyConnection,
    run_id: str,
    adapter_id: str,
    spec_hash: str,
    result: ProbeResult,
    dagster_run_id: str | None,
    recorded_at: datetime,
) -> None:
    con.execute(
        "DELETE FROM probe_results WHERE run_id = ? AND adapter_id = ? AND probe = ?",
        [run_id, adapter_id, result.name],
    )
    ci_lo, ci_hi = result.ci_95 if result.ci_95 is not None else (None, None)
    null = result.null
    con.execute(
        "INSERT INTO probe_results (adapter_id, spec_hash, probe, kind, category, verdict, "
        "score, raw, z, p, ci_lo, ci_hi, null_mean, null_std, null_n, message, evidence, "
        "duration_s, dagster_run_id, recorded_at, run_id) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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
            json_text(result.evidence),
            finite(result.duration_s),
            dagster_run_id,
            recorded_at,
            run_id,
        ],
    )


def put_score(
    con: duckdb.DuckDBPyConnection,
    record: RunRecord,
    score: SwayScore,
    gate_passed: bool,
    recorded_at: datetime,
) -> None:
    con.execute("DELETE FROM scores WHERE run_id = ?", [record.run_id])
    con.execute(
        "INSERT INTO scores (adapter_id, spec_hash, overall, band, components, gate_passed, "
        "findings, dagster_run_id, recorded_at, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            record.adapter_id,
            record.spec_hash,
            finite(score.overall),
            score.band,
            json_text(score.components),
            gate_passed,
            json_text(list(score.findings)),
            record.dagster_run_id,
            recorded_at,
            record.run_id,
        ],
    )


_RUN_COLUMNS = (
    "run_id, adapter_id, spec_hash, engine_version, dagster_run_id, mlflow_run_id, "
    "backend_kind, started_at, finished_at, wall_s, forward_passes, tokens_forwarded, "
    "cache_hits, stats, status, origin, message"
)


def put_run(con: duckdb.DuckDBPyConnection, record: RunRecord, *, only_new: bool = False) -> None:
    values = [
        record.run_id,
        record.adapter_id,
        record.spec_hash,
        record.engine_version,
        record.dagster_run_id,
        record.mlflow_run_id,
        record.backend_kind,
        naive_utc(record.started_at) or (now() if only_new else None),
        naive_utc(record.finished_at) or (None if only_new else now()),
        finite(record.wall_s),
        record.forward_passes,
        record.tokens_forwarded,
        record.cache_hits,
        json_text(dict(record.stats)),
        record.status,
        record.origin,
        record.message,
    ]
    if only_new:
        conflict = "DO NOTHING"
    else:
        sets = [c.strip() for c in _RUN_COLUMNS.split(",") if c.strip() != "run_id"]
        keep = {"started_at", "origin", "dagster_run_id", "mlflow_run_id"}
        conflict = "DO UPDATE SET " + ", ".join(
            f"{c} = coalesce(EXCLUDED.{c}, runs.{c})" if c in keep else f"{c} = EXCLUDED.{c}"
            for c in sets
        )
    marks = ", ".join("?" for _ in values)
    con.execute(
        f"INSERT INTO runs ({_RUN_COLUMNS}) VALUES ({marks}) ON CONFLICT (run_id) {conflict}",
        values,
    )
