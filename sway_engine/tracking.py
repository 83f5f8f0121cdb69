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
    from mlflow.entities import LoggedModel, Metric, Run

ADAPTER_TAG = "sway.adapter_id"
DAGSTER_RUN_TAG = "dagster.run_id"
TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
SECRET_MARKERS = ("key", "token", "secret", "password")
PROBE_METRICS = ("raw", "z", "p", "score")
# Metric names are `<probe>/<field>` and `sway/score`: MLflow's UI groups charts by the part
# before the first "/", so each probe's raw, z, p and score sit together.
SCORE_METRIC = "sway/score"
# The probe rows as a table artifact: MLflow's UI shows it and lines it up across runs.
TABLE_FILE = "probe_results.json"
TABLE_COLUMNS = ("probe", "kind", "verdict", "raw", "z", "p", "q", "score", "message")
# Each adapter is an external LoggedModel (its weights stay where they are), one per experiment.
MODEL_TYPE = "lora-adapter"
MODEL_ID_TAG = "sway.model_id"  # on a registered model version: the LoggedModel it stands for
PASSED_AT_TAG = "sway.gate_passed_at"  # on a version: when its adapter last passed the gate
GATE_ALIAS = "gate-passed"
NOTE_TAG = "mlflow.note.content"  # MLflow shows this tag as the run's description
NOTE_LIMIT = 8000  # MLflow's longest tag value (MAX_TAG_VAL_LENGTH)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# At most about 2 + 4 s of backoff and 10 s per request: a dead server costs seconds, not minutes.
CLIENT_DEADLINES = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


# A client call that failed after this long met a dead server's retries or a locked db's
# busy wait (the mirror then leaves the URI alone for a while); a fast failure did not.
SLOW_FAILURE_S = 1.0


