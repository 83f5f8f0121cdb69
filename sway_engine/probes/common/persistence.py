"""The persistence statistic of the "does the effect last" probes (prompt_collapse over
context length, multi_turn_coherence_decay over turns): the half-life of the effect's decay,
the threshold it must keep, and the verdict. Formulas: docs/PROBES.md."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sway_engine import stats
from sway_engine.probes.base import Judgement
from sway_engine.result import Verdict

FLAT_SLOPE = 1e-12  # a fitted log-slope above -FLAT_SLOPE is "no decay"


def half_life(xs: Sequence[float], ys: Sequence[float]) -> float | None:
    """ln 2 / -b of the least-squares fit ln y = a + b x over the points with y > 0.

    inf when the effect does not decay (b >= 0, up to rounding); None with fewer than 2
    positive points.
    """
    pts = [(float(x), math.log(y)) for x, y in zip(xs, ys, strict=True) if y > 0]
    if len(pts) < 2 or len({x for x, _ in pts}) < 2:
        return None
    x, ly = np.asarray(pts).T
    slope = float(np.polyfit(x, ly, 1)[0])
    return math.log(2) / -slope if slope < -FLAT_SLOPE else math.inf


def fit_evidence(hl: float | None, key: str) -> dict[str, object]:
    """Evidence of the decay fit: the half-life when the effect decays, and what the fit found."""
    if hl is None:
        return {key: None, "fit": "fewer than 2 positive points"}
    if math.isinf(hl):
        return {key: None, "fit": "no decay"}
    return {key: hl, "fit": "decays"}


def persistence_threshold(explicit: float | None, span: float, half: float) -> float:
    """The explicit threshold, else the fraction an exponential of half-life `half` keeps."""
    return explicit if explicit is not None else 2.0 ** (-span / half)


def persistence_judgement(
    *,
    raw: float,
    first: float,
    threshold: float,
    sig: stats.Significance,
    min_effect: float,
    where: str,
    unit: str,
) -> Judgement:
    """Verdict of a "does the effect last" probe. raw = effect at the far end (calibrated
    against the nulls: `sig`); persistence = raw / first. PASS needs the effect to exist at the
    near end (first >= min_effect), to persist (>= threshold), and to be significant.
    score = logistic(z/3) (1 uncalibrated) * min(1, persistence/threshold) * min(1, first/min).
    """
    persistence = raw / first if first > 0 else 0.0
    big = first >= min_effect
    kept = persistence >= threshold
    effect = min(1.0, first / min_effect) if min_effect > 0 else 1.0
    shape = min(1.0, persistence / threshold) * effect
    if big:
        why = "" if kept else "effect collapses: "
        summary = (
            f"{persistence:.0%} of the effect remains {where} (min {threshold:.0%}): "
            f"{first:.4f} -> {raw:.4f} {unit}"
        )
    else:
        why = "no effect to keep: "
        summary = f"{first:.3g} {unit} at the start (min {min_effect}), {raw:.3g} {where}"
    if not sig.calibrated:
        verdict = Verdict.PASS if big and kept else Verdict.FAIL
        return Judgement(verdict, f"{why}{summary}; {sig.uncalibrated}", shape, sig=sig)
    score = stats.score_from_z(sig.z) or 0.0
    if not sig.significant and not why:
        why = f"indistinguishable from random adapters {where}: "
    verdict = Verdict.PASS if not why else Verdict.FAIL
    msg = f"{why}{summary}; {sig.describe()}"
    return Judgement(verdict, msg, score * shape, sig.z, sig.p, sig)
