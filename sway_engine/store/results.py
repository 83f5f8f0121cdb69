"""The result store: adapters, evaluations (runs) and their rows, append-only.

Every evaluation is a run. Its null cells and probe rows carry its `run_id`; they become
visible when the run completes, in the same transaction that writes its final probe rows,
score and run row. A run that dies stays incomplete and is never shown; re-evaluating adds a
new run and keeps the old one queryable. Reads return rows of the latest *complete* run per
(adapter, spec) unless a run is named. Nothing here deletes another run's rows.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sway_engine.calibration import NullCell, NullMatrix, NullPlan
from sway_engine.result import ProbeResult, SuiteResult, SwayScore, finite
from sway_engine.store.db import (
    Database,
    StoreError,
    json_text,
    naive_utc,
    now,
)
from sway_engine.store.rows import (
    COMPLETE,
    FAILED,
    INCOMPLETE,
    AdapterRecord,
    RunRecord,
    computed_in,
    put_probe,
    put_run,
    put_score,
    result_from_row,
    run_record,
)
from sway_engine.store.schema import DATA_TABLES

MLFLOW_SYNCED, MLFLOW_PENDING = "synced", "pending"

if TYPE_CHECKING:
    import duckdb


class ResultStore(Database):
    """Adapters, runs and their rows in one DuckDB file (`Database` for the connections)."""

    # ---- adapters ----

    def record_adapter(self, record: AdapterRecord) -> None:
        """Add or update an adapter. A failed check never erases what an earlier good one
        recorded (path, hash, size, base, rank, alpha, targets): it only sets the preflight."""
        row = [
            record.adapter_id,
            record.name,
            record.path or None,
            record.sha256,
            record.size_bytes,
            record.base_model,
            record.rank,
            finite(record.alpha),
            json_text(list(record.target_modules)) if record.target_modules else None,
            record.preflight_ok,
            record.preflight_message,
            naive_utc(record.registered_at) or now(),
        ]
        keep = ("name", "path", "sha256", "size_bytes", "base_model", "rank", "alpha")
        merge = ", ".join(f"{c} = coalesce(EXCLUDED.{c}, adapters.{c})" for c in keep)
        self.run(
            lambda con: con.execute(
                "INSERT INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                f"ON CONFLICT (adapter_id) DO UPDATE SET {merge}, "
                "target_modules = coalesce(EXCLUDED.target_modules, adapters.target_modules), "
                "preflight_ok = EXCLUDED.preflight_ok, "
                "preflight_message = EXCLUDED.preflight_message",
                row,
            )
        )

    def adapters(self) -> list[dict[str, Any]]:
        """Every registered adapter."""
        return self.query("SELECT * FROM adapters ORDER BY adapter_id")

    # ---- an evaluation's lifecycle ----

    def begin_run(self, record: RunRecord) -> None:
        """Register an incomplete run (a no-op when the run exists)."""
        self.run(lambda con: put_run(con, record, only_new=True))

    def write_null_cells(
        self, run_id: str, adapter_id: str, spec_hash: str, cells: Iterable[NullCell]
    ) -> int:
        """The run's null samples of the probes present in `cells` (replacing this run's own
        earlier samples of those probes, a retried step); return rows written."""
        listed = list(cells)
        values = [
            [adapter_id, spec_hash, c.probe, c.kind, c.seed, finite(c.rank_scale), finite(c.raw)]
            + [run_id]
            for c in listed
        ]

        def work(con: duckdb.DuckDBPyConnection) -> int:
            for probe in sorted({c.probe for c in listed}):
                con.execute(
                    "DELETE FROM null_calibration WHERE run_id = ? AND adapter_id = ? "
                    "AND probe = ?",
                    [run_id, adapter_id, probe],
                )
            if values:
                con.executemany(
                    "INSERT INTO null_calibration (adapter_id, spec_hash, probe, kind, seed, "
                    "rank_scale, raw, run_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    values,
                )
            return len(values)

        return self.run(work)

    def write_probe_results(
        self,
        run_id: str,
        adapter_id: str,
        spec_hash: str,
        results: Iterable[ProbeResult],
        dagster_run_id: str | None = None,
        *,
        begin: RunRecord | None = None,
    ) -> int:
        """The run's rows of these probes (replacing only this run's own rows of them);
        `begin`: the run registered first, in the same transaction (as `begin_run`)."""
        listed = list(results)
        at = now()

        def work(con: duckdb.DuckDBPyConnection) -> int:
            if begin is not None:
                put_run(con, begin, only_new=True)
            for r in listed:
                put_probe(con, run_id, adapter_id, spec_hash, r, dagster_run_id, at)
            return len(listed)

        return self.run(work)

    def complete_run(self, record: RunRecord, suite: SuiteResult, gate_passed: bool) -> int:
        """Make a run visible: its final probe rows, its score and its run row, in one
        transaction. Returns the probe rows written."""
        record = replace(record, status=COMPLETE, spec_hash=suite.spec_hash)
        at = now()

        def work(con: duckdb.DuckDBPyConnection) -> int:
            for r in suite.probes:
                put_probe(
                    con,
                    record.run_id,
                    record.adapter_id,
                    suite.spec_hash,
                    r,
                    computed_in(con, record.run_id, r.name) or record.dagster_run_id,
                    at,
                )
            put_score(con, record, suite.score, gate_passed, at)
            put_run(con, record)
            return len(suite.probes)

        return self.run(work)

    def write_suite(
        self,
        adapter_id: str,
        suite: SuiteResult,
        gate_passed: bool,
        run_id: str,
        dagster_run_id: str | None = None,
        mlflow_run_id: str | None = None,
        origin: str = "cli",
    ) -> int:
        """A whole evaluation at once (the CLI path): rows, score and run in one transaction."""
        record = run_record(
            run_id,
            adapter_id,
            suite,
            dagster_run_id=dagster_run_id,
            mlflow_run_id=mlflow_run_id,
            origin=origin,
        )
        return self.complete_run(record, suite, gate_passed)

    def fail_run(self, run_id: str, message: str) -> None:
        """Mark an incomplete run failed (its rows stay invisible, for the record)."""
        self.run(
            lambda con: con.execute(
                "UPDATE runs SET status = ?, message = ? WHERE run_id = ? AND status = ?",
                [FAILED, message, run_id, INCOMPLETE],
            )
        )

    def fail_runs_of(self, dagster_run_id: str, message: str) -> int:
        """Mark the incomplete runs a failed Dagster run left failed; return how many."""

        def work(con: duckdb.DuckDBPyConnection) -> int:
            row = con.execute(
                "SELECT count(*) FROM runs WHERE dagster_run_id = ? AND status = ?",
                [dagster_run_id, INCOMPLETE],
            ).fetchone()
            con.execute(
                "UPDATE runs SET status = ?, message = ? WHERE dagster_run_id = ? AND status = ?",
                [FAILED, message, dagster_run_id, INCOMPLETE],
            )
            return int(row[0]) if row else 0

        return self.run(work)

    # ---- reads ----

    def latest_run(
        self, adapter_id: str, spec_hash: str, *, status: str | None = None
    ) -> dict[str, Any] | None:
        """The newest run of (adapter, spec), of `status` if given."""
        sql = "SELECT * FROM runs WHERE adapter_id = ? AND spec_hash = ?"
        params: list[Any] = [adapter_id, spec_hash]
        if status is not None:
            sql += " AND status = ?"
            params.append(status)
        rows = self.query(sql + " ORDER BY started_at DESC NULLS LAST, run_id DESC LIMIT 1", params)
        return rows[0] if rows else None

    def probe_results(
        self, adapter_id: str | None = None, *, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Probe rows (JSON decoded): of `run_id`, else of the latest complete run of every
        (adapter, spec), optionally of one adapter."""
        return self._rows("probe_results", adapter_id, run_id, "probe")

    def null_calibration(
        self, adapter_id: str | None = None, *, run_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Null samples: of `run_id`, else of the latest complete run per (adapter, spec)."""
        return self._rows("null_calibration", adapter_id, run_id, "probe, rank_scale, seed")

    def results_of(
        self, run_id: str, weights: Mapping[str, float] | None = None
    ) -> list[ProbeResult]:
        """The run's probe rows as engine results (declaration order is the caller's)."""
        weights = weights or {}
        return [
            replace(result_from_row(r), weight=weights.get(r["probe"], 1.0))
            for r in self.probe_results(run_id=run_id)
        ]

    def null_matrix(self, run_id: str, plan: NullPlan) -> NullMatrix:
        """The run's null samples as the engine's matrix. A NaN sample (stored as NULL) comes
        back as NaN, so its probe refuses to calibrate rather than calibrating on the rest."""
        cells = tuple(
            NullCell(
                r["probe"],
                r["kind"],
                int(r["seed"]),
                float(r["rank_scale"]),
                math.nan if r["raw"] is None else float(r["raw"]),
            )
            for r in self.null_calibration(run_id=run_id)
        )
        return NullMatrix(plan=plan, cells=cells)

    def scores(self) -> list[dict[str, Any]]:
        """Scores of complete runs, newest first."""
        return self.query(
            "SELECT s.* FROM scores s JOIN runs r USING (run_id) WHERE r.status = 'complete' "
            "ORDER BY s.recorded_at DESC, s.adapter_id"
        )

    def runs(self) -> list[dict[str, Any]]:
        """Every run (any status), newest first."""
        return self.query("SELECT * FROM runs ORDER BY started_at DESC NULLS LAST, run_id")

    def lineage(self, adapter: str, *, prefix: bool = False) -> list[dict[str, Any]]:
        """Every run of an adapter, oldest first: by key (`doc-strong-1835ed0a`), or by
        directory name (`doc-strong`: every version of its weights); with `prefix`, of every
        adapter whose directory name starts with `adapter` (a lineage: `doc-v1`, `doc-v2`,
        ...). Each run carries its forgetting_budget spending (`nats_per_token` and its 95%
        interval; the first such probe by name), so the rows read as the lineage's trend."""
        match = "starts_with(a.name, ?)" if prefix else "a.name = ?"
        return self.query(
            f"""SELECT r.run_id, r.adapter_id, a.name, r.spec_hash, r.origin, r.status,
                      r.started_at, r.finished_at, s.overall, s.band, s.gate_passed,
                      r.mlflow_status, r.message,
                      f.raw AS nats_per_token, f.ci_lo AS nats_ci_lo, f.ci_hi AS nats_ci_hi
               FROM runs r
               LEFT JOIN adapters a USING (adapter_id)
               LEFT JOIN scores s USING (run_id)
               LEFT JOIN (
                   SELECT run_id, raw, ci_lo, ci_hi,
                          row_number() OVER (PARTITION BY run_id ORDER BY probe) AS k
                   FROM probe_results WHERE kind = 'forgetting_budget'
               ) f ON f.run_id = r.run_id AND f.k = 1
               WHERE r.adapter_id = ? OR {match}
               ORDER BY r.started_at NULLS LAST, r.run_id""",
            [adapter, adapter],
        )

    def leaderboard(self, spec_hash: str | None = None) -> list[dict[str, Any]]:
        """The latest complete run of each adapter under one suite (`spec_hash`, else the
        suite of the newest complete run): gate-passing adapters first, then by overall, then
        fewest ERROR rows. Adapters evaluated with different suites are never ranked together."""
        if spec_hash is None:
            newest = self.query(
                "SELECT spec_hash FROM runs WHERE status = 'complete' "
                "ORDER BY finished_at DESC NULLS LAST, started_at DESC NULLS LAST LIMIT 1"
            )
            if not newest:
                return []
            spec_hash = newest[0]["spec_hash"]
        sql = """
            WITH latest AS (
                SELECT r.run_id, r.adapter_id FROM runs r
                WHERE r.status = 'complete' AND r.spec_hash = ?
                  AND EXISTS (SELECT 1 FROM scores s WHERE s.run_id = r.run_id)
                QUALIFY row_number() OVER (
                    PARTITION BY r.adapter_id
                    ORDER BY r.finished_at DESC NULLS LAST, r.started_at DESC NULLS LAST,
                        r.run_id DESC
                ) = 1
            ),
            counts AS (
                SELECT run_id,
                    count(*) FILTER (WHERE verdict = 'pass') AS n_pass,
                    count(*) FILTER (WHERE verdict = 'fail') AS n_fail,
                    count(*) FILTER (WHERE verdict = 'error') AS n_error,
                    count(*) AS n_probes
                FROM probe_results GROUP BY run_id
            )
            SELECT
                row_number() OVER (
                    ORDER BY s.gate_passed DESC NULLS LAST, s.overall DESC NULLS LAST,
                        coalesce(c.n_error, 0), l.adapter_id
                ) AS rank,
                l.adapter_id,
                coalesce(a.name, l.adapter_id) AS name,
                s.spec_hash,
                l.run_id,
                s.overall,
                s.band,
                s.gate_passed,
                coalesce(c.n_pass, 0) AS n_pass,
                coalesce(c.n_fail, 0) AS n_fail,
                coalesce(c.n_error, 0) AS n_error,
                coalesce(c.n_probes, 0) AS n_probes,
                s.recorded_at
            FROM latest l
            JOIN scores s ON s.run_id = l.run_id
            LEFT JOIN adapters a ON a.adapter_id = l.adapter_id
            LEFT JOIN counts c ON c.run_id = l.run_id
            ORDER BY rank
        """
        return self.query(sql, [spec_hash])

    def row_counts(self) -> dict[str, int]:
        """Number of rows in each data table (every run, complete or not)."""

        def work(con: duckdb.DuckDBPyConnection) -> dict[str, int]:
            counts: dict[str, int] = {}
            for table in DATA_TABLES:
                row = con.execute(f"SELECT count(*) FROM {table}").fetchone()
                counts[table] = int(row[0]) if row else 0
            return counts

        return self.read(work)

    def seen_adapter_ids(self) -> set[str]:
        """Adapter ids that appear in any table."""
        union = " UNION ".join(f"SELECT adapter_id FROM {t}" for t in DATA_TABLES)
        rows = self.query(f"SELECT DISTINCT adapter_id FROM ({union}) WHERE adapter_id IS NOT NULL")
        return {r["adapter_id"] for r in rows}

    # ---- the MLflow mirror ----

    def run_row(self, run_id: str) -> dict[str, Any] | None:
        """The run's ledger row, or None."""
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id])
        return rows[0] if rows else None

    def gate_passed(self, run_id: str) -> bool | None:
        """The gate decision recorded with the run's score, or None (no score yet)."""
        rows = self.query("SELECT gate_passed FROM scores WHERE run_id = ?", [run_id])
        return rows[0]["gate_passed"] if rows else None

    def mark_mlflow(
        self,
        run_id: str,
        status: str,
        *,
        mlflow_run_id: str | None = None,
        error: str | None = None,
        params: Mapping[str, Any] | None = None,
    ) -> None:
        """Record whether the run's copy reached MLflow (`synced`) or is owed (`pending`)."""
        if status not in (MLFLOW_SYNCED, MLFLOW_PENDING):
            raise StoreError(f"mlflow status {status!r} is not {MLFLOW_SYNCED} or {MLFLOW_PENDING}")
        self.run(
            lambda con: con.execute(
                "UPDATE runs SET mlflow_status = ?, mlflow_error = ?, "
                "mlflow_run_id = coalesce(?, mlflow_run_id), "
                "mlflow_params = coalesce(?, mlflow_params) WHERE run_id = ?",
                [status, error, mlflow_run_id, None if params is None else json_text(params)]
                + [run_id],
            )
        )

    def mlflow_pending(self) -> list[dict[str, Any]]:
        """Complete runs whose MLflow copy is owed, oldest first."""
        return self.query(
            "SELECT * FROM runs WHERE status = 'complete' AND mlflow_status = ? "
            "ORDER BY finished_at NULLS LAST, run_id",
            [MLFLOW_PENDING],
        )

    def suite_of(self, run_id: str) -> SuiteResult:
        """A complete run rebuilt from its rows: probe results (with their null samples), the
        score and the run's ledger fields. What MLflow and reports are written from."""
        run = self.run_row(run_id)
        scores = self.query("SELECT * FROM scores WHERE run_id = ?", [run_id])
        if run is None or run["status"] != COMPLETE or not scores:
            raise StoreError(f"run {run_id}: no complete evaluation of that id in {self.path}")
        samples: dict[str, list[float]] = {}
        for cell in self.null_calibration(run_id=run_id):
            if cell["rank_scale"] == 1.0 and cell["raw"] is not None:
                samples.setdefault(cell["probe"], []).append(float(cell["raw"]))
        probes = tuple(
            replace(r, null=replace(r.null, samples=tuple(samples.get(r.name, ()))))
            if r.null is not None
            else r
            for r in self.results_of(run_id)
        )
        adapter = next((a for a in self.adapters() if a["adapter_id"] == run["adapter_id"]), {})
        row = scores[0]
        return SuiteResult(
            spec_path="",
            spec_hash=run["spec_hash"] or "",
            base_model=adapter.get("base_model") or "",
            adapter=run["adapter_id"],
            started_at=_iso(run["started_at"]),
            finished_at=_iso(run["finished_at"]),
            wall_s=run["wall_s"] or 0.0,
            sway_version=run["engine_version"] or "",
            probes=probes,
            score=SwayScore(
                overall=math.nan if row["overall"] is None else row["overall"],
                band=row["band"] or "",
                components=dict(row["components"] or {}),
                weights={},
                findings=tuple(row["findings"] or ()),
            ),
            backend_stats=dict(run["stats"] or {}),
            backend_kind=run["backend_kind"] or "",
        )

    def _rows(
        self, table: str, adapter_id: str | None, run_id: str | None, order: str
    ) -> list[dict[str, Any]]:
        params: list[Any] = []
        if run_id is not None:
            where = "t.run_id = ?"
            params.append(run_id)
        else:
            where = """t.run_id IN (
                SELECT run_id FROM runs WHERE status = 'complete'
                QUALIFY row_number() OVER (
                    PARTITION BY adapter_id, spec_hash
                    ORDER BY finished_at DESC NULLS LAST, started_at DESC NULLS LAST,
                        run_id DESC
                ) = 1)"""
        if adapter_id is not None:
            where += " AND t.adapter_id = ?"
            params.append(adapter_id)
        return self.query(
            f"SELECT t.* FROM {table} t WHERE {where} ORDER BY t.adapter_id, t.spec_hash, {order}",
            params,
        )


def _iso(moment: datetime | None) -> str:
    return moment.isoformat() if moment is not None else ""


__all__ = [
    "COMPLETE",
    "MLFLOW_PENDING",
    "MLFLOW_SYNCED",
    "FAILED",
    "INCOMPLETE",
    "AdapterRecord",
    "ResultStore",
    "RunRecord",
    "StoreError",
    "result_from_row",
    "run_record",
]
