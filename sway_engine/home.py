"""Where things live: one home folder (SWAY_HOME, default .sway_home/) holds everything.

The engine owns it so the CLI and Dagster record into the same store and MLflow.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from sway_engine.errors import SwayError


@dataclass(frozen=True)
class Settings:
    home: Path
    suite: Path
    adapters_dir: Path
    database: Path
    mlflow_uri: str
    # Where sway's new MLflow experiments keep artifacts; None: the tracking server decides.
    mlflow_artifacts: Path | None
    mlflow_ui: str
    traces: Path
    dagster_ui: str  # the Dagster UI's base URL, linked from each MLflow copy of a Dagster run
    reports: Path  # Dagster's HTML page of each evaluation: <reports>/<adapter>/<run id>.html
    # A spec is code (kind custom imports a module, trust_remote_code runs a model repo's
    # Python): the Dagster code location runs such a spec only when its environment says so.
    allow_spec_code: bool = False
    # Many workers (docs/DEPLOY.md): each completed run is also exported here as Parquet.
    results_export: Path | None = None
    # Tags on every evaluation run (a GPU queue or pod request for the run launcher).
    run_tags: tuple[tuple[str, str], ...] = ()

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SWAY_HOME", ".sway_home")).expanduser().resolve()
        mlflow_uri = env.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
        export = env.get("SWAY_RESULTS_EXPORT")
        return cls(
            home=home,
            suite=Path(env.get("SWAY_SUITE", home / "sway.yaml")).expanduser().resolve(),
            adapters_dir=Path(env.get("SWAY_ADAPTERS_DIR", home / "adapters"))
            .expanduser()
            .resolve(),
            database=Path(env.get("SWAY_DATABASE", home / "sway.duckdb")).expanduser().resolve(),
            mlflow_uri=mlflow_uri,
            mlflow_artifacts=_artifacts(env, home, mlflow_uri),
            mlflow_ui=env.get("SWAY_MLFLOW_UI", "http://127.0.0.1:5000"),
            traces=home / "traces",
            dagster_ui=env.get("SWAY_DAGSTER_URL", "http://127.0.0.1:3000"),
            reports=home / "reports",
            allow_spec_code=env.get("SWAY_ALLOW_SPEC_CODE", "").lower() in ("1", "true", "yes"),
            results_export=Path(export).expanduser().absolute() if export else None,
            run_tags=run_tags(env.get("SWAY_RUN_TAGS", "")),
        )


def _artifacts(env: dict[str, str], home: Path, mlflow_uri: str) -> Path | None:
    """SWAY_MLFLOW_ARTIFACTS, else the home's folder; a tracking server (http) keeps its own."""
    if env.get("SWAY_MLFLOW_ARTIFACTS"):
        return Path(env["SWAY_MLFLOW_ARTIFACTS"]).expanduser().absolute()
    if mlflow_uri.startswith(("http://", "https://")):
        return None
    return home / "mlartifacts"


def run_tags(text: str) -> tuple[tuple[str, str], ...]:
    """SWAY_RUN_TAGS: a JSON object of run tags; a value that is not a string (the
    `dagster-k8s/config` mapping) is kept as its JSON text, as Dagster stores it."""
    if not text.strip():
        return ()
    try:
        tags = json.loads(text)
    except ValueError as exc:
        raise SwayError(f"SWAY_RUN_TAGS is not JSON ({exc}): give an object of tags") from exc
    if not isinstance(tags, dict):
        raise SwayError('SWAY_RUN_TAGS must be a JSON object, e.g. {"dagster-celery/queue": "gpu"}')
    return tuple((str(k), v if isinstance(v, str) else json.dumps(v)) for k, v in tags.items())
