"""The pytest plugin (`@pytest.mark.sway`): one item per probe plus a gate item, decided exactly
as `sway gate` decides, from one evaluation per (spec, adapter) per session."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

# Imported here, not first inside the in-process pytest run below: pytester restores
# sys.modules after each run, and torch cannot be imported a second time in one process.
import torch  # noqa: F401

from sway_engine import runner
from sway_engine.fixtures import FixturePaths
from sway_engine.result import Verdict
from sway_engine.score import blocker
from sway_engine.suite import load_spec

pytest_plugins = ["pytester"]


def outcomes(rec: pytest.HookRecorder) -> dict[str, str]:
    """Test name -> passed / failed / skipped as pytest decided each item (error: its setup or
    teardown failed, which no item of the plugin should)."""
    out: dict[str, str] = {}
    for report in rec.getreports("pytest_runtest_logreport"):
        name = report.nodeid.split("::")[-1]
        if report.when == "call" or report.skipped:
            out[name] = report.outcome
        elif report.failed:
            out[name] = "error"
    return out


def engine_decisions(function: str, spec_path: Path, result: Any) -> dict[str, str]:
    """What the engine itself says of each item: a probe fails iff its verdict blocks the
    gate (SKIP skips), the gate item is runner.gate: `sway gate`'s rule on the same result."""
    spec, _ = load_spec(spec_path)
    out = {}
    for r in result.probes:
        blocked = blocker(r, allow_uncalibrated=spec.defaults.allow_uncalibrated)
        skipped = r.verdict == Verdict.SKIP
        out[f"{function}[{r.name}]"] = (
            "skipped" if skipped else "passed" if blocked is None else "failed"
        )
    out[f"{function}[gate]"] = "passed" if runner.gate(spec, result)[0] else "failed"
    return out


def test_items_pass_and_fail_as_the_gate_decides_from_one_evaluation_per_adapter(
    fx: FixturePaths, pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    suite = pytester.path / "sway.yaml"
    shutil.copy(fx.suite, suite)  # the fixture suite names its model by absolute path
    with suite.open("a") as f:
        f.write("  - {name: disabled_kl, kind: delta_kl, enabled: false, prompts: ['Q: x\\nA:']}\n")
    strong, zero = str(fx.adapters["doc-strong"]), str(fx.adapters["zero"])
    pytester.makepyfile(
        test_adapters=f"""
        import pytest

        @pytest.mark.sway(spec="sway.yaml", adapter={strong!r})
        def test_strong():
            pass

        @pytest.mark.sway("sway.yaml", adapter={strong!r})
        def test_strong_again(sway_verdict):
            assert sway_verdict.result.adapter == {strong!r}

        @pytest.mark.sway(spec="sway.yaml", adapter={zero!r})
        def test_zero(sway_verdict):
            assert sway_verdict.probe is None or sway_verdict.probe.name == sway_verdict.name
        """
    )
    evaluations: list[tuple[str | None, Any]] = []
    real = runner.evaluate

    def spy(*args: Any, **kwargs: Any) -> Any:
        result = real(*args, **kwargs)
        evaluations.append((kwargs.get("adapter"), result))
        return result

    monkeypatch.setattr(runner, "evaluate", spy)
    junit = tmp_path / "junit.xml"
    rec = pytester.inline_run("--strict-markers", "-p", "no:cacheprovider", f"--junitxml={junit}")

    assert [adapter for adapter, _ in evaluations] == [strong, zero]
    by_adapter = dict(evaluations)
    expected = {
        **engine_decisions("test_strong", suite, by_adapter[strong]),
        **engine_decisions("test_strong_again", suite, by_adapter[strong]),
        **engine_decisions("test_zero", suite, by_adapter[zero]),
    }
    seen = outcomes(rec)
    assert seen == expected
    # The two adapters `sway gate` tells apart (tests/engine/test_cli.py: exit 0 and exit 1).
    assert seen["test_strong[gate]"] == "passed" and seen["test_zero[gate]"] == "failed"
    assert (
        seen["test_zero[delta_kl_doc]"] == "failed"
        and seen["test_strong[disabled_kl]"] == "skipped"
    )

    calls = [r for r in rec.getreports("pytest_runtest_logreport") if r.when == "call"]
    reports = {r.nodeid.split("::")[-1]: r for r in calls}
    why = runner.gate(load_spec(suite)[0], by_adapter[zero])[1]
    assert str(reports["test_zero[gate]"].longrepr) == f"gate FAILED — {why}"
    assert "delta_kl_doc (delta_kl) FAIL: indistinguishable" in str(
        reports["test_zero[delta_kl_doc]"].longrepr
    )

    cases = ET.parse(junit).getroot().iter("testcase")
    xml = {c.get("name"): c for c in cases}
    assert set(xml) == set(expected)  # one testcase per probe and one per gate
    failed = {name for name, c in xml.items() if c.find("failure") is not None}
    assert failed == {name for name, o in expected.items() if o == "failed"}
    props = {p.get("name"): p.get("value") for p in xml["test_zero[delta_kl_doc]"].iter("property")}
    assert props["sway.verdict"] == "fail" and props["sway.p"] == str(
        by_adapter[zero].probe("delta_kl_doc").p
    )


def test_marker_mistakes_are_reported_before_any_model_loads(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makefile(".yaml", bad="version: 1\nsuite: [{name: d, kind: nope}]\n")
    pytester.makepyfile(
        test_bad_spec="""
        import pytest

        @pytest.mark.sway(spec="bad.yaml")
        def test_bad():
            pass
        """,
        test_no_spec="""
        import pytest

        @pytest.mark.sway(adapter="x")
        def test_no_spec():
            pass
        """,
        test_no_marker="""
        def test_unmarked(sway_verdict):
            pass
        """,
    )
    monkeypatch.setattr(runner, "evaluate", lambda *a, **k: pytest.fail("loaded a model"))
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--continue-on-collection-errors"
    )
    result.assert_outcomes(errors=3)
    out = result.stdout.str()
    assert "suite[0].kind: unknown probe kind 'nope'" in out
    assert "@pytest.mark.sway needs spec= (a sway.yaml)" in out
    assert "sway_verdict needs @pytest.mark.sway(spec=...) on the test" in out
