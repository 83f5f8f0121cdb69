"""A probe's final verdict as its asset's `verdict` check: it fails where the gate fails."""

from __future__ import annotations

import dagster as dg
import pytest

from sway_dagster.assets import verdict_evaluation
from sway_engine.result import ProbeResult, Verdict

ERROR, WARN = dg.AssetCheckSeverity.ERROR, dg.AssetCheckSeverity.WARN
ASSET = dg.AssetKey(["sway", "p"])


def result(verdict: Verdict, kind: str = "delta_kl", **evidence: object) -> ProbeResult:
    return ProbeResult(
        name="p",
        kind=kind,
        category="adherence",
        verdict=verdict,
        message="why",
        raw=0.28,
        z=4.1,
        p=0.002,
        evidence=evidence,
    )


@pytest.mark.parametrize(
    ("probe", "allow_uncalibrated", "outcome"),
    [
        (result(Verdict.PASS, q=0.004), False, (True, None)),
        (result(Verdict.SKIP), False, (True, None)),
        (result(Verdict.WARN), False, (False, WARN)),
        (result(Verdict.WARN, uncalibrated=True), False, (False, ERROR)),  # fails the gate
        (result(Verdict.WARN, uncalibrated=True), True, (False, WARN)),  # allowed: a warning
        (result(Verdict.FAIL, q=0.03), False, (False, ERROR)),  # a PASS that BH made FAIL
        (result(Verdict.FAIL, kind="leakage"), False, (False, ERROR)),  # a guard rail's harm
        (result(Verdict.ERROR), False, (False, ERROR)),
    ],
)
def test_a_verdict_fails_its_check_at_error_exactly_when_it_fails_the_gate(
    probe: ProbeResult, allow_uncalibrated: bool, outcome: tuple[bool, object]
) -> None:
    check = verdict_evaluation(probe, ASSET, "doc-1234abcd", allow_uncalibrated=allow_uncalibrated)
    assert (check.passed, None if check.passed else check.severity) == outcome
    assert (check.asset_key, check.check_name, check.partition) == (
        ASSET,
        "verdict",
        "doc-1234abcd",
    )
    assert check.blocking is False  # a red probe is a finished evaluation, not a failed run


def test_the_check_carries_the_numbers_and_q_only_when_adjusted() -> None:
    adjusted = verdict_evaluation(
        result(Verdict.PASS, q=0.004), ASSET, "k", allow_uncalibrated=False
    ).metadata
    assert {k: v.value for k, v in adjusted.items()} == {
        "verdict": "pass",
        "raw": 0.28,
        "z": 4.1,
        "p": 0.002,
        "q": 0.004,
        "message": "why",
    }
    skipped = ProbeResult(
        name="p",
        kind="delta_kl",
        category="adherence",
        verdict=Verdict.SKIP,
        message="no null views",
    )
    plain = verdict_evaluation(skipped, ASSET, "k", allow_uncalibrated=False).metadata
    assert set(plain) == {"verdict", "raw", "z", "message"}
