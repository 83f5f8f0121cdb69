"""Composite score, bands and the gate decision (upstream rules, ERROR made visible)."""

from __future__ import annotations

from collections.abc import Sequence

from sway_engine.result import ProbeResult, SwayScore, Verdict


def band_for(overall: float) -> str:
    if overall < 0.30:
        return "noise"
    if overall < 0.60:
        return "partial"
    if overall <= 0.85:
        return "healthy"
    return "suspicious"


def compute(results: Sequence[ProbeResult], weights: dict[str, float]) -> SwayScore:
    """Per category, the weighted mean of probe scores; then categories by `weights`.

    SKIP and ERROR rows do not contribute (an ERROR fails the gate instead).
    """
    sums: dict[str, float] = {}
    wsum: dict[str, float] = {}
    for r in results:
        if r.verdict in (Verdict.SKIP, Verdict.ERROR) or r.score is None:
            continue
        sums[r.category] = sums.get(r.category, 0.0) + r.weight * r.score
        wsum[r.category] = wsum.get(r.category, 0.0) + r.weight
    components = {c: (sums[c] / wsum[c] if wsum[c] > 0 else 0.0) for c in sums}
    active = [c for c in weights if c in components]
    denom = sum(weights[c] for c in active)
    overall = sum(weights[c] * components[c] for c in active) / denom if denom > 0 else 0.0
    findings: list[str] = []
    for r in results:
        if r.verdict == Verdict.FAIL:
            findings.append(f"{r.name} ({r.kind}) failed: {r.message}")
            break
    for c, s in components.items():
        if 0 < s < 0.3 and weights.get(c, 0) > 0:
            findings.append(f"{c} score is {s:.2f}, below the noise threshold")
    errors = sum(r.verdict == Verdict.ERROR for r in results)
    if errors:
        findings.append(f"{errors} probe(s) errored; see the report")
    full = {c: components.get(c, 0.0) for c in weights}
    return SwayScore(overall, band_for(overall), full, dict(weights), tuple(findings[:5]))


def gate(results: Sequence[ProbeResult], score: SwayScore, threshold: float) -> tuple[bool, str]:
    """Pass needs no FAIL, no ERROR and overall >= threshold."""
    failed = [r.name for r in results if r.verdict == Verdict.FAIL]
    errored = [r.name for r in results if r.verdict == Verdict.ERROR]
    if errored:
        return False, f"errored: {', '.join(errored)}"
    if failed:
        return False, f"failed: {', '.join(failed)}"
    if score.overall < threshold:
        return False, f"overall {score.overall:.2f} < threshold {threshold:.2f}"
    return True, f"overall {score.overall:.2f} >= {threshold:.2f}, no FAIL or ERROR"
