"""The code location: assets from the configured suite, resources bound in one place.

Configuration comes from the environment (see sway_engine.home): SWAY_HOME,
SWAY_SUITE, SWAY_ADAPTERS_DIR, MLFLOW_TRACKING_URI, SWAY_MLFLOW_ARTIFACTS, SWAY_MLFLOW_UI,
SWAY_DAGSTER_URL, SWAY_ALLOW_SPEC_CODE, and for a team's cluster (docs/DEPLOY.md)
SWAY_RESULTS_EXPORT and SWAY_RUN_TAGS.
"""

from __future__ import annotations

import dagster as dg

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.assets import build_assets, leaderboard
from sway_dagster.resources import MlflowResource, ModelResource, ResultStoreResource, backend_for
from sway_dagster.run_health import make_reaper_sensor, sway_failed_runs
from sway_dagster.sensors import make_adapter_sensor
from sway_engine.errors import SpecError
from sway_engine.history import experiment_for
from sway_engine.home import Settings
from sway_engine.spec import SuiteSpec
from sway_engine.suite import Suite

JOB_NAME = "evaluate_adapter"


def build_definitions(
    settings: Settings | None = None, backend: ModelResource | None = None
) -> dg.Definitions:
    """The code location for a sway home; `backend` overrides the resource the suite's
    `models` choose (hf, api, custom, a fallback list; two composed when not differential)."""
    settings = settings or Settings.from_env()
    if not settings.suite.is_file():
        raise FileNotFoundError(
            f"no suite at {settings.suite}: set SWAY_SUITE to a sway.yaml "
            "(or run `make run` once to create the demo home)"
        )
    suite = Suite.load(settings.suite)
    code = code_in_spec(suite.spec)
    if code and not settings.allow_spec_code:
        raise SpecError(
            [
                (
                    "models",
                    f"this suite runs code that is not sway's: {'; '.join(code)}. A sway.yaml "
                    "is code then; if you trust whoever writes it, set SWAY_ALLOW_SPEC_CODE=1 "
                    "in the code location's environment",
                )
            ],
            source=str(settings.suite),
        )
    evaluate = dg.define_asset_job(
        JOB_NAME,
        selection=dg.AssetSelection.groups("adapters", "calibration", "probes", "verdict"),
        tags={**dict(settings.run_tags), "sway/pipeline": "evaluate"},
        description="Evaluate one adapter partition: manifest, null matrix, probes, score.",
    )
    automation = dg.AutomationConditionSensorDefinition(
        "sway_automation",
        target=dg.AssetSelection.assets(leaderboard),
        default_status=dg.DefaultSensorStatus.RUNNING,
    )
    return dg.Definitions(
        # Every launch path (the job, a UI Materialize, a backfill) runs its steps in one
        # process, so the base model loads once per run and probes share its row cache.
        executor=dg.in_process_executor,
        assets=build_assets(suite),
        jobs=[evaluate],
        sensors=[make_adapter_sensor(JOB_NAME), automation, make_reaper_sensor(), sway_failed_runs],
        resources={
            "backend": backend
            or backend_for(
                suite.spec,
                trace_dir=str(settings.traces),
                score_cache_dir=str(settings.home / "cache"),
            ),
            "adapter_store": AdapterStoreResource(root=str(settings.adapters_dir)),
            "results": ResultStoreResource(
                database=str(settings.database),
                reports=str(settings.reports),
                export_root=str(settings.results_export or ""),
            ),
            "mlflow": MlflowResource(
                tracking_uri=settings.mlflow_uri,
                experiment=experiment_for(suite.source),
                artifact_root=str(settings.mlflow_artifacts or ""),
                ui_url=settings.mlflow_ui,
                dagster_ui=settings.dagster_ui,
            ),
        },
    )


@dg.definitions
def defs() -> dg.Definitions:
    return build_definitions()


def code_in_spec(spec: SuiteSpec) -> list[str]:
    """What in `spec` runs code that is not sway's: `kind: custom` imports its entry point,
    `trust_remote_code: true` runs Python from the model repository."""
    found = []
    for side in ("base", "ft"):
        model = getattr(spec.models, side)
        if "custom" in (model.kind, *model.fallback):
            found.append(f"models.{side} imports {model.entry_point} (kind custom)")
        if model.trust_remote_code:
            found.append(f"models.{side} runs {model.base}'s own Python (trust_remote_code)")
    return found
