"""Two adapters side by side: probe-by-probe differences oriented by each probe's direction,
and whether each is beyond both adapters' nulls. `sway compare` reads two recorded
evaluations; `sway diff` computes both in one process over one base load
(`multi.evaluate_each`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sway_engine.result import ProbeResult

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
