"""The adapter sensor: a new adapter (or new weights) becomes a partition and an evaluation run."""

from __future__ import annotations

import json

import dagster as dg

from sway_dagster.adapter_store import WAITING, AdapterStoreResource, Candidate
from sway_dagster.partitions import ADAPTERS, adapters

ADAPTER_FILES = dg.AssetKey("adapter_files")


def make_adapter_sensor(
    job_name: str = "evaluate_adapter",
    *,
    minimum_interval_seconds: int = 30,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.RUNNING,
) -> dg.SensorDefinition:
    """The sensor that scans `AdapterStoreResource.root`, one `job_name` run per new adapter."""

    @dg.sensor(
        job_name=job_name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description="Adds an `adapters` partition and requests an evaluation run for each "
        "settled adapter directory whose weights have not been seen yet.",
    )
    def adapter_sensor(
        context: dg.SensorEvaluationContext, adapter_store: AdapterStoreResource
    ) -> dg.SensorResult | dg.SkipReason:
        root = adapter_store.root_path
        if not root.is_dir():
            context.log.warning(f"adapter root {root} does not exist; nothing to scan")
            return dg.SkipReason(f"adapter root {root} does not exist")
        known = _read_cursor(context)
        candidates = adapter_store.scan(known=known)
        context.update_cursor(_cursor(candidates))
        existing = set(context.instance.get_dynamic_partitions(ADAPTERS))
        new: list[Candidate] = []
        for c in candidates:
            if c.status in WAITING:  # routine until it settles: debug, not a line per tick
                context.log.debug(f"waiting for {c.name}: {c.reason}")
            elif c.status != "ready":
                context.log.info(f"skipping {c.name}: {c.reason}")
            elif c.key not in existing:
                new.append(c)
        if not new:
            return dg.SkipReason(f"no new adapters in {root}")
        for c in new:
            context.log.info(f"new adapter {c.name}: partition {c.key}")
        return dg.SensorResult(
            run_requests=[
                dg.RunRequest(partition_key=c.key, run_key=c.key, tags={"sway/adapter": c.name})
                for c in new
            ],
            dynamic_partitions_requests=[adapters.build_add_request([str(c.key) for c in new])],
            asset_events=[
                dg.AssetObservation(
                    asset_key=ADAPTER_FILES,
                    partition=c.key,
                    metadata={
                        "path": dg.MetadataValue.path(str(c.path)),
                        "sha256": c.sha256,
                        "size_bytes": c.size_bytes,
                    },
                )
                for c in new
            ],
        )

    return adapter_sensor


def _read_cursor(context: dg.SensorEvaluationContext) -> dict[str, tuple[str, str]]:
    """Directory name -> (weights stamp, sha256) from the previous tick ({} if unreadable)."""
    if not context.cursor:
        return {}
    try:
        raw = json.loads(context.cursor)
        return {str(name): (str(v[0]), str(v[1])) for name, v in raw.items()}
    except (ValueError, TypeError, AttributeError, IndexError, KeyError):
        context.log.warning("ignoring an unreadable cursor; every adapter will be hashed again")
        return {}


def _cursor(candidates: list[Candidate]) -> str:
    """Remember the weights stamp and hash of every ready directory."""
    return json.dumps(
        {c.name: [c.stamp, c.sha256] for c in candidates if c.status == "ready" and c.stamp},
        sort_keys=True,
    )


adapter_sensor = make_adapter_sensor()
