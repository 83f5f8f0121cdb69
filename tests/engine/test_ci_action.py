"""The GitHub Action (action.yml + sway_engine/ci_action.py): the gate step writes the report to
the job summary, sets `passed`/`report`/`junit`, and exits exactly as `sway gate` does."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest
import yaml

from sway_engine import ci_action
from sway_engine.cli import main as sway
from sway_engine.fixtures import FixturePaths

ROOT = Path(__file__).resolve().parents[2]


def read_outputs(path: Path) -> dict[str, str]:
    """$GITHUB_OUTPUT as GitHub reads it: one name=value a line."""
    return dict(line.split("=", 1) for line in path.read_text().splitlines())


@pytest.mark.parametrize(
    ("adapter", "threshold", "code", "headline"),
    [
        ("doc-strong", "", 0, "## gate passed — overall"),
        ("nan", "", 1, "## gate FAILED — errored: null_baseline"),
        ("doc-strong", "1.5", 1, "## gate FAILED — overall"),  # no overall reaches 1.5
    ],
)
def test_gate_step_reports_to_the_summary_and_exits_as_sway_gate(
    fx: FixturePaths,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    adapter,
    threshold,
    code,
    headline,
) -> None:
    monkeypatch.chdir(tmp_path)
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    summary.write_text("earlier step\n")
    env = {
        "INPUT_SPEC": str(fx.suite),
        "INPUT_ADAPTER": str(fx.adapters[adapter]),
        "INPUT_THRESHOLD": threshold,
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_OUTPUT": str(outputs),
    }
    assert ci_action.main(env) == code
    argv = ["gate", str(fx.suite), "--adapter", str(fx.adapters[adapter])]
    assert sway(argv + (["--threshold", threshold] if threshold else [])) == code

    report = tmp_path / "sway-report.md"
    written = summary.read_text()
    assert written.startswith(f"earlier step\n{headline}")
    assert report.read_text() in written and "| delta_kl_doc | delta_kl |" in written
    got = read_outputs(outputs)
    assert got == {
        "passed": "true" if code == 0 else "false",
        "report": str(report),
        "junit": str(tmp_path / "sway-junit.xml"),
    }
    assert ET.parse(got["junit"]).getroot().get("tests") == "3"


def test_gate_step_without_a_usable_spec_exits_2_with_no_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sway-report.md").write_text("a report from an earlier run\n")
    summary, outputs = tmp_path / "summary.md", tmp_path / "outputs"
    env = {
        "INPUT_SPEC": str(tmp_path / "missing.yaml"),
        "GITHUB_STEP_SUMMARY": str(summary),
        "GITHUB_OUTPUT": str(outputs),
    }
    assert ci_action.main(env) == 2
    assert read_outputs(outputs) == {"passed": "false", "report": "", "junit": ""}
    assert summary.read_text() == "## sway gate could not run\n\nno report: see the log\n\n"
    assert ci_action.main({**env, "INPUT_SPEC": ""}) == 2


def action() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "action.yml").read_text())


def test_action_yml_passes_every_input_to_the_gate_step_and_its_outputs_out() -> None:
    spec = action()
    assert spec["runs"]["using"] == "composite"
    assert set(spec["inputs"]) == {*ci_action.INPUTS, "python-version", "extras"}
    assert spec["inputs"]["spec"]["required"] is True
    steps = spec["runs"]["steps"]
    gate = next(s for s in steps if s.get("id") == "gate")
    assert gate["run"] == "python -m sway_engine.ci_action"
    assert gate["env"] == {f"INPUT_{n.upper()}": f"${{{{ inputs.{n} }}}}" for n in ci_action.INPUTS}
    assert {n: o["value"] for n, o in spec["outputs"].items()} == {
        n: f"${{{{ steps.gate.outputs.{n} }}}}" for n in ci_action.OUTPUTS
    }
    text = yaml.safe_dump(steps)
    for name in spec["inputs"]:
        assert f"inputs.{name} }}}}" in text, f"input {name} is never used"


def test_action_steps_run_as_written(fx: FixturePaths, tmp_path: Path) -> None:
    """The install step's shell picks the action's own folder with the extras; the gate step's
    command, run by bash as the runner does, fails on the nan adapter and says so."""
    steps = {s.get("name"): s for s in action()["runs"]["steps"]}
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "python").write_text('#!/bin/sh\necho "$@"\n')
    (fake / "python").chmod(0o755)
    install = steps["Install sway"]["run"]
    for extras, target in (("hf", "/act[hf]"), ("hf,dagster", "/act[hf,dagster]"), ("", "/act")):
        env = {"PATH": f"{fake}:{os.environ['PATH']}", "SWAY_ACTION_PATH": "/act"}
        done = subprocess.run(
            ["bash", "-c", install], env={**env, "SWAY_EXTRAS": extras}, capture_output=True
        )
        assert done.stdout.decode().split() == ["-m", "pip", "install", target]

    outputs = tmp_path / "outputs"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "INPUT_SPEC": str(fx.suite),
        "INPUT_ADAPTER": str(fx.adapters["nan"]),
        "INPUT_THRESHOLD": "",
        "GITHUB_OUTPUT": str(outputs),
    }
    gate = steps["sway gate"]["run"]
    done = subprocess.run(["bash", "-c", gate], env=env, cwd=tmp_path, capture_output=True)
    assert done.returncode == 1, done.stderr.decode()[-2000:]
    assert "gate FAILED — errored" in done.stdout.decode()
    assert read_outputs(outputs)["passed"] == "false"
