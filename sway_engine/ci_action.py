"""The gate step of the GitHub Action (action.yml): `sway gate` with JUnit and Markdown reports,
the report appended to the job summary, and the step outputs `passed`, `report` and `junit`.

Inputs come as INPUT_SPEC, INPUT_ADAPTER and INPUT_THRESHOLD (empty: not given); the exit code
is `sway gate`'s, so the step fails exactly when the gate does. An output path is empty when
the gate stopped before writing that file (bad input).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

from sway_engine import cli

INPUTS = ("spec", "adapter", "threshold")
OUTPUTS = ("passed", "report", "junit")
REPORT = "sway-report.md"
JUNIT = "sway-junit.xml"
HEADLINES = {0: "sway gate passed", 1: "sway gate FAILED", 2: "sway gate could not run"}


class _Tee(io.TextIOBase):
    """Writes through to `out` and keeps a copy (the gate's verdict line for the summary)."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.seen = io.StringIO()

    def write(self, text: str) -> int:
        self.seen.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def main(env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    given = {name: env.get(f"INPUT_{name.upper()}", "").strip() for name in INPUTS}
    report, junit = Path(REPORT).resolve(), Path(JUNIT).resolve()
    argv = ["gate", given["spec"], "--junit", str(junit), "--markdown", str(report)]
    if given["adapter"]:
        argv += ["--adapter", given["adapter"]]
    if given["threshold"]:
        argv += ["--threshold", given["threshold"]]
    for stale in (report, junit):  # an earlier step's reports must not pass for this one's
        stale.unlink(missing_ok=True)
    tee = _Tee(sys.stdout)
    if not given["spec"]:
        print("error: the action's `spec` input is empty: name a sway.yaml", file=sys.stderr)
        code = 2
    else:
        with contextlib.redirect_stdout(tee):
            code = _gate(argv)
    verdict = [ln for ln in tee.seen.getvalue().splitlines() if ln.startswith("gate ")]
    headline = verdict[-1] if verdict else HEADLINES.get(code, f"sway gate exited {code}")
    if summary := env.get("GITHUB_STEP_SUMMARY"):
        body = (
            report.read_text(encoding="utf-8") if report.is_file() else "no report: see the log\n"
        )
        with open(summary, "a", encoding="utf-8") as f:
            f.write(f"## {headline}\n\n{body}\n")
    if outputs := env.get("GITHUB_OUTPUT"):
        written = {"report": report, "junit": junit}
        values = {name: str(path) if path.is_file() else "" for name, path in written.items()}
        values["passed"] = "true" if code == 0 else "false"
        with open(outputs, "a", encoding="utf-8") as f:
            f.writelines(f"{name}={values[name]}\n" for name in OUTPUTS)
    return code


def _gate(argv: list[str]) -> int:
    """`sway gate`'s exit code; a bad input argparse rejects is 2, as the CLI's own are."""
    try:
        return cli.main(argv)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
