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
    harm: stats.Significance,
    null: NullStats | None,
    within_tolerance: bool,
    fixed_score: float,
    summary: str,
    unit: str,
) -> Judgement:
    """One-sided verdict of a "do no harm" probe against its paired null.

    `harm` is the significance of the adapter being *worse* than the nulls (Probe.significance
    with harm=True). FAIL needs harm significant (p <= alpha) and beyond tolerance; otherwise
    PASS. Never "significantly better": being better than random at not forgetting is not
    evidence of anything. The reported z is oriented good (negative: worse than the nulls).
    score = max(min(1, 2*logistic(z/3)), fixed_score): harm must be both significant and
    large to lower it. Uncalibrated: the tolerance alone (finalize turns a PASS into WARN).
    """
    if not harm.calibrated:
        verdict = Verdict.PASS if within_tolerance else Verdict.FAIL
        where = "within" if within_tolerance else "beyond"
        msg = f"{summary}; {where} tolerance (fixed threshold; {harm.uncalibrated})"
        return Judgement(verdict, msg, fixed_score, sig=harm)
    assert null is not None
    z = None if harm.z is None else -harm.z
    score = max(z_guard_score(z), fixed_score) if z is not None else fixed_score
    shown = "" if z is None else f"z={z:+.2f}, "
    vs = (
        f"{shown}p(worse)={harm.p:.2g} vs null {null.mean:+.4g} ± {null.std:.3g} {unit} "
        f"(n={null.n})"
    )
    if harm.significant and not within_tolerance:
        msg = f"significantly worse than null adapters and beyond tolerance: {vs}; {summary}"
        return Judgement(Verdict.FAIL, msg, score, z, harm.p, harm)
    if harm.significant:
        msg = f"worse than null adapters but within tolerance: {vs}; {summary}"
        return Judgement(Verdict.PASS, msg, score, z, harm.p, harm)
    return Judgement(Verdict.PASS, f"not worse than null ({vs}); {summary}", score, z, harm.p, harm)
