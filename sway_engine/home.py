"""Where things live: one home folder (SWAY_HOME, default .sway_home/) holds everything.

The engine owns it so the CLI and Dagster record into the same store and MLflow.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Settings:
    home: Path
    suite: Path
    adapters_dir: Path
    database: Path
    mlflow_uri: str
    mlflow_artifacts: Path
    mlflow_ui: str
    traces: Path
    dagster_ui: str  # the Dagster UI's base URL, linked from each MLflow copy of a Dagster run
    reports: Path  # Dagster's HTML page of each evaluation: <reports>/<adapter>/<run id>.html
    # A spec is code (kind custom imports a module, trust_remote_code runs a model repo's
    # Python): the Dagster code location runs such a spec only when its environment says so.
    allow_spec_code: bool = False

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("SWAY_HOME", ".sway_home")).expanduser().resolve()
        return cls(
            home=home,
            suite=Path(env.get("SWAY_SUITE", home / "sway.yaml")).expanduser().resolve(),
            adapters_dir=Path(env.get("SWAY_ADAPTERS_DIR", home / "adapters"))
            .expanduser()
            .resolve(),
            database=Path(env.get("SWAY_DATABASE", home / "sway.duckdb")).expanduser().resolve(),
            mlflow_uri=env.get("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
            mlflow_artifacts=home / "mlartifacts",
            mlflow_ui=env.get("SWAY_MLFLOW_UI", "http://127.0.0.1:5000"),
            traces=home / "traces",
            dagster_ui=env.get("SWAY_DAGSTER_URL", "http://127.0.0.1:3000"),
            reports=home / "reports",
            allow_spec_code=env.get("SWAY_ALLOW_SPEC_CODE", "").lower() in ("1", "true", "yes"),
        )
