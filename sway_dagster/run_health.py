"""Runs that die are marked failed, and so are their evaluations.

Dagster's run monitoring (on in dagster.yaml) fails runs that never start and cancels that
never finish, but with the default run launcher it cannot tell that a run worker died (kill -9,
the kernel's out-of-memory killer): the launcher has no worker health check, and such a run
stays STARTED forever, holding its concurrency slot. `dead_run_reaper` is that check for
workers on this machine: a STARTED run whose worker process is gone is reported failed, its
slots are freed, and `run_retries` launches it again once.

`sway_failed_runs` then closes what the run left open: its incomplete DuckDB evaluations are
marked failed (they were never shown; now they say why) and its MLflow runs FAILED.
"""

from __future__ import annotations

import dagster as dg
import psutil
from dagster._core.events import DagsterEventType
from dagster._core.launcher import DefaultRunLauncher

from sway_dagster.resources import MlflowResource, ResultStoreResource
from sway_engine.tracking import TrackingError


def worker_pid(instance: dg.DagsterInstance, run_id: str) -> int | None:
    """The process that ran `run_id`: the pid its RUN_START event was written from."""
    started = instance.all_logs(run_id, of_type=DagsterEventType.RUN_START)
    event = started[-1].dagster_event if started else None
    return event.pid if event is not None and event.pid else None


def is_gone(pid: int) -> bool:
    """True when no live process has this pid (a killed worker its parent has not reaped yet
    is a zombie: gone too)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
    except psutil.AccessDenied:
        return False


def dead_runs(instance: dg.DagsterInstance) -> list[tuple[dg.DagsterRun, int]]:
    """STARTED runs launched on this machine whose worker process is gone."""
    if not isinstance(instance.run_launcher, DefaultRunLauncher):
        return []  # workers elsewhere (k8s, celery): their launcher's health check applies
    found = []
    for record in instance.get_run_records(
        filters=dg.RunsFilter(statuses=[dg.DagsterRunStatus.STARTED])
    ):
        run = record.dagster_run
        pid = worker_pid(instance, run.run_id)
        if pid is not None and is_gone(pid):
            found.append((run, pid))
    return found


def make_reaper_sensor(minimum_interval_seconds: int = 30) -> dg.SensorDefinition:
    @dg.sensor(
        name="dead_run_reaper",
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Marks STARTED runs whose worker process died (kill -9, out of memory) "
        "as failed; Dagster's run monitoring cannot see that with the default launcher.",
    )
    def dead_run_reaper(context: dg.SensorEvaluationContext) -> dg.SkipReason:
        dead = dead_runs(context.instance)
        for run, pid in dead:
            message = (
                f"run worker (pid {pid}) is gone: killed or out of memory. Its evaluations stay "
                "incomplete and are never shown; run_retries launches it again once"
            )
            context.log.warning(f"{run.run_id}: {message}")
            context.instance.report_run_failed(run, message)
            # The dead worker held the "model" pool's slot: without this the next model step
            # of every run waits until the daemon's free_slots_after_run_end_seconds.
            storage = context.instance.event_log_storage
            if storage.supports_global_concurrency_limits:
                storage.free_concurrency_slots_for_run(run.run_id)
        return dg.SkipReason(f"{len(dead)} dead run(s) marked failed" if dead else "all alive")

    return dead_run_reaper


@dg.run_failure_sensor(
    name="sway_failed_runs",
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Marks a failed run's incomplete DuckDB evaluations failed and its MLflow "
    "runs FAILED.",
)
def sway_failed_runs(
    context: dg.RunFailureSensorContext, results: ResultStoreResource, mlflow: MlflowResource
) -> None:
    run_id = context.dagster_run.run_id
    why = context.failure_event.message or "the Dagster run failed"
    closed = results.store().fail_runs_of(run_id, why)
    try:
        marked = mlflow.tracking().fail_runs_of(run_id)
    except TrackingError as exc:
        context.log.warning(f"MLflow runs of {run_id} not marked FAILED: {exc}")
        marked = 0
    context.log.info(f"{run_id}: {closed} evaluation(s) failed in DuckDB, {marked} in MLflow")
