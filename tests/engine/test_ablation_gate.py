"""The adapter_ablation gate on synthetic curves: healthy shapes pass, broken ones fail."""

import numpy as np
import pytest

from sway_engine.probes.adapter_ablation import AblationSpec, curve_gate

LAMS = (0.0, 0.25, 0.5, 0.75, 1.0, 1.25)
SPEC = AblationSpec(name="a", prompts=("p",))


def failed(curve: list[float]) -> list[str]:
    checks = curve_gate(LAMS, curve, SPEC)["checks"]
    return [k for k, ok in checks.items() if not ok]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "shape",
    [
        lambda lam: 0.1 * lam,  # linear
        lambda lam: 0.1 * lam**2,  # quadratic: small-perturbation JS
        lambda lam: 0.1 * (1 - np.exp(-3 * lam)),  # saturating
        lambda lam: 0.1 * lam**3,  # cubic: last step is 58% of the rise
    ],
    ids=["linear", "quadratic", "saturating", "cubic"],
)
def test_healthy_curves_pass(shape) -> None:  # type: ignore[no-untyped-def]
    assert failed([float(shape(lam)) for lam in LAMS]) == []


def test_upstream_gate_rejected_these_healthy_curves() -> None:
    # Upstream: linear and quadratic both FAIL (saturation at 1.25); ours accepts both.
    for curve in ([0.1 * lam for lam in LAMS], [0.1 * lam**2 for lam in LAMS]):
        assert failed(curve) == []


def test_flat_curve_fails_effect() -> None:
    assert failed([0.0, 0.001, 0.002, 0.003, 0.004, 0.005]) == ["effect"]


def test_step_curve_fails_smoothness() -> None:
    assert "smooth" in failed([0.0, 0.0, 0.0, 0.001, 0.2, 0.21])


def test_non_monotone_curve_fails() -> None:
    assert "monotone" in failed([0.0, 0.08, 0.03, 0.09, 0.1, 0.12])


def test_collapse_past_one_fails() -> None:
    assert failed([0.0, 0.025, 0.05, 0.075, 0.1, 0.04]) == ["no_collapse"]


def test_lambda_grid_validation() -> None:
    with pytest.raises(ValueError, match="including 1.0"):
        AblationSpec(name="a", lambdas=(0.0, 0.5, 2.0))
