"""delta_kl, adapter_ablation and null calibration on the real fixtures: the verdicts the
product promises, and the calibration property (random adapters rarely pass)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sway_engine import score
from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.fixtures import null_family_adapter
from sway_engine.result import Verdict
from sway_engine.runner import evaluate, run_suite
from sway_engine.suite import load_spec
from tests.conftest import scaled_adapter, show


@pytest.fixture(scope="module")
def suite(fx):  # type: ignore[no-untyped-def]
    return load_spec(fx.suite)


def run(suite, adapter: Path):  # type: ignore[no-untyped-def]
    spec, entries = suite
    return evaluate(spec, entries, adapter=str(adapter))


def test_doc_strong_passes_delta_kl_against_matched_null(fx, suite) -> None:  # type: ignore[no-untyped-def]
    result = run(suite, fx.adapters["doc-strong"])
    dkl = result.probe("delta_kl_doc")
    assert dkl.verdict == Verdict.PASS, show(dkl)
    # the predictive p can say "far beyond the nulls"; the rank p cannot go below 1/(n+1)
    assert dkl.p is not None and dkl.p <= 0.01 and dkl.evidence["q"] <= 0.01, show(dkl)
    assert dkl.evidence["significance"]["p_rank"] == pytest.approx(1 / 17), show(dkl)
    assert dkl.null is not None and dkl.null.n == 16
    assert dkl.ci_95 is not None and dkl.ci_95[0] <= dkl.raw <= dkl.ci_95[1]


def test_zero_adapter_fails(fx, suite) -> None:  # type: ignore[no-untyped-def]
    result = run(suite, fx.adapters["zero"])
    dkl = result.probe("delta_kl_doc")
    assert dkl.verdict == Verdict.FAIL and dkl.raw == pytest.approx(0.0, abs=1e-6)
    assert not score.gate(result.probes, result.score, 0.6)[0]


def test_faint_adapter_is_significant_but_too_small(fx, suite, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    faint = scaled_adapter(fx.adapters["doc-strong"], tmp_path / "faint", 0.05)
    dkl = run(suite, faint).probe("delta_kl_doc")
    assert dkl.verdict == Verdict.FAIL
    assert dkl.raw is not None and dkl.raw < 0.02
    assert "too small" in dkl.message or "indistinguishable" in dkl.message


def test_noise_adapter_is_indistinguishable_from_null(fx, suite) -> None:  # type: ignore[no-untyped-def]
    dkl = run(suite, fx.adapters["noise"]).probe("delta_kl_doc")
    assert dkl.verdict == Verdict.FAIL
    assert dkl.z is not None and dkl.z < 3


def test_nan_adapter_errors_and_fails_the_gate(fx, suite) -> None:  # type: ignore[no-untyped-def]
    result = run(suite, fx.adapters["nan"])
    assert {p.verdict for p in result.probes} == {Verdict.ERROR}
    assert all("non-finite" in p.message for p in result.probes)
    passed, why = score.gate(result.probes, result.score, 0.0)
    assert not passed and "errored" in why


def test_ablation_of_trained_adapter_is_smooth_and_monotone(fx, suite) -> None:  # type: ignore[no-untyped-def]
    abl = run(suite, fx.adapters["doc-strong"]).probe("ablation")
    curve = abl.evidence["curve"]
    assert curve[0] == 0.0 and all(b >= a for a, b in zip(curve, curve[1:], strict=False))
    assert abl.verdict == Verdict.PASS, abl.message


def test_calibration_property_random_adapters_rarely_pass(fx, suite, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """End to end through adapter files: 20 adapters drawn from the null family, each evaluated
    with its own nulls, PASS delta_kl at most twice. (A weak bound, 20 draws; the per-probe
    false-PASS rates are tested with 60 draws each in test_calibration.py.)"""
    spec, entries = suite
    backend = HFBackend(str(fx.base))
    session = Instrumented(backend)
    passes, zs = 0, []
    for i in range(20):
        path = null_family_adapter(
            fx.adapters["doc-strong"], tmp_path / f"null{i}", seed=50_000 + i
        )
        backend.load_adapter(str(path))
        session.reset()
        dkl = run_suite(spec, entries, session).probe("delta_kl_doc")
        assert dkl.z is not None
        zs.append(dkl.z)
        passes += dkl.verdict == Verdict.PASS
    assert passes <= 2, f"{passes}/20 random adapters passed; z = {zs}"
    assert backend.counters()["adapters_loaded"] == 20
