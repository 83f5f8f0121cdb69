"""MLflow runs for sway results, through an explicit `MlflowClient` (no global mlflow state).

mlflow is imported lazily: importing it takes seconds and most sway commands never track.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from sway_engine.errors import SwayError
from sway_engine.result import ProbeResult, SuiteResult, finite, json_safe

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Metric

ADAPTER_TAG = "sway.adapter_id"
DAGSTER_RUN_TAG = "dagster.run_id"
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
SECRET_MARKERS = ("key", "token", "secret", "password")
PROBE_METRICS = ("raw", "z", "p", "score")
# Metric names are `<probe>/<field>` and `sway/score`: MLflow's UI groups charts by the part
# before the first "/", so each probe's raw, z, p and score sit together.
SCORE_METRIC = "sway/score"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# At most about 2 + 4 s of backoff and 10 s per request: a dead server costs seconds, not minutes.
CLIENT_DEADLINES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


class TrackingError(SwayError):
    """MLflow refused a request, or sway was asked to log something it must not."""


class MlflowTracking:
    """One MLflow experiment: get-or-create runs per (adapter, Dagster run) and log results."""

    def __init__(
        self,
        tracking_uri: str,
        experiment: str,
        artifact_root: str | Path | None = None,
        ui_url: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_root = Path(artifact_root).expanduser().absolute() if artifact_root else None
        self.ui_url = ui_url.rstrip("/") if ui_url else None
        self._client: MlflowClient | None = None
        self._experiment_id: str | None = None

    @property
    def client(self) -> MlflowClient:
        """The `MlflowClient` bound to `tracking_uri`, created on first use.

        MLflow's HTTP defaults (7 retries with exponential backoff, 120 s per request) hold a
        step for about 250 s when the server is down; sway mirrors to MLflow and never waits
        that long, so unless the user set them, requests get CLIENT_DEADLINES."""
        if self._client is None:
            from mlflow import MlflowClient

            for name, value in CLIENT_DEADLINES.items():
                os.environ.setdefault(name, value)
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def artifact_location(self) -> str | None:
        """File URI under `artifact_root` given to the experiment when sway creates it."""
        if self.artifact_root is None:
            return None
        return (self.artifact_root / _slug(self.experiment)).as_uri()

    def experiment_id(self) -> str:
        """Id of the experiment, created (or restored from deleted) if needed."""
        if self._experiment_id is not None:
            return self._experiment_id
        from mlflow.exceptions import MlflowException

        with self._errors(f"experiment {self.experiment!r}"):
            found = self.client.get_experiment_by_name(self.experiment)
            if found is None:
                try:
                    self._experiment_id = self.client.create_experiment(
                        self.experiment, artifact_location=self.artifact_location()
                    )
                    return self._experiment_id
                except MlflowException:
                    found = self.client.get_experiment_by_name(self.experiment)
                    if found is None:
                        raise
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            self._experiment_id = str(found.experiment_id)
        return self._experiment_id

    def run_for(self, adapter_id: str, dagster_run_id: str, tags: Mapping[str, str]) -> str:
        """Id of the run of this adapter in this Dagster run; created once, found on retries."""
        experiment_id = self.experiment_id()
        query = (
            f"tags.`{ADAPTER_TAG}` = {_quote(adapter_id)} "
            f"AND tags.`{DAGSTER_RUN_TAG}` = {_quote(dagster_run_id)}"
        )
        with self._errors(f"run of adapter {adapter_id!r}"):
            found = self.client.search_runs(
                [experiment_id],
                filter_string=query,
                max_results=1,
                order_by=["attributes.start_time ASC"],
            )
            if found:
                run = found[0]
                if run.info.status in TERMINAL_STATUSES:
                    self.client.update_run(run.info.run_id, status="RUNNING")
                return str(run.info.run_id)
            all_tags = {str(k): str(v) for k, v in tags.items()}
            all_tags.update({ADAPTER_TAG: adapter_id, DAGSTER_RUN_TAG: dagster_run_id})
            created = self.client.create_run(experiment_id, tags=all_tags, run_name=adapter_id)
            return str(created.info.run_id)

    def log_suite(
        self, run_id: str, suite: SuiteResult, params: Mapping[str, str | int | float]
    ) -> None:
        """Log every probe's metrics and verdict, the overall score and band, and `params`."""
        from mlflow.entities import Metric, Param, RunTag

        now = _now_ms()
        metrics = [m for r in suite.probes for m in _probe_metrics(r, now)]
        overall = finite(suite.score.overall)
        if overall is not None:
            metrics.append(Metric(SCORE_METRIC, overall, now, 0))
        tags = [RunTag("sway.band", suite.score.band), RunTag("sway.spec_hash", suite.spec_hash)]
        tags += [RunTag(f"sway.verdict.{r.name}", r.verdict.value) for r in suite.probes]
        with self._errors(f"run {run_id}"):
            new_params = self._new_params(run_id, params)
            self.client.log_batch(
                run_id,
                metrics=self._new_metrics(run_id, metrics),
                params=[Param(k, v) for k, v in new_params.items()],
                tags=tags,
                synchronous=True,
            )

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        """Set (or overwrite) tags on the run."""
        from mlflow.entities import RunTag

        with self._errors(f"run {run_id}"):
            self.client.log_batch(
                run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True
            )

    def log_probe(self, run_id: str, result: ProbeResult) -> None:
        """Log one probe's metrics and verdict tag."""
        from mlflow.entities import RunTag

        with self._errors(f"run {run_id}"):
            self.client.log_batch(
                run_id,
                metrics=_probe_metrics(result, _now_ms()),
                tags=[RunTag(f"sway.verdict.{result.name}", result.verdict.value)],
                synchronous=True,
            )

    def log_artifact_file(
        self, run_id: str, path: str | Path, artifact_path: str | None = None
    ) -> None:
        """Copy a local file into the run's artifacts (under `artifact_path` if given)."""
        local = Path(path)
        if not local.is_file():
            raise TrackingError(f"{local}: no such file to log as an artifact of run {run_id}")
        with self._errors(f"run {run_id}"):
            self.client.log_artifact(run_id, str(local), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        """Write `text` as the run artifact `artifact_file` (posix path)."""
        with self._errors(f"run {run_id}"):
            self.client.log_text(run_id, text, artifact_file)

    def log_json(self, run_id: str, obj: Any, artifact_file: str) -> None:
        """Write `obj` as indented JSON (NaN/inf as null) to the run artifact `artifact_file`."""
        text = json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False, default=str)
        self.log_text(run_id, text, artifact_file)

    def log_figure_png(self, run_id: str, png_bytes: bytes, artifact_file: str) -> None:
        """Write already-rendered PNG bytes to the run artifact `artifact_file`."""
        if not png_bytes.startswith(_PNG_SIGNATURE):
            raise TrackingError(f"{artifact_file}: bytes given for run {run_id} are not a PNG")
        target = PurePosixPath(artifact_file)
        with tempfile.TemporaryDirectory(prefix="sway-png-") as tmp:
            local = Path(tmp) / target.name
            local.write_bytes(png_bytes)
            folder = str(target.parent) if str(target.parent) != "." else None
            with self._errors(f"run {run_id}"):
                self.client.log_artifact(run_id, str(local), folder)

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        """Mark the run terminated with `status` (FINISHED, FAILED or KILLED)."""
        if status not in TERMINAL_STATUSES:
            raise TrackingError(
                f"run {run_id}: status {status!r} not in {sorted(TERMINAL_STATUSES)}"
            )
        with self._errors(f"run {run_id}"):
            self.client.set_terminated(run_id, status=status)

    def fail_runs_of(self, dagster_run_id: str) -> int:
        """Mark this experiment's RUNNING runs of a failed Dagster run FAILED; return how many."""
        with self._errors(f"experiment {self.experiment!r}"):
            if self.client.get_experiment_by_name(self.experiment) is None:
                return 0
        query = (
            f"tags.`{DAGSTER_RUN_TAG}` = {_quote(dagster_run_id)} AND attributes.status = 'RUNNING'"
        )
        with self._errors(f"runs of Dagster run {dagster_run_id}"):
            found = self.client.search_runs([self.experiment_id()], filter_string=query)
            for run in found:
                self.client.set_terminated(run.info.run_id, status="FAILED")
        return len(found)

    def run_url(self, run_id: str) -> str | None:
        """Link to the run in the MLflow UI, or None when no `ui_url` is configured."""
        if self.ui_url is None:
            return None
        return f"{self.ui_url}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def _new_metrics(self, run_id: str, metrics: list[Metric]) -> list[Metric]:
        """Metrics the run does not already hold at the same value: a probe logged while the
        suite ran, or a copy caught up again, is one point in its history, not two."""
        held = self.client.get_run(run_id).data.metrics
        return [m for m in metrics if held.get(m.key) != m.value]

    def _new_params(self, run_id: str, params: Mapping[str, str | int | float]) -> dict[str, str]:
        """Params not yet on the run, secrets dropped; a changed value raises."""
        wanted = {str(k): str(v) for k, v in params.items() if not is_secret_name(str(k))}
        existing = self.client.get_run(run_id).data.params
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        if changed:
            detail = ", ".join(f"{k}: {existing[k]!r} -> {wanted[k]!r}" for k in changed)
            raise TrackingError(
                f"run {run_id}: MLflow params are immutable and these would change: {detail}; "
                "log to a new run instead"
            )
        return {k: v for k, v in wanted.items() if k not in existing}

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn whatever the client raises into TrackingError naming `what` and the tracking
        URI: MLflow's own exceptions, and what leaks past them (a locked sqlite store raises
        sqlalchemy's OperationalError, a refused connection requests' ConnectionError)."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except TrackingError:
            raise
        except MlflowException as exc:
            raise TrackingError(f"{what} at {self.tracking_uri}: {exc.message}") from exc
        except Exception as exc:
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise TrackingError(
                f"{what} at {self.tracking_uri}: {type(exc).__name__}: {detail}"
            ) from exc


def is_secret_name(name: str) -> bool:
    """True for names that look like credentials (api_key, hf_token, client_secret...)."""
    lowered = name.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def _probe_metrics(result: ProbeResult, timestamp_ms: int) -> list[Metric]:
    from mlflow.entities import Metric

    metrics = []
    for field_name in PROBE_METRICS:
        value = finite(getattr(result, field_name))
        if value is not None:
            metrics.append(Metric(f"{result.name}/{field_name}", value, timestamp_ms, 0))
    return metrics


def _quote(value: str) -> str:
    """A string literal for an MLflow filter; MLflow has no escape, so pick the quote."""
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise TrackingError(f"{value!r}: cannot search MLflow for a value holding both quote kinds")


def _slug(name: str) -> str:
    """A folder name for an experiment name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "experiment"


def _now_ms() -> int:
    return int(time.time() * 1000)
