"""Two adapters side by side: probe-by-probe differences oriented by each probe's direction,
and whether each is beyond both adapters' nulls. `sway compare` reads two recorded
evaluations; `sway diff` computes both in one process over one base load (`evaluate_pair`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sway_engine.backends.build import build_backend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.errors import SwayError
from sway_engine.probes.registry import Entry
from sway_engine.result import ProbeResult, SuiteResult
from sway_engine.runner import Progress, error_results, evaluate, run_suite, suite_result
from sway_engine.spec import SuiteSpec
from sway_engine.suite import document_of

NOISE_SIGMAS = 3.0  # a difference counts when it exceeds this many null stds of both runs


def compare_probes(a: Sequence[ProbeResult], b: Sequence[ProbeResult]) -> list[dict[str, Any]]:
    """Per-probe rows for the probes both results have, in `a`'s order: verdicts, raws, z, the
    difference oriented so that positive is better (each probe's direction), whether it is
    beyond both runs' nulls (|delta| > NOISE_SIGMAS null stds of each), and whether `b`
    regressed (worse beyond both nulls, or a PASS became FAIL or ERROR)."""
    from sway_engine.probes.registry import PROBES

    by_name = {r.name: r for r in b}
    out = []
    for ra in a:
        rb = by_name.get(ra.name)
        if rb is None:
            continue
        sign = PROBES[ra.kind].z_sign if ra.kind in PROBES else 1
        delta = None if ra.raw is None or rb.raw is None else sign * (rb.raw - ra.raw)
        noise = [r.null.std for r in (ra, rb) if r.null is not None and r.null.std is not None]
        beyond = bool(
            delta is not None and noise and all(abs(delta) > NOISE_SIGMAS * s for s in noise)
        )
        broke = ra.verdict.value == "pass" and rb.verdict.value in ("fail", "error")
        out.append(
            {
                "probe": ra.name,
                "kind": ra.kind,
                "verdict_a": ra.verdict.value,
                "verdict_b": rb.verdict.value,
                "raw_a": ra.raw,
                "raw_b": rb.raw,
                "z_a": ra.z,
                "z_b": rb.z,
                "delta": delta,
                "beyond_nulls": beyond,
                "regression": broke or (beyond and delta is not None and delta < 0),
            }
        )
    return out


def evaluate_pair(
    spec: SuiteSpec,
    entries: list[Entry],
    adapters: Sequence[str | Path],
    *,
    spec_path: str = "<memory>",
    trace_path: Path | None = None,
    progress: Progress | None = None,
) -> list[SuiteResult]:
    """The suite on each adapter in turn over one base load: the adapter is swapped in place
    (`load_adapter`) and the request cache reset between them, so each result equals a run of
    that adapter alone. A backend that cannot swap adapters (api, custom) is built per adapter.
    An adapter that fails to load gets ERROR rows; the others still run."""
    document_of(spec)
    model = spec.models.ft.model_copy(update={"adapter": None})
    started, t0 = datetime.now(UTC), time.perf_counter()
    try:
        inner = build_backend(model)
    except SwayError as exc:
        rows = error_results(entries, f"preflight failed: {exc}")
        return [suite_result(spec, spec_path, str(a), started, t0, rows, None) for a in adapters]
    if not callable(getattr(inner, "load_adapter", None)):
        inner.close()
        return [
            evaluate(spec, entries, spec_path=spec_path, adapter=str(a), trace_path=trace_path)
            for a in adapters
        ]
    backend = Instrumented(inner, trace_path=trace_path)
    out = []
    try:
        for adapter in adapters:
            backend.reset()
            try:
                inner.load_adapter(str(adapter))  # type: ignore[attr-defined]
            except SwayError as exc:
                rows = error_results(entries, f"preflight failed: {exc}")
                out.append(suite_result(spec, spec_path, str(adapter), started, t0, rows, backend))
                continue
            out.append(
                run_suite(
                    spec,
                    entries,
                    backend,
                    spec_path=spec_path,
                    adapter=str(adapter),
                    progress=progress,
                )
            )
    finally:
        backend.close()
    return out
