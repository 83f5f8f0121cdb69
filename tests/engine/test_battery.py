"""The full probe battery on the fixtures: every kind present, an end-to-end run on doc-strong
with no SKIP or ERROR, and the calibration property of every calibrated probe.

Calibration property, leave-one-out: K null adapters (matched norm, seeds outside the suite's
own) are each judged, by the probe's own `judge`, against the null statistics of the other
K - 1. A null-family adapter is what "no training signal" looks like, so a calibrated probe
may PASS at most 10% of them. A guard rail's PASS means "no harm", so for guard rails the
property is the false-alarm rate: FAIL at most 10% of them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from sway_engine import stats
from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import calibrates, plan_for
from sway_engine.fixtures import FixturePaths
from sway_engine.fixtures.battery import write_battery
from sway_engine.probes.guard_rail import guard_rail
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import PROBES
from sway_engine.result import Verdict
from sway_engine.runner import context_for, run_suite
from sway_engine.spec import load_spec
from sway_engine.views import Null

PROPERTY_NULLS = 12
PROPERTY_SEED_BASE = 70_000
# Probes whose verdict is one-sided "do no harm" (they call probes.guard_rail.guard_rail).
GUARD_RAILS = {"calibration_drift", "external_perplexity", "leakage", "tool_use_fidelity"}


@pytest.fixture(scope="module")
def battery(fx: FixturePaths, tmp_path_factory: pytest.TempPathFactory) -> Any:
    return load_spec(write_battery(fx, tmp_path_factory.mktemp("battery") / "sway.yaml"))


@pytest.fixture(scope="module")
def session(fx: FixturePaths) -> Iterator[Instrumented]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = Instrumented(HFBackend(str(fx.base), fx.adapters["doc-strong"]))
    try:
        yield backend
    finally:
        backend.close()
        torch.set_num_threads(threads)


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


@pytest.mark.slow
def test_battery_runs_end_to_end_on_doc_strong(battery: Any, session: Instrumented) -> None:
    spec, entries = battery
    result = run_suite(spec, entries, session)
    verdicts = {p.kind: p.verdict for p in result.probes}
    messages = {p.kind: p.message for p in result.probes}
    bad = {p.name: p.message for p in result.probes if p.verdict in (Verdict.SKIP, Verdict.ERROR)}
    assert not bad, bad
    for kind in (
        "delta_kl",
        "section_internalization",
        "paraphrase_invariance",
        "preference_flip",
        "prompt_collapse",
        "adapter_ablation",
        "training_drift",
    ):
        assert verdicts[kind] is Verdict.PASS, (kind, messages[kind])


@pytest.mark.slow
def test_calibration_property_of_every_calibrated_probe(
    battery: Any, session: Instrumented
) -> None:
    spec, entries = battery
    ctx = context_for(spec, session)
    null_spec = next(e.spec for e in entries if isinstance(e.spec, NullAdapterSpec))
    plan = plan_for(null_spec, spec.defaults.null)
    views = [Null(PROPERTY_SEED_BASE + i, mode=plan.mode) for i in range(PROPERTY_NULLS)]
    checked, report = [], {}
    for entry in entries:
        if not calibrates(entry, plan, ctx.capabilities):
            continue
        assert entry.probe is not None
        measured = entry.probe.measure(entry.spec, ctx, views)
        verdicts = []
        for i, m in enumerate(measured):
            others = [o.raw for j, o in enumerate(measured) if j != i]
            verdicts.append(entry.probe.judge(entry.spec, m, stats.null_stats(others)).verdict)
        bad = Verdict.FAIL if entry.spec.kind in GUARD_RAILS else Verdict.PASS
        rate = sum(v is bad for v in verdicts) / len(verdicts)
        report[entry.spec.kind] = (bad.value, rate)
        checked.append(entry.spec.kind)
    print(report)
    calibrated = {k for k, cls in PROBES.items() if cls.calibrated and k != "null_adapter"}
    assert set(checked) == calibrated, calibrated - set(checked)
    assert all(rate <= 0.10 for _, rate in report.values()), report
