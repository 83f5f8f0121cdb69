"""A JSONL trace (`sway run --trace FILE`, Dagster's trace.jsonl) summarised: per probe, wall
time, requests, how many were computed or served from the cache, and the backend's work
(rows forwarded, passes, tokens); per view, requests computed and cache hits. Wall time and
rows are per probe only: one batch mixes the rows of many views.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sway_engine.backends.instrumentation import TRACED
from sway_engine.errors import SwayError

WORK = TRACED  # the backend counters each event carries


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of a trace file; a line that is not a JSON object is named with its number."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise SwayError(f"{path}: cannot read the trace ({exc.strerror or exc})") from exc
    events = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except ValueError:
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("requests"), int):
            raise SwayError(
                f"{path}:{number}: not a sway trace event (a JSON object with requests, "
                "computed, wall_ms); write traces with `sway run --trace FILE`"
            )
        events.append(event)
    return events


def summarize(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Totals, per-probe rows (in order of first appearance) and per-view rows (most computed
    first)."""
    probes: dict[str, dict[str, Any]] = {}
    views: dict[str, dict[str, int]] = {}
    for e in events:
        row = probes.setdefault(
            e.get("probe") or "(run)",
            {"executes": 0, "requests": 0, "computed": 0, "cache_hits": 0, "wall_s": 0.0}
            | dict.fromkeys(WORK, 0),
        )
        computed = int(e.get("computed", 0))
        row["executes"] += 1
        row["requests"] += int(e["requests"])
        row["computed"] += computed
        row["cache_hits"] += int(e["requests"]) - computed
        row["wall_s"] += float(e.get("wall_ms", 0.0)) / 1000
        for key, value in (e.get("backend") or {}).items():
            if key in WORK:
                row[key] += value
        for view, counts in (e.get("views") or {}).items():
            slot = views.setdefault(view, {"computed": 0, "hits": 0})
            slot["computed"] += int(counts.get("computed", 0))
            slot["hits"] += int(counts.get("hits", 0))
    total = {
        key: sum(r[key] for r in probes.values())
        for key in ("executes", "requests", "computed", "cache_hits", "wall_s", *WORK)
    }
    return {
        "events": len(events),
        "total": total,
        "probes": [{"probe": name, **row} for name, row in probes.items()],
        "views": [
            {"view": name, **counts}
            for name, counts in sorted(views.items(), key=lambda kv: (-kv[1]["computed"], kv[0]))
        ],
    }
