"""The one-sided verdict of a "do no harm" probe (external_perplexity, calibration_drift).

A healthy adapter cannot be significantly *better* than random at not forgetting; a guard
rail only asks whether it is significantly *worse* than null adapters of the same size.
"""

from __future__ import annotations

from sway_engine import stats
from sway_engine.probes.base import Judgement
from sway_engine.result import NullStats, Verdict


def harm_score(ratio: float) -> float:
    """1 with no harm, 0.5 at the tolerance (ratio 1), 0 at twice the tolerance."""
    return float(min(1.0, max(0.0, 1.0 - ratio / 2.0)))


def z_guard_score(z: float) -> float:
    """min(1, 2 * logistic(z/3)): 1 for z >= 0 (no worse than null), 0.54 at z = -3."""
    s = stats.score_from_z(z)
    assert s is not None
    return min(1.0, 2.0 * s)


def guard_rail(
    *,
    raw: float,
    null: NullStats | None,
    sign: int,
    z_threshold: float,
    within_tolerance: bool,
    fixed_score: float,
    summary: str,
    unit: str,
) -> Judgement:
    """One-sided verdict of a "do no harm" probe against its paired null.

    z = sign * (raw - null mean) / null std (positive: better than the nulls). FAIL needs
    z <= -z_threshold and harm beyond tolerance; otherwise PASS. Never "significantly better":
    being better than random at not forgetting is not evidence of anything.
    score = max(min(1, 2*logistic(z/3)), fixed_score): harm must be both significant and
    large to lower it. Uncalibrated: PASS iff within tolerance, score = fixed_score.
    """
    z = stats.z_score(raw, null, sign=sign)
    p = stats.empirical_p(raw, null, sign=sign)
    if z is None:
        note = "no null calibration" if null is None else "null is degenerate"
        verdict = Verdict.PASS if within_tolerance else Verdict.FAIL
        where = "within" if within_tolerance else "beyond"
        return Judgement(
            verdict, f"{summary}; {where} tolerance ({note}, fixed threshold)", fixed_score
        )
    assert null is not None
    score = max(z_guard_score(z), fixed_score)
    vs = f"z={z:+.2f} vs null {null.mean:+.4g} ± {null.std:.3g} {unit} (n={null.n})"
    if z <= -z_threshold and not within_tolerance:
        msg = f"significantly worse than null adapters and beyond tolerance: {vs}; {summary}"
        return Judgement(Verdict.FAIL, msg, score, z, p)
    if z <= -z_threshold:
        msg = f"worse than null adapters but within tolerance: {vs}; {summary}"
        return Judgement(Verdict.PASS, msg, score, z, p)
    return Judgement(Verdict.PASS, f"not worse than null ({vs}); {summary}", score, z, p)
