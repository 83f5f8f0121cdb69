"""pytest plugin: `@pytest.mark.sway(spec=..., adapter=...)` makes a test one item per probe of
the suite plus a `gate` item, each passing exactly when `sway gate` would let it through.

    @pytest.mark.sway(spec="sway.yaml", adapter="runs/v3")   # paths relative to this file
    def test_v3(sway_verdict):                                # the body may add its own checks
        ...

The suite runs once per (spec, adapter) per session, on the first item that needs it. A probe
item fails when its verdict alone fails the gate (score.blocker), is skipped on SKIP, passes
otherwise; the gate item is runner.gate. pytest's --junitxml then has one testcase per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from sway_engine.errors import SwayError

if TYPE_CHECKING:
    from sway_engine.result import ProbeResult, SuiteResult
    from sway_engine.spec import SuiteSpec

MARK = "sway"
FIXTURE = "sway_verdict"
GATE = "gate"


@dataclass(frozen=True)
class Target:
    """What a marker evaluates: a suite file, an adapter (None: the spec's models.ft), and the
    gate's threshold (None: the spec's)."""

    spec: Path
    adapter: str | None
    threshold: float | None


@dataclass(frozen=True)
class Case:
    """One generated item: a probe of the target's suite, or its gate (probe None)."""

    target: Target
    probe: str | None

    @property
    def id(self) -> str:
        return self.probe if self.probe is not None else GATE


@dataclass(frozen=True)
class ItemVerdict:
    """The `sway_verdict` fixture: what the item decided and on which evidence."""

    name: str
    passed: bool
    skipped: bool
    reason: str
    probe: ProbeResult | None  # None on the gate item
    result: SuiteResult


# (spec, adapter) -> the evaluation, or why it could not run; one per session.
_EVALUATIONS = pytest.StashKey[
    dict[tuple[Path, str | None], "tuple[SuiteSpec, SuiteResult] | str"]
]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{MARK}(spec, adapter=None, threshold=None): one test per probe of the sway suite "
        "`spec` plus a gate test, judged as `sway gate` judges (paths relative to the test file)",
    )
    config.stash[_EVALUATIONS] = {}


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makeitem(collector: pytest.Collector, name: str, obj: object) -> None:
    """A marked test needs no `sway_verdict` argument: the marker asks for the fixture."""
    if not isinstance(collector, pytest.Module | pytest.Class):
        return
    if not collector.istestfunction(obj, name):
        return
    marks = getattr(obj, "pytestmark", [])
    marked = MARK in {m.name for m in marks} or collector.get_closest_marker(MARK) is not None
    asked = any(m.name == "usefixtures" and FIXTURE in m.args for m in marks)
    if marked and not asked:
        pytest.mark.usefixtures(FIXTURE)(obj)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker(MARK)
    if mark is None:
        return
    target = _target(mark, metafunc.definition.path.parent)
    from sway_engine.suite import load_spec

    try:
        names = [e.spec.name for e in load_spec(target.spec)[1]]
    except SwayError as exc:
        problem = str(exc)
    else:
        cases = [Case(target, name) for name in names] + [Case(target, None)]
        metafunc.parametrize(FIXTURE, cases, ids=[c.id for c in cases], indirect=True)
        return
    pytest.fail(f"@pytest.mark.{MARK}: {problem}", pytrace=False)


@pytest.fixture
def sway_verdict(request: pytest.FixtureRequest) -> ItemVerdict:
    """This item's verdict, from the suite result shared by every item of its marker."""
    case = getattr(request, "param", None)
    if not isinstance(case, Case):
        pytest.fail(f"{FIXTURE} needs @pytest.mark.{MARK}(spec=...) on the test", pytrace=False)
    spec, result = _evaluation(request.config, case.target)
    return judge(spec, result, case.probe, case.target.threshold)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> None:
    """The verdict decides before the test body runs; JUnit gets it as properties."""
    verdict = pyfuncitem.funcargs.get(FIXTURE)
    if not isinstance(verdict, ItemVerdict):
        return
    props = [("sway.reason", verdict.reason)]
    if verdict.probe is not None:
        r = verdict.probe
        props += [("sway.verdict", r.verdict.value), ("sway.z", str(r.z)), ("sway.p", str(r.p))]
    pyfuncitem.user_properties.extend(props)
    if verdict.skipped:
        pytest.skip(verdict.reason)
    if not verdict.passed:
        pytest.fail(verdict.reason, pytrace=False)


def judge(
    spec: SuiteSpec, result: SuiteResult, probe: str | None, threshold: float | None
) -> ItemVerdict:
    """A probe's item passes unless its verdict alone fails the gate; SKIP skips; `probe`
    None is the gate itself, in `sway gate`'s words."""
    from sway_engine import runner
    from sway_engine.result import Verdict
    from sway_engine.score import blocker

    if probe is None:
        passed, why = runner.gate(spec, result, threshold)
        reason = ("gate passed — " if passed else "gate FAILED — ") + why
        return ItemVerdict(GATE, passed, False, reason, None, result)
    r = result.probe(probe)
    reason = f"{r.name} ({r.kind}) {r.verdict.value.upper()}: {r.message}"
    blocked = blocker(r, allow_uncalibrated=spec.defaults.allow_uncalibrated)
    skipped = r.verdict == Verdict.SKIP
    return ItemVerdict(r.name, blocked is None, skipped, reason, r, result)


def _target(mark: pytest.Mark, here: Path) -> Target:
    """The marker's arguments, paths resolved against the test file's folder."""
    kwargs: dict[str, Any] = dict(mark.kwargs)
    if mark.args:
        if len(mark.args) > 1 or "spec" in kwargs:
            pytest.fail(f"@pytest.mark.{MARK} takes one argument, the spec", pytrace=False)
        kwargs["spec"] = mark.args[0]
    unknown = sorted(set(kwargs) - {"spec", "adapter", "threshold"})
    if unknown:
        pytest.fail(f"@pytest.mark.{MARK}: unknown argument(s) {unknown}", pytrace=False)
    if not kwargs.get("spec"):
        pytest.fail(f"@pytest.mark.{MARK} needs spec= (a sway.yaml)", pytrace=False)
    adapter = kwargs.get("adapter")
    threshold = kwargs.get("threshold")
    return Target(
        spec=(here / Path(kwargs["spec"]).expanduser()).resolve(),
        adapter=None if adapter is None else str((here / Path(adapter).expanduser()).resolve()),
        threshold=None if threshold is None else float(threshold),
    )


def _evaluation(config: pytest.Config, target: Target) -> tuple[SuiteSpec, SuiteResult]:
    """The target's suite result, evaluated on first use and kept for the session (an
    evaluation that could not start fails every item of the target with its reason)."""
    cache = config.stash[_EVALUATIONS]
    key = (target.spec, target.adapter)
    if key not in cache:
        from sway_engine import runner
        from sway_engine.suite import load_spec

        try:
            spec, entries = load_spec(target.spec)
            result = runner.evaluate(
                spec, entries, spec_path=str(target.spec), adapter=target.adapter
            )
            cache[key] = (spec, result)
        except SwayError as exc:
            cache[key] = f"sway could not evaluate {target.spec}: {exc}"
    found = cache[key]
    if isinstance(found, str):
        pytest.fail(found, pytrace=False)
    return found
