"""The verdict means what it says: the significance rule, multiplicity, no silent fallback,
the evidence score, and the calibration audit on the real fixtures.

Power of the statistical tests here, stated where they are made: a per-probe false-PASS bound
of 3 in 60 draws fails a probe whose true rate is 10% with probability 0.94 (and a 1% probe
only 0.3% of the time); the KS bound 0.1 at 400 draws fails a p whose distribution is 0.1
away from uniform about half the time, and exact uniformity with probability 0.07%.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import score, stats
from sway_engine.audit import audit, clopper_pearson, ks_uniform
from sway_engine.backends.base import DIVERGENCE, NEXT_TOKEN, NULL_VIEWS, SCALED_VIEWS
from sway_engine.calibration import NullPlan, calibrate
from sway_engine.fixtures import FixturePaths
from sway_engine.fixtures.battery import write_battery
from sway_engine.probes.base import Context
from sway_engine.probes.registry import PROBES
from sway_engine.requests import Divergence, DivergenceResult, Request, Result
from sway_engine.result import ProbeResult, Verdict
from sway_engine.runner import run_entry, run_suite
from sway_engine.suite import load_spec, parse_spec, spec_warnings
from sway_engine.views import Finetuned, Null, Scaled
from tests.conftest import entry_for, show

CAPS = frozenset({NEXT_TOKEN, DIVERGENCE, NULL_VIEWS, SCALED_VIEWS})
CALIBRATED = sorted(k for k, cls in PROBES.items() if cls.calibrated)
AUDIT_DRAWS = 60
MAX_FALSE = 3  # of 60: P(Bin(60, 0.01) <= 3) = 0.9966; P(Bin(60, 0.10) >= 4) = 0.94


# ---------------------------------------------------------------- the rule, by hand


def test_predictive_p_is_student_t_with_the_nulls_uncertainty() -> None:
    """z >= 3 is not 3 sigma with 8 nulls: P(t_7 >= 3/sqrt(1 + 1/8)) = 1.27%, not 0.135%."""
    rng = np.random.default_rng(0)
    draws = rng.standard_normal(8)
    null = stats.null_stats(draws.tolist())
    raw = null.mean + 3 * null.std
    sig = stats.significance(raw, null)
    assert sig.z == pytest.approx(3.0)
    assert sig.p == pytest.approx(0.0127, abs=2e-4)
    assert not sig.significant  # 1.27% > alpha 1%
    assert stats.z_for_alpha(0.01, 8) == pytest.approx(3.18, abs=0.01)
    upstream_runs = stats.null_stats(draws[:3].tolist())
    s3 = stats.significance(upstream_runs.mean + 3 * upstream_runs.std, upstream_runs, min_nulls=2)
    assert s3.p == pytest.approx(0.0612, abs=5e-4)


def test_a_strong_effect_gets_a_small_p_not_one_over_n_plus_one() -> None:
    null = stats.null_stats([0.01, 0.02, 0.015, 0.03, 0.012, 0.018, 0.025, 0.02])
    sig = stats.significance(0.2, null, scale="log")
    assert sig.p_rank == pytest.approx(1 / 9)  # the rank p can say no more
    assert sig.p is not None and sig.p < 1e-3 and sig.significant
    assert sig.z is not None and sig.z > 6


def test_the_predictive_p_is_uniform_for_gaussian_nulls() -> None:
    """Unconditional calibration: adapter and nulls both drawn afresh, 4000 times."""
    rng = np.random.default_rng(1)
    ps = []
    for _ in range(4000):
        draws = rng.standard_normal(9)
        ps.append(stats.significance(draws[0], stats.null_stats(draws[1:].tolist())).p)
    assert ks_uniform(ps) < 0.03
    assert np.mean(np.asarray(ps) <= 0.01) == pytest.approx(0.01, abs=0.005)


def test_fractions_use_a_beta_binomial_not_a_z_of_ninety() -> None:
    near_degenerate = stats.null_stats([1.0] * 7 + [0.975])  # N = 40 items each
    far = stats.significance(0.2, near_degenerate, sign=-1, scale="fraction", trials=40)
    assert far.p is not None and far.p < 1e-20 and far.significant
    close = stats.significance(0.95, near_degenerate, sign=-1, scale="fraction", trials=40)
    assert close.p is not None and 0.01 < close.p < 0.05 and not close.significant
    # calibrated: fractions of binomial nulls with a varying rate give a uniform-or-larger p
    rng = np.random.default_rng(2)
    rates = rng.beta(20, 5, size=(3000, 9))
    fractions = rng.binomial(30, rates) / 30
    ps = [
        stats.significance(f[0], stats.null_stats(f[1:].tolist()), scale="fraction", trials=30).p
        for f in fractions
    ]
    assert np.mean(np.asarray(ps) <= 0.01) <= 0.015  # discrete: conservative, never liberal


def test_an_explicit_assert_z_gte_must_also_be_reached() -> None:
    from sway_engine.probes.base import Measurement
    from sway_engine.probes.delta_kl import DeltaKL, DeltaKLSpec

    null = stats.null_stats([0.01, 0.02, 0.015, 0.03, 0.012, 0.018, 0.025, 0.02])
    m = Measurement(raw=0.09)
    default = DeltaKL().judge(DeltaKLSpec(name="d"), m, null)
    strict = DeltaKL().judge(DeltaKLSpec(name="d", assert_z_gte=6.0), m, null)
    assert default.verdict == Verdict.PASS and default.z is not None and default.z < 6
    assert strict.verdict == Verdict.FAIL


# ---------------------------------------------------------------- multiplicity and score


def result(name: str, kind: str, verdict: Verdict, p: float | None, **ev: Any) -> ProbeResult:
    category = PROBES[kind].category
    sig = {"significance": {"alpha": 0.01}} if p is not None else {}
    return ProbeResult(name, kind, category, verdict, "m", p=p, evidence={**sig, **ev})


def test_benjamini_hochberg_by_hand() -> None:
    # sorted 0.01, 0.03, 0.04, 0.2 -> p*m/rank 0.04, 0.06, 0.0533, 0.2 -> running minimum
    qs = stats.benjamini_hochberg([0.01, 0.04, 0.03, 0.2])
    assert qs == pytest.approx([0.04, 0.16 / 3, 0.16 / 3, 0.2])


def test_a_pass_that_does_not_survive_the_correction_fails_and_says_why() -> None:
    results = [
        result("a", "delta_kl", Verdict.PASS, 0.008),
        result("b", "section_internalization", Verdict.FAIL, 0.5),
        result("c", "paraphrase_invariance", Verdict.FAIL, 0.4),
        result("g", "external_perplexity", Verdict.PASS, 0.9),  # a guard rail: not in the family
    ]
    out = score.adjust_for_multiplicity(results)
    assert out[0].verdict == Verdict.FAIL and "Benjamini-Hochberg" in out[0].message
    assert out[0].evidence["q"] == pytest.approx(0.024) and out[0].evidence["family"] == 3
    assert out[3] == results[3]
    strong = score.adjust_for_multiplicity(
        [result("a", "delta_kl", Verdict.PASS, 1e-5), *results[1:]]
    )
    assert strong[0].verdict == Verdict.PASS


def test_evidence_score_puts_nothing_below_a_real_pass() -> None:
    weights = {"adherence": 0.3, "attribution": 0.35, "calibration": 0.2, "ablation": 0.15}

    def suite(*verdicts: tuple[str, Verdict, float | None]) -> float:
        rs = [result(k, k, v, p) for k, v, p in verdicts]
        return score.compute(score.adjust_for_multiplicity(rs), weights).overall

    nothing = suite(
        ("delta_kl", Verdict.FAIL, 0.4),
        ("external_perplexity", Verdict.PASS, 0.7),  # a guard rail that did not regress
        ("calibration_drift", Verdict.PASS, 0.9),
    )
    faint = suite(
        ("delta_kl", Verdict.PASS, 0.009),
        ("external_perplexity", Verdict.FAIL, 1e-6),  # and it harmed something
    )
    assert nothing == 0.0 and score.band_for(nothing) == "indistinguishable from random"
    assert faint > nothing and faint >= 0.25
    full = suite(("delta_kl", Verdict.PASS, 1e-6), ("external_perplexity", Verdict.PASS, 0.5))
    assert full == pytest.approx(1.0) and score.band_for(full) == "strong evidence"
    upstream = score.compute(
        [ProbeResult("d", "delta_kl", "adherence", Verdict.FAIL, "m", score=0.5)],
        weights,
        mode="upstream",
    )
    assert upstream.overall == pytest.approx(0.5) and upstream.band == "partial"


# ---------------------------------------------------------------- no silent fallback


def js_backend(effect: dict[str, float]) -> Context:
    """Divergence of each view from the base: the trained adapter 0.3, nulls by seed."""

    def execute(reqs: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for r in reqs:
            assert isinstance(r, Divergence)
            v = r.view_b
            if isinstance(v, Finetuned):
                value = 0.3
            elif isinstance(v, Scaled):
                value = 0.3 * v.lam**2
            else:
                assert isinstance(v, Null)
                value = effect.get(f"{v.seed}@{v.rank_scale:g}", 0.01 * (1 + v.seed % 5)) * v.lam**2
            out.append(DivergenceResult(js=value, kl_b_a=value, kl_a_b=value, exact=True))
        return out

    return Context(execute=execute, capabilities=CAPS)


def plan(seeds: int = 8, ranks: tuple[float, ...] = (1.0,)) -> NullPlan:
    return NullPlan(tuple(range(1, seeds + 1)), ranks, "matched", 0.02)


DKL = {"prompts": ["a", "b"], "assert_mean_gte": 0.02}


@pytest.mark.parametrize(
    ("why", "nulls", "effect"),
    [
        ("no null at rank scale 1.0", plan(ranks=(0.5, 2.0)), {}),
        ("not finite", plan(), {"3@1": math.nan}),
        ("only 3 null draw(s)", plan(seeds=3), {}),
    ],
)
def test_each_fallback_is_warn_uncalibrated_and_fails_the_gate(
    why: str, nulls: NullPlan, effect: dict[str, float]
) -> None:
    entry = entry_for("delta_kl", "dkl", **DKL)
    ctx = js_backend(effect)
    r = run_entry(entry, ctx, calibrate([entry], ctx, nulls))
    assert r.verdict == Verdict.WARN and why in r.evidence["uncalibrated"], show(r)
    s = score.compute([r], {"adherence": 1.0})
    assert not score.gate([r], s, 0.0)[0]
    assert score.gate([r], s, 0.0, allow_uncalibrated=True)[0]


def test_a_calibration_that_raised_is_warn_with_its_reason() -> None:
    entry = entry_for("delta_kl", "dkl", **DKL)
    good = js_backend({})

    def broken(reqs: Sequence[Request]) -> list[Result]:
        if any(isinstance(r, Divergence) and isinstance(r.view_b, Null) for r in reqs):
            raise RuntimeError("out of memory on the null views")
        return good.execute(reqs)

    ctx = Context(execute=broken, capabilities=CAPS)
    r = run_entry(entry, ctx, calibrate([entry], ctx, plan()))
    assert r.verdict == Verdict.WARN and "out of memory" in r.evidence["uncalibrated"]


def test_without_a_null_entry_nothing_passes_on_a_fixed_threshold() -> None:
    entry = entry_for("delta_kl", "dkl", **DKL)
    r = run_entry(entry, js_backend({}), None)
    assert r.verdict == Verdict.WARN and r.evidence["uncalibrated"] == "no null calibration"


def test_a_nan_null_never_leads_to_a_pass_through_the_store(tmp_path: Path) -> None:
    """The Dagster path reads nulls back from DuckDB, where NaN is NULL: still no PASS."""
    from sway_engine.calibration import NullCell
    from sway_engine.evaluations import null_matrix_for
    from sway_engine.store import ResultStore
    from sway_engine.suite import Suite

    spec_path = tmp_path / "sway.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
                "suite": [
                    {"name": "null_baseline", "kind": "null_adapter"},
                    {"name": "dkl", "kind": "delta_kl", **DKL},
                ],
            }
        )
    )
    suite = Suite.load(spec_path)
    store = ResultStore(tmp_path / "sway.duckdb")
    rows = [
        NullCell("dkl", "delta_kl", 1000 + i, 1.0, math.nan if i == 2 else 0.01 * (1 + i % 4))
        for i in range(8)
    ]
    store.write_null_cells("run-1", "k-00000000", suite.spec_hash, rows)
    matrix = null_matrix_for(store, "k-00000000", suite, "run-1")
    assert matrix is not None
    r = run_entry(suite.entries[1], js_backend({}), matrix)
    assert r.verdict == Verdict.WARN and "1 of 8 null draws are not finite" in r.message


def test_runs_below_four_load_with_a_warning_naming_the_false_pass_rate() -> None:
    base = {"version": 1, "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}}}
    for runs, rate in ((3, "6.1%"), (2, "")):
        data = {**base, "suite": [{"name": "n", "kind": "null_adapter", "runs": runs}]}
        spec, entries = parse_spec(data)
        (warning,) = spec_warnings(entries, spec.defaults)
        assert f"runs: {runs} is too few" in warning and rate in warning
    spec, entries = parse_spec({**base, "suite": [{"name": "n", "kind": "null_adapter"}]})
    assert spec_warnings(entries, spec.defaults) == []
    # too few set as the default: the advice is sway's default, not the same too-few count
    few = {"null": {"seeds": 3}}
    data = {**base, "defaults": few, "suite": [{"name": "n", "kind": "null_adapter"}]}
    spec, entries = parse_spec(data)
    (warning,) = spec_warnings(entries, spec.defaults)
    assert "runs: 3 is too few" in warning and warning.endswith("Use runs: 8 or more.")


# ---------------------------------------------------------------- the audit on the fixtures


def test_clopper_pearson_and_ks() -> None:
    lo, hi = clopper_pearson(0, 200)
    assert lo == 0.0 and hi == pytest.approx(0.0181, abs=2e-4)
    assert clopper_pearson(3, 60)[0] == pytest.approx(0.0104, abs=2e-4)
    assert ks_uniform(np.linspace(0.0, 1.0, 101)) < 0.011
    assert ks_uniform([0.0] * 10) == pytest.approx(1.0)


@pytest.fixture(scope="module")
def session(fx: FixturePaths) -> Iterator[Any]:
    import torch

    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = Instrumented(HFBackend(str(fx.base), fx.adapters["doc-strong"]))
    try:
        yield backend
    finally:
        backend.close()
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def battery_audit(fx: FixturePaths, session: Any, tmp_path_factory: Any) -> dict[str, Any]:
    """Every calibrated probe of the fixture battery on 60 null-family adapters (one call,
    their rows in shared batches), each judged against 16 other draws."""
    spec, entries = load_spec(write_battery(fx, tmp_path_factory.mktemp("audit") / "sway.yaml"))
    rows = audit(spec, entries, session, draws=AUDIT_DRAWS, power_scales=())
    for r in rows:
        print(f"{r.kind:28s} false {r.false}/{r.draws} |z| {r.mean_abs_z:.2f} KS {r.ks:.3f}")
    return {r.kind: r for r in rows}


@pytest.mark.slow
@pytest.mark.parametrize("kind", CALIBRATED)
def test_null_family_adapters_rarely_get_a_false_claim(
    kind: str, battery_audit: dict[str, Any]
) -> None:
    """At most 3 of 60 random adapters of doc-strong's size get a false PASS (a false FAIL for
    a guard rail): a true 1% rate stays under this 99.7% of the time; 10% fails it 94%."""
    audited = battery_audit[kind]
    assert audited.draws == AUDIT_DRAWS
    assert audited.false <= MAX_FALSE, audited.to_dict()


@pytest.mark.slow
def test_delta_kl_p_values_are_uniform_on_the_null_family(fx: FixturePaths, session: Any) -> None:
    """KS distance of delta_kl's p from uniform below 0.1 at 400 draws (exact uniformity
    exceeds it with probability 0.07%)."""
    spec, entries = load_spec(fx.suite)
    (row,) = audit(spec, entries, session, draws=400, power_scales=(1.0,), kinds=("delta_kl",))
    assert row.ks < 0.1, row.to_dict()
    assert row.false <= 10, row.to_dict()  # 1% of 400 is 4; P(Bin(400, .01) > 10) = 0.3%
    assert row.power["1"]["verdict"] == "pass", row.to_dict()


def test_an_audit_needs_nulls(fx: FixturePaths, session: Any) -> None:
    from sway_engine.errors import SwayError

    spec, entries = load_spec(fx.suite)
    with pytest.raises(SwayError, match="null_adapter"):
        audit(spec, [e for e in entries if e.spec.kind != "null_adapter"], session, draws=10)


def test_run_suite_of_the_fixture_reports_q_on_every_effect_claim(
    fx: FixturePaths, session: Any
) -> None:
    spec, entries = load_spec(fx.suite)
    res = run_suite(spec, entries, session)
    claims = [p for p in res.probes if score.claim_of(p.kind) == "effect"]
    assert claims and all("q" in p.evidence for p in claims)
    assert all(p.evidence["family"] == len(claims) for p in claims)
