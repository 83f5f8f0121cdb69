"""The full probe battery on the fixtures: every kind present, an end-to-end run with no SKIP
or ERROR, doc-strong's headline claims far beyond the nulls, and random and zero adapters
claiming nothing and ranking last. (The per-probe calibration property is the audit's:
tests/engine/test_calibration.py.)"""

from __future__ import annotations

from typing import Any

import pytest

from sway_engine.fixtures import FixturePaths
from sway_engine.fixtures.battery import write_battery
from sway_engine.probes.common.guard_rail import guard_rail
from sway_engine.probes.registry import PROBES
from sway_engine.result import SuiteResult, Verdict
from sway_engine.runner import run_suite
from sway_engine.score import claim_of
from sway_engine.suite import load_spec
from tests.conftest import show

# Probes whose verdict is one-sided "do no harm" (they call probes.guard_rail.guard_rail).
GUARD_RAILS = {
    "calibration_drift",
    "external_perplexity",
    "intruder_dimensions",
    "leakage",
    "tool_use_fidelity",
}
# Harm claims judged by a budget the team sets, not against the nulls.
BUDGETS = {"forgetting_budget"}


@pytest.fixture(scope="module")
def battery(fx: FixturePaths, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_spec(write_battery(fx, tmp_path_factory.mktemp("battery") / "sway.yaml"))


def test_battery_has_every_registered_kind(battery: Any) -> None:
    _, entries = battery
    kinds = [e.spec.kind for e in entries]
    assert set(kinds) == set(PROBES)
    assert kinds[0] == "null_adapter" and kinds[-1] == "adapter_ablation"


def test_guard_rail_set_matches_the_code() -> None:
    """GUARD_RAILS above is the set of probe modules that use the one-sided verdict."""
    import inspect

    users = {k for k, cls in PROBES.items() if "guard_rail(" in inspect.getsource(cls)}
    assert users == GUARD_RAILS, f"{guard_rail.__name__} users: {users}"
    assert {k for k, cls in PROBES.items() if cls.claim == "harm"} == GUARD_RAILS | BUDGETS


@pytest.fixture(scope="module")
def fixture_adapters(battery: Any, fx: FixturePaths) -> dict[str, SuiteResult]:
    """The battery on doc-strong, doc-weak, noise and zero over one base load. (One adapter
    at a time: `evaluate_many`'s lockstep was 2.5x slower than this at the battery's 18 views
    per adapter; noted on the performance issue.)"""
    import torch

    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented

    spec, entries = battery
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = HFBackend(str(fx.base))
    out = {}
    try:
        for name in ("doc-strong", "doc-weak", "noise", "zero"):
            backend.load_adapter(str(fx.adapters[name]))  # one base load, adapters swapped
            out[name] = r = run_suite(spec, entries, Instrumented(backend))
            print(f"{name}: {r.score.overall:.3f} {r.score.band}")
            print(show(*[p for p in r.probes if p.raw is not None]))
    finally:
        backend.close()
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_battery_runs_end_to_end_on_doc_strong(fixture_adapters: dict[str, SuiteResult]) -> None:
    result = fixture_adapters["doc-strong"]
    verdicts = {p.kind: p for p in result.probes}
    bad = {p.name: p.message for p in result.probes if p.verdict in (Verdict.SKIP, Verdict.ERROR)}
    assert not bad, bad
    assert verdicts["adapter_ablation"].verdict is Verdict.PASS, show(verdicts["adapter_ablation"])
    # persistence through filler and turns follows the build on this tiny model (PROBES.md);
    # the effect they start from is large on every build
    for kind in ("prompt_collapse", "multi_turn_coherence_decay"):
        assert verdicts[kind].evidence["first"] >= 0.1, show(verdicts[kind])
    assert verdicts["training_drift"].verdict is Verdict.PASS  # reads the loss log
    # the headline claims, far beyond the nulls (after Benjamini-Hochberg over the suite)
    for kind in ("delta_kl", "section_internalization", "paraphrase_invariance", "preference_flip"):
        r = verdicts[kind]
        assert r.verdict is Verdict.PASS and r.p is not None and r.p < 1e-3, show(r)
        assert r.evidence["q"] <= 0.01, show(r)


@pytest.mark.slow
def test_random_and_zero_adapters_claim_nothing_and_rank_last(
    fixture_adapters: dict[str, SuiteResult],
) -> None:
    """noise (a random adapter of doc-strong's size) and zero have no effect PASS, ablation
    included, and the lowest band; doc-strong and doc-weak, with real PASSes, rank above.
    With Benjamini-Hochberg over the suite, a null-family adapter gets any PASS at most 1% of
    the time (the per-probe rates are the audit's, test_calibration.py)."""
    board = {name: r.score for name, r in fixture_adapters.items()}
    for name in ("noise", "zero"):
        claims = [p for p in fixture_adapters[name].probes if claim_of(p.kind) == "effect"]
        assert claims and all(p.verdict is not Verdict.PASS for p in claims), show(*claims)
        assert board[name].overall == 0.0 and board[name].band == "indistinguishable from random"
    for name in ("doc-strong", "doc-weak"):
        passes = [p for p in fixture_adapters[name].probes if p.verdict is Verdict.PASS]
        assert any(claim_of(p.kind) == "effect" for p in passes), name
        assert board[name].overall > max(board["noise"].overall, board["zero"].overall)
    assert board["doc-strong"].overall > board["doc-weak"].overall
