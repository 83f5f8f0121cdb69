"""Composite score, bands, multiplicity and the gate decision.

Two composites. `evidence` (default): an adapter earns credit only for significant effects
beyond the null adapters, graded by how far below alpha their (Benjamini-Hochberg adjusted)
p-values are; a guard rail that failed takes credit away and one that did not fail adds none.
`upstream`: dlm-sway's category-weighted mean of per-probe scores (parity). docs/PROBES.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace

from sway_engine import stats
from sway_engine.result import ProbeResult, SwayScore, Verdict

# Evidence bands: what an overall means, not a grade.
BANDS = (
    (0.0, "indistinguishable from random"),
    (0.35, "weak evidence"),
    (0.70, "partial evidence"),
    (math.inf, "strong evidence"),
)
# How much of the evidence failed guard rails take away (all of them failing: half).
HARM_PENALTY = 0.5
# Orders of magnitude below alpha at which a PASS earns full credit.
FULL_CREDIT_DECADES = 2.0


def claim_of(kind: str) -> str:
    """ "effect" or "harm" (guard rails) for a probe kind; "none" for kinds that never judge."""
    from sway_engine.probes.registry import PROBES

    cls = PROBES.get(kind)
    if cls is None or not cls.calibrated:
        return "none"
    return cls.claim


def adjust_for_multiplicity(
    results: Sequence[ProbeResult], alpha: float = stats.DEFAULT_ALPHA
) -> list[ProbeResult]:
    """Benjamini-Hochberg over the suite's calibrated effect claims (those with a p).

    Each such result gets `q` in evidence; a PASS whose q exceeds its alpha becomes FAIL
    ("not significant after correcting for N claims"). Guard rails keep their own alpha: a
    false harm alarm errs on the user's side. Under the global null (an adapter from the null
    family) BH bounds the chance of any false PASS in the suite by alpha.
    """
    family = [
        i
        for i, r in enumerate(results)
        if r.p is not None and claim_of(r.kind) == "effect" and r.verdict != Verdict.ERROR
    ]
    qs = stats.benjamini_hochberg([float(results[i].p) for i in family])  # type: ignore[arg-type]
    out = list(results)
    for i, q in zip(family, qs, strict=True):
        r = out[i]
        level = float(r.evidence.get("significance", {}).get("alpha") or alpha)
        evidence = {**r.evidence, "q": q, "family": len(family)}
        if r.verdict == Verdict.PASS and q > level:
            msg = (
                f"not significant after correcting for {len(family)} claims "
                f"(Benjamini-Hochberg q={q:.2g} > alpha {level:g}): {r.message}"
            )
            out[i] = replace(r, verdict=Verdict.FAIL, message=msg, evidence=evidence)
        else:
            out[i] = replace(r, evidence=evidence)
    return out


def band_for(overall: float) -> str:
    if overall <= 0.0:
        return BANDS[0][1]
    for limit, name in BANDS[1:]:
        if overall < limit:
            return name
    return BANDS[-1][1]


def upstream_band(overall: float) -> str:
    if overall < 0.30:
        return "noise"
    if overall < 0.60:
        return "partial"
    if overall <= 0.85:
        return "healthy"
    return "suspicious"


def evidence_of(r: ProbeResult, alpha: float) -> float:
    """A PASS earns 0.5 at q = alpha, rising to 1 at FULL_CREDIT_DECADES below; else 0."""
    if r.verdict != Verdict.PASS:
        return 0.0
    q = r.evidence.get("q", r.p)
    if q is None:
        return 0.5
    level = float(r.evidence.get("significance", {}).get("alpha") or alpha)
    decades = math.log10(level / max(float(q), 1e-300))
    return 0.5 + 0.5 * min(1.0, max(0.0, decades / FULL_CREDIT_DECADES))


def compute(
    results: Sequence[ProbeResult],
    weights: dict[str, float],
    *,
    mode: str = "evidence",
    alpha: float = stats.DEFAULT_ALPHA,
) -> SwayScore:
    """The composite of `mode` ("evidence" or "upstream"); SKIP and ERROR rows never count."""
    if mode == "upstream":
        return _upstream(results, weights)
    sums: dict[str, float] = {}
    wsum: dict[str, float] = {}
    harm_w = harm_total = 0.0
    for r in results:
        if r.verdict in (Verdict.SKIP, Verdict.ERROR):
            continue
        claim = claim_of(r.kind)
        w = r.weight * weights.get(r.category, 0.0)
        if claim == "harm":
            harm_total += w
            harm_w += w if r.verdict == Verdict.FAIL else 0.0
        elif claim == "effect":
            sums[r.category] = sums.get(r.category, 0.0) + w * evidence_of(r, alpha)
            wsum[r.category] = wsum.get(r.category, 0.0) + w
    total = sum(wsum.values())
    evidence = sum(sums.values()) / total if total > 0 else 0.0
    harmed = harm_w / harm_total if harm_total > 0 else 0.0
    overall = evidence * (1.0 - HARM_PENALTY * harmed)
    components = {c: (sums.get(c, 0.0) / wsum[c] if wsum.get(c) else 0.0) for c in weights}
    return SwayScore(overall, band_for(overall), components, dict(weights), _findings(results))


def _upstream(results: Sequence[ProbeResult], weights: dict[str, float]) -> SwayScore:
    """Per category, the weighted mean of probe scores; then categories by `weights`."""
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
    findings = list(_findings(results))
    for c, s in components.items():
        if 0 < s < 0.3 and weights.get(c, 0) > 0:
            findings.append(f"{c} score is {s:.2f}, below the noise threshold")
    full = {c: components.get(c, 0.0) for c in weights}
    return SwayScore(overall, upstream_band(overall), full, dict(weights), tuple(findings[:5]))


def _findings(results: Sequence[ProbeResult]) -> tuple[str, ...]:
    findings: list[str] = []
    for r in results:
        if r.verdict == Verdict.FAIL:
            findings.append(f"{r.name} ({r.kind}) failed: {r.message}")
            break
    uncalibrated = [r.name for r in results if r.evidence.get("uncalibrated")]
    if uncalibrated:
        findings.append(f"uncalibrated: {', '.join(uncalibrated)}")
    errors = sum(r.verdict == Verdict.ERROR for r in results)
    if errors:
        findings.append(f"{errors} probe(s) errored; see the report")
    return tuple(findings[:5])


def blocker(r: ProbeResult, *, allow_uncalibrated: bool = False) -> str | None:
    """Why this verdict alone fails the gate ("errored", "failed", "uncalibrated"), or None."""
    if r.verdict == Verdict.ERROR:
        return "errored"
    if r.verdict == Verdict.FAIL:
        return "failed"
    if r.verdict == Verdict.WARN and r.evidence.get("uncalibrated") and not allow_uncalibrated:
        return "uncalibrated"
    return None


def gate(
    results: Sequence[ProbeResult],
    score: SwayScore,
    threshold: float,
    *,
    allow_uncalibrated: bool = False,
) -> tuple[bool, str]:
    """Pass needs no FAIL, no ERROR, no uncalibrated probe (unless allowed) and
    overall >= threshold. An AND of per-probe verdicts needs no multiplicity correction."""
    why = [(r.name, blocker(r, allow_uncalibrated=allow_uncalibrated)) for r in results]
    errored = [name for name, w in why if w == "errored"]
    failed = [name for name, w in why if w == "failed"]
    uncalibrated = [name for name, w in why if w == "uncalibrated"]
    if errored:
        return False, f"errored: {', '.join(errored)}"
    if failed:
        return False, f"failed: {', '.join(failed)}"
    if uncalibrated:
        return False, (
            f"uncalibrated: {', '.join(uncalibrated)} (no usable null; set "
            "defaults.allow_uncalibrated: true to gate on fixed thresholds)"
        )
    if score.overall < threshold:
        return False, f"overall {score.overall:.2f} < threshold {threshold:.2f}"
    return True, f"overall {score.overall:.2f} >= {threshold:.2f}, no FAIL or ERROR"