class TrackingError(SwayError):
    """MLflow refused a request, or sway was asked to log something it must not. `slow`: the
    failing client call itself took SLOW_FAILURE_S or more."""

    def __init__(self, message: str, *, slow: bool = False) -> None:
        super().__init__(message)
        self.slow = slow


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
        self._open_runs: dict[tuple[str, str], str] = {}  # (adapter, Dagster run) -> run id

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

    def run_for(
        self,
        adapter_id: str,
        dagster_run_id: str,
        tags: Mapping[str, str],
        *,
        reuse: bool = False,
    ) -> str:
        """Id of the run of this adapter in this Dagster run; created once, found on retries.
        `reuse`: the id this object found or created before, unless it terminated that run
        since (a Dagster run's probe steps each log a preview: one search, not one per step)."""
        key = (adapter_id, dagster_run_id)
        if reuse and key in self._open_runs:
            return self._open_runs[key]
        self._open_runs[key] = found = self._find_or_create(adapter_id, dagster_run_id, tags)
        return found

    def _find_or_create(self, adapter_id: str, dagster_run_id: str, tags: Mapping[str, str]) -> str:
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
        self,
        run_id: str,
        suite: SuiteResult,
        params: Mapping[str, str | int | float],
        model_id: str | None = None,
    ) -> None:
        """Log every probe's metrics and verdict, the overall score and band, and `params`. With
        `model_id` the metrics are that LoggedModel's too, and the run lists it as an input (the
        model it evaluated), as MLflow's own `log_metrics(model_id=...)` does."""
        from mlflow.entities import LoggedModelInput, Metric, Param, RunTag

        now = _now_ms()
        metrics = [m for r in suite.probes for m in _probe_metrics(r, now, model_id)]
        overall = finite(suite.score.overall)
        if overall is not None:
            metrics.append(Metric(SCORE_METRIC, overall, now, 0, model_id=model_id))
        tags = [RunTag("sway.band", suite.score.band), RunTag("sway.spec_hash", suite.spec_hash)]
        tags += [RunTag(f"sway.verdict.{r.name}", r.verdict.value) for r in suite.probes]
        with self._errors(f"run {run_id}"):
            run = self.client.get_run(run_id)
            new_params = self._new_params(run, params)
            self.client.log_batch(
                run_id,
                metrics=self._new_metrics(run, metrics, model_id),
                params=[Param(k, v) for k, v in new_params.items()],
                tags=tags,
                synchronous=True,
            )
            inputs = run.inputs.model_inputs if run.inputs and run.inputs.model_inputs else []
            if model_id is not None and model_id not in {i.model_id for i in inputs}:
                self.client.log_inputs(run_id, models=[LoggedModelInput(model_id)])

    def log_table(self, run_id: str, columns: Mapping[str, list[Any]], artifact_file: str) -> None:
        """Write `columns` (name -> one value per row) as the table artifact `artifact_file`
        (.json), which MLflow's UI shows and compares across runs. A table the run holds already
        is kept: MLflow's `log_table` appends, so a copy made again would hold each row twice."""
        folder = str(PurePosixPath(artifact_file).parent)
        with self._errors(f"run {run_id}"):
            held = self.client.list_artifacts(run_id, None if folder == "." else folder)
            if artifact_file not in {f.path for f in held}:
                self.client.log_table(run_id, data=dict(columns), artifact_file=artifact_file)

    def describe(self, run_id: str, markdown: str) -> None:
        """Make `markdown` the run's description, cut at a line end to fit MLflow's tag limit."""
        self.set_tags(run_id, {NOTE_TAG: _note(markdown)})

    def logged_model(self, adapter_id: str, params: Mapping[str, str | int | float]) -> str:
        """Id of the adapter's LoggedModel in the experiment: an external model named by the
        adapter key, created once with `params` (secrets dropped), found by its tag after."""
        from mlflow.entities import LoggedModelStatus
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

        experiment_id = self.experiment_id()
        query = f"tags.`{ADAPTER_TAG}` = {_quote(adapter_id)}"
        with self._errors(f"model of adapter {adapter_id!r}"):
            found = self.client.search_logged_models(
                [experiment_id],
                filter_string=query,
                max_results=1,
                order_by=[{"field_name": "creation_timestamp", "ascending": True}],
            )
            if found:
                model = found[0]
            else:
                model = self.client.create_logged_model(
                    experiment_id,
                    name=adapter_id,
                    tags={ADAPTER_TAG: adapter_id, MLFLOW_MODEL_IS_EXTERNAL: "true"},
                    params={k: str(v) for k, v in params.items() if not is_secret_name(k)},
                    model_type=MODEL_TYPE,
                )
            if model.status != LoggedModelStatus.READY:
                self._finish_external(model)
            return str(model.model_id)

    def register(self, name: str, model_id: str, run_id: str, passed_at: str) -> str:
        """Make the LoggedModel a version of registered model `name` (once: found by its tag
        after) and point GATE_ALIAS at it unless the version holding the alias passed later
        (`passed_at`: ISO time of this passing evaluation); the version number."""
        from mlflow.exceptions import MlflowException
        from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

        with self._errors(f"registered model {name!r}"):
            try:
                self.client.create_registered_model(name)
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            query = f"name = {_quote(name)} AND tags.`{MODEL_ID_TAG}` = {_quote(model_id)}"
            found = self.client.search_model_versions(query, max_results=1)
            model = self.client.get_logged_model(model_id)
            # A file source, not models:/<id>: MLflow's sqlite registry resolves that through
            # the global tracking URI, not this client's.
            version = (
                found[0]
                if found
                else self.client.create_model_version(
                    name,
                    model.artifact_location,
                    run_id=run_id,
                    tags={MODEL_ID_TAG: model_id, ADAPTER_TAG: model.name},
                    await_creation_for=0,
                    model_id=model_id,
                )
            )
            number = str(version.version)
            if version.tags.get(PASSED_AT_TAG, "") < passed_at:
                self.client.set_model_version_tag(name, number, PASSED_AT_TAG, passed_at)
            links = json.loads(model.tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
            if {"name": name, "version": version.version} not in links:
                links.append({"name": name, "version": version.version})
                self.client.set_logged_model_tags(
                    model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)}
                )
            holder = self.client.get_registered_model(name).aliases.get(GATE_ALIAS)
            if holder is not None and str(holder) != number:
                held_since = self.client.get_model_version(name, str(holder)).tags
                if held_since.get(PASSED_AT_TAG, "") > passed_at:
                    return number
            self.client.set_registered_model_alias(name, GATE_ALIAS, number)
            return number

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
                metrics=_probe_metrics(result, _now_ms(), None),
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
        self._forget(run_id)
        with self._errors(f"run {run_id}"):
            self.client.set_terminated(run_id, status=status)

    def forget_run(self, adapter_id: str, dagster_run_id: str) -> None:
        """The next `run_for(..., reuse=True)` of this pair searches again (after a failure)."""
        self._open_runs.pop((adapter_id, dagster_run_id), None)

    def _forget(self, run_id: str) -> None:
        """A run this object terminates is looked up again by the next `run_for`."""
        for key in [k for k, v in self._open_runs.items() if v == run_id]:
            del self._open_runs[key]

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
                self._forget(run.info.run_id)
                self.client.set_terminated(run.info.run_id, status="FAILED")
        return len(found)

    def run_url(self, run_id: str) -> str | None:
        """Link to the run in the MLflow UI, or None when no `ui_url` is configured."""
        if self.ui_url is None:
            return None
        return f"{self.ui_url}/#/experiments/{self.experiment_id()}/runs/{run_id}"

    def _new_metrics(self, run: Run, metrics: list[Metric], model_id: str | None) -> list[Metric]:
        """Metrics the run does not already hold at the same value: a probe logged while the
        suite ran, or a copy caught up again, is one point in its history, not two. A value the
        run holds that `model_id` lacks is logged again at the point's own timestamp and step:
        MLflow keeps the run's one point and links it to the model."""
        from mlflow.entities import Metric

        held = run.data.metrics
        new = [m for m in metrics if held.get(m.key) != m.value]
        if model_id is None:
            return new
        run_id = run.info.run_id
        model = self.client.get_logged_model(model_id)
        linked = {(m.key, m.value) for m in model.metrics or () if m.run_id == run_id}
        for m in metrics:
            if held.get(m.key) == m.value and (m.key, m.value) not in linked:
                history = self.client.get_metric_history(run_id, m.key)
                point = max((p for p in history if p.value == m.value), key=_position)
                new.append(Metric(m.key, m.value, point.timestamp, point.step, model_id=model_id))
        return new

    def _new_params(self, run: Run, params: Mapping[str, str | int | float]) -> dict[str, str]:
        """Params not yet on the run, secrets dropped; a changed value raises."""
        wanted = {str(k): str(v) for k, v in params.items() if not is_secret_name(str(k))}
        existing = run.data.params
        changed = sorted(k for k, v in wanted.items() if k in existing and existing[k] != v)
        if changed:
            detail = ", ".join(f"{k}: {existing[k]!r} -> {wanted[k]!r}" for k in changed)
            raise TrackingError(
                f"run {run.info.run_id}: MLflow params are immutable and these would change: "
                f"{detail}; log to a new run instead"
            )
        return {k: v for k, v in wanted.items() if k not in existing}

    def _finish_external(self, model: LoggedModel) -> None:
        """Give the model the MLmodel file of an external model and mark it READY: what
        `mlflow.create_external_model` does, through this client instead of the global one."""
        from mlflow.models.model import MLMODEL_FILE_NAME
        from mlflow.models.utils import get_external_mlflow_model_spec

        with tempfile.TemporaryDirectory(prefix="sway-model-") as tmp:
            get_external_mlflow_model_spec(model).save(str(Path(tmp) / MLMODEL_FILE_NAME))
            self.client.log_model_artifacts(model.model_id, tmp)
        self.client.finalize_logged_model(model.model_id, "READY")

    @contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn whatever the client raises into TrackingError naming `what` and the tracking
        URI: MLflow's own exceptions, and what leaks past them (a locked sqlite store raises
        sqlalchemy's OperationalError, a refused connection requests' ConnectionError)."""
        from mlflow.exceptions import MlflowException

        started = time.monotonic()
        try:
            yield
        except TrackingError:
            raise
        except MlflowException as exc:
            slow = time.monotonic() - started >= SLOW_FAILURE_S
            raise TrackingError(f"{what} at {self.tracking_uri}: {exc.message}", slow=slow) from exc
        except Exception as exc:
            slow = time.monotonic() - started >= SLOW_FAILURE_S
            detail = str(exc).splitlines()[0] if str(exc) else ""
            raise TrackingError(
                f"{what} at {self.tracking_uri}: {type(exc).__name__}: {detail}", slow=slow
            ) from exc


def is_secret_name(name: str) -> bool:
    """True for names that look like credentials (api_key, hf_token, client_secret...)."""
    lowered = name.lower()
    return any(marker in lowered for marker in SECRET_MARKERS)


def probe_table(suite: SuiteResult) -> dict[str, list[Any]]:
    """The probe rows as TABLE_COLUMNS, one value per probe (a number that is not finite is
    None), for `MlflowTracking.log_table`."""
    rows = [
        {
            "probe": r.name,
            "kind": r.kind,
            "verdict": r.verdict.value,
            "raw": finite(r.raw),
            "z": finite(r.z),
            "p": finite(r.p),
            "q": finite(r.evidence.get("q")),
            "score": finite(r.score),
            "message": r.message,
        }
        for r in suite.probes
    ]
    return {column: [row[column] for row in rows] for column in TABLE_COLUMNS}


def _probe_metrics(result: ProbeResult, timestamp_ms: int, model_id: str | None) -> list[Metric]:
    from mlflow.entities import Metric

    metrics = []
    for field_name in PROBE_METRICS:
        value = finite(getattr(result, field_name))
        if value is not None:
            key = f"{result.name}/{field_name}"
            metrics.append(Metric(key, value, timestamp_ms, 0, model_id=model_id))
    # The raw's 95% interval where the probe has one (forgetting_budget's nats/token, say):
    # MLflow's run comparison charts it beside the raw.
    for bound, value in zip(("ci_lo", "ci_hi"), result.ci_95 or (), strict=False):
        if (v := finite(value)) is not None:
            key = f"{result.name}/{bound}"
            metrics.append(Metric(key, v, timestamp_ms, 0, model_id=model_id))
    return metrics


def _position(metric: Metric) -> tuple[int, int]:
    return (metric.step, metric.timestamp)


def _note(markdown: str) -> str:
    """`markdown` whole when it fits a tag value, else its first lines and where the rest is."""
    if len(markdown) <= NOTE_LIMIT:
        return markdown
    tail = "\n*(cut to fit MLflow's description: the whole report is the artifact report.md)*\n"
    head = markdown[: NOTE_LIMIT - len(tail)]
    return head[: head.rfind("\n") + 1] + tail


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
