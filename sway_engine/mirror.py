"""MLflow as a mirror of the result store.

DuckDB is the record: an evaluation is done when its run is complete there. MLflow holds a
copy for browsing and comparing. Its faults (server down, sqlite store locked, artifact disk
full) never fail an evaluation that DuckDB recorded:

- every request has a short client deadline (`tracking.CLIENT_DEADLINES`);
- after a slow failure this process leaves that tracking URI alone for `COOLDOWN_S`, so the
  other steps of a run do not each wait for the same dead server;
- the run is marked `pending` in the store, with the error and what to copy, and is copied by
  the next publication that reaches MLflow (`catch_up`) or by `sway sync-mlflow`;
- an MLflow run whose copy failed half-way is marked FAILED (when MLflow answers at all).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sway_engine import __version__
from sway_engine.report.plots import plot_of, trend_plot
from sway_engine.result import ProbeResult
from sway_engine.store.results import MLFLOW_PENDING, MLFLOW_SYNCED, ResultStore
from sway_engine.tracking import TABLE_FILE, MlflowTracking, TrackingError, probe_table

T = TypeVar("T")

COOLDOWN_S = 60.0
CATCH_UP_LIMIT = 20  # older pending runs copied per publication; `sway sync-mlflow` takes all
_down: dict[str, tuple[float, str]] = {}  # tracking URI -> (monotonic retry time, why)
MODEL_PARAMS = ("base_model", "rank", "alpha", "target_modules")  # of history.mlflow_params


@dataclass(frozen=True)
class Published:
    """What became of one run's copy: synced (error None) or pending."""

    run_id: str
    mlflow_run_id: str | None
    url: str | None
    error: str | None

    @property
    def synced(self) -> bool:
        return self.error is None


