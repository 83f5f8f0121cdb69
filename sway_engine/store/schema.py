"""The DuckDB schema as numbered migrations, each applied in one transaction and recorded in
`schema_migrations`. Never edit a released step: add the next one."""

from __future__ import annotations

from dataclasses import dataclass

# The run id given to rows written before runs existed (one evaluation per adapter and spec).
LEGACY_ID = "'legacy:' || adapter_id || ':' || spec_hash"
DATA_TABLES = ("adapters", "null_calibration", "probe_results", "scores", "runs")
JSON_COLUMNS = frozenset(
    {"target_modules", "evidence", "components", "findings", "stats", "mlflow_params"}
)


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
    Migration(
        5,
        "append-only evaluations: rows belong to a run, runs complete atomically",
        (
            "ALTER TABLE probe_results ADD COLUMN run_id VARCHAR",
            "ALTER TABLE null_calibration ADD COLUMN run_id VARCHAR",
            "ALTER TABLE scores ADD COLUMN run_id VARCHAR",
            "ALTER TABLE runs ADD COLUMN status VARCHAR",
            "ALTER TABLE runs ADD COLUMN origin VARCHAR",
            "ALTER TABLE runs ADD COLUMN message VARCHAR",
            # Before this step the store kept one copy per (adapter, spec): those rows are the
            # latest evaluation, which becomes one complete run.
            f"UPDATE scores SET run_id = coalesce(dagster_run_id, {LEGACY_ID})",
            f"""UPDATE probe_results p SET run_id = coalesce(
                (SELECT max(s.run_id) FROM scores s
                 WHERE s.adapter_id = p.adapter_id AND s.spec_hash = p.spec_hash), {LEGACY_ID})""",
            f"""UPDATE null_calibration n SET run_id = coalesce(
                (SELECT max(s.run_id) FROM scores s
                 WHERE s.adapter_id = n.adapter_id AND s.spec_hash = n.spec_hash), {LEGACY_ID})""",
            """UPDATE runs SET status = 'complete',
                origin = CASE WHEN dagster_run_id IS NULL THEN 'cli' ELSE 'dagster' END""",
            """INSERT INTO runs (run_id, adapter_id, spec_hash, status, origin)
                SELECT DISTINCT run_id, adapter_id, spec_hash, 'complete', 'legacy' FROM scores
                WHERE run_id NOT IN (SELECT run_id FROM runs)""",
            """INSERT INTO runs (run_id, adapter_id, spec_hash, status, origin)
                SELECT DISTINCT run_id, adapter_id, spec_hash, 'incomplete', 'legacy'
                FROM probe_results WHERE run_id NOT IN (SELECT run_id FROM runs)""",
        ),
    ),
    Migration(
        6,
        "MLflow is a mirror: each run records whether its copy reached MLflow",
        (
            "ALTER TABLE runs ADD COLUMN mlflow_status VARCHAR",
            "ALTER TABLE runs ADD COLUMN mlflow_error VARCHAR",
            "ALTER TABLE runs ADD COLUMN mlflow_params VARCHAR",
        ),
    ),
)