class Mirror:
    """Copies evaluations from `store` into the MLflow experiment of `tracking`."""

    def __init__(
        self,
        tracking: MlflowTracking,
        store: ResultStore,
        warn: Callable[[str], None] = lambda _message: None,
        dagster_ui: str | None = None,
    ) -> None:
        self.tracking = tracking
        self.store = store
        self.warn = warn
        # The Dagster UI's base URL: a run's copy links to its Dagster run (None: no link).
        self.dagster_ui = dagster_ui.rstrip("/") if dagster_ui else None

    def preview(
        self, adapter_id: str, dagster_run_id: str, tags: Mapping[str, str], result: ProbeResult
    ) -> str | None:
        """Log one probe as soon as it is computed, so the MLflow run fills in while the suite
        runs; the link to the run, or None. Best effort: `publish` copies it all again."""

        def work() -> str | None:
            mlflow_id = self.tracking.run_for(adapter_id, dagster_run_id, tags, reuse=True)
            self.tracking.log_probe(mlflow_id, result)
            png = plot_of(result)
            if png is not None:
                self.tracking.log_figure_png(mlflow_id, png, f"plots/{result.name}.png")
            return self.tracking.run_url(mlflow_id)

        try:
            return self._guarded(work)
        except TrackingError as exc:
            self.tracking.forget_run(adapter_id, dagster_run_id)  # found again next time
            self.warn(f"MLflow: {result.name} of {adapter_id} not logged yet ({exc})")
            return None

    def publish(
        self,
        run_id: str,
        params: Mapping[str, Any],
        trace: Path | None = None,
        register: str | None = None,
    ) -> Published:
        """Copy the complete evaluation `run_id` into its MLflow run (the one its probes logged
        to, else a new one) and mark it synced; when MLflow fails, mark it pending instead.
        `register`: the registered model a gate-passing adapter becomes a version of."""
        run = self.store.run_row(run_id)
        if run is None:
            raise TrackingError(f"run {run_id}: not in the result store {self.store.path}")
        target = {"experiment": self.tracking.experiment, "params": dict(params)}
        if trace is not None:
            target["trace"] = str(trace)
        if register is not None:
            target["register"] = register
        started: list[str] = []
        try:
            mlflow_id = self._guarded(lambda: self._copy(run, params, trace, register, started))
        except TrackingError as exc:
            if started:
                self._mark_failed(started[0])
            self.store.mark_mlflow(run_id, MLFLOW_PENDING, error=str(exc), params=target)
            self.warn(
                f"MLflow: run {run_id} recorded in DuckDB but not copied to MLflow ({exc}); "
                "it is pending and will be copied by the next evaluation or `sway sync-mlflow`"
            )
            return Published(run_id, started[0] if started else None, None, str(exc))
        self.store.mark_mlflow(run_id, MLFLOW_SYNCED, mlflow_run_id=mlflow_id, params=target)
        return Published(run_id, mlflow_id, self._url(mlflow_id), None)

    def catch_up(self, limit: int | None = CATCH_UP_LIMIT) -> list[Published]:
        """Copy pending runs of this experiment, oldest first, stopping at the first failure
        (MLflow is still down: the rest stay pending)."""
        done: list[Published] = []
        for run in self.store.mlflow_pending()[:limit]:
            target = run.get("mlflow_params") or {}
            if target.get("experiment", self.tracking.experiment) != self.tracking.experiment:
                continue
            trace = Path(target["trace"]) if target.get("trace") else None
            params = target.get("params") or {}
            published = self.publish(run["run_id"], params, trace, target.get("register"))
            done.append(published)
            if not published.synced:
                break
        return done

    def _copy(
        self,
        run: Mapping[str, Any],
        params: Mapping[str, Any],
        trace: Path | None,
        register: str | None,
        started: list,
    ) -> str:
        suite = self.store.suite_of(run["run_id"])
        tracking = self.tracking
        adapter = next(
            (a for a in self.store.adapters() if a["adapter_id"] == run["adapter_id"]), {}
        )
        tags = self._tags(run, adapter)
        mlflow_id = tracking.run_for(
            run["adapter_id"], run["dagster_run_id"] or run["run_id"], tags
        )
        started.append(mlflow_id)
        tracking.set_tags(mlflow_id, tags)  # a run the probes' previews created lacks some
        model_id = tracking.logged_model(run["adapter_id"], _model_params(params, adapter))
        tracking.log_suite(mlflow_id, suite, {k: v for k, v in params.items()}, model_id)
        tracking.log_table(mlflow_id, probe_table(suite), TABLE_FILE)
        tracking.log_json(mlflow_id, suite.to_dict(), "results.json")
        from sway_engine.report.html import recorded_gate, to_html
        from sway_engine.report.text import to_markdown

        report = to_markdown(suite)
        tracking.log_text(mlflow_id, report, "report.md")
        tracking.describe(mlflow_id, report)
        passed = self.store.gate_passed(run["run_id"])
        gate = recorded_gate(suite, passed)
        tracking.log_text(mlflow_id, to_html(suite, gate), "report.html")
        for result in suite.probes:
            png = plot_of(result)
            if png is not None:
                tracking.log_figure_png(mlflow_id, png, f"plots/{result.name}.png")
        self._trends(mlflow_id, run, adapter, suite.probes)
        if trace is not None and trace.is_file():
            tracking.log_artifact_file(mlflow_id, trace)
        if register is not None and passed:
            passed_at = run["finished_at"].isoformat() if run.get("finished_at") else ""
            tracking.register(register, model_id, mlflow_id, passed_at)
        tracking.finish(mlflow_id)
        return mlflow_id

    def _trends(
        self,
        mlflow_id: str,
        run: Mapping[str, Any],
        adapter: Mapping[str, Any],
        probes: Sequence[ProbeResult],
    ) -> None:
        """forgetting_budget's spending over every evaluation of the adapter's lineage (its
        directory name: each version of its weights) up to this one, as a chart."""
        spent = [r for r in probes if r.kind == "forgetting_budget" and r.raw is not None]
        if not spent or not adapter.get("name"):
            return
        rows = [
            r
            for r in self.store.lineage(str(adapter["name"]))
            if r["status"] == "complete" and r["name"] == adapter["name"]
        ]
        upto = next((i for i, r in enumerate(rows) if r["run_id"] == run["run_id"]), None)
        rows = rows if upto is None else rows[: upto + 1]
        budget = spent[0].evidence.get("max_nats_per_token")
        png = trend_plot(
            spent[0].name, rows, float(budget) if isinstance(budget, int | float) else None
        )
        if png is not None:
            self.tracking.log_figure_png(mlflow_id, png, f"plots/{spent[0].name}_trend.png")

    def _tags(self, run: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, str]:
        tags = {
            "dagster.partition": run["adapter_id"],
            "sway.engine_version": __version__,
            "sway.run_id": run["run_id"],  # the evaluation in DuckDB
        }
        if adapter.get("sha256"):
            tags["sway.adapter_sha"] = adapter["sha256"]
        if run.get("origin"):
            tags["sway.origin"] = run["origin"]
        if run.get("dagster_run_id") and self.dagster_ui:
            tags["sway.dagster_run_url"] = f"{self.dagster_ui}/runs/{run['dagster_run_id']}"
        return tags

    def _mark_failed(self, mlflow_id: str) -> None:
        try:
            self.tracking.finish(mlflow_id, "FAILED")
        except TrackingError:
            return

    def _url(self, mlflow_id: str) -> str | None:
        try:
            return self.tracking.run_url(mlflow_id)
        except TrackingError:
            return None

    def _guarded(self, work: Callable[[], T]) -> T:
        """Run `work` unless MLflow failed slowly in this process within COOLDOWN_S. Only a
        slow failure (a dead server's retries, a locked db's busy wait: the failing call itself
        was slow, `TrackingError.slow`) is remembered: one that fails at once (a full artifact
        disk) costs nothing to meet again, and later calls can still close the run it left
        open. The failing call is timed, not `work`: on a busy machine the calls that succeeded
        before it would make a full disk look like a dead server."""
        uri = self.tracking.tracking_uri
        until, why = _down.get(uri, (0.0, ""))
        if time.monotonic() < until:
            raise TrackingError(f"{uri} failed {why!r} less than {COOLDOWN_S:g} s ago; not tried")
        try:
            result = work()
        except TrackingError as exc:
            if exc.slow:
                _down[uri] = (time.monotonic() + COOLDOWN_S, str(exc)[:200])
            raise
        _down.pop(uri, None)
        return result


def _model_params(params: Mapping[str, Any], adapter: Mapping[str, Any]) -> dict[str, Any]:
    """The adapter's LoggedModel params: its part of the run's params, and its weights' hash."""
    found = {k: params[k] for k in MODEL_PARAMS if k in params}
    if adapter.get("sha256"):
        found["weights_sha256"] = adapter["sha256"]
    return found


def forget_failures() -> None:
    """Forget remembered MLflow failures (tests; a long-lived process after a fix)."""
    _down.clear()


__all__ = ["COOLDOWN_S", "Mirror", "Published", "forget_failures", "plot_of"]
