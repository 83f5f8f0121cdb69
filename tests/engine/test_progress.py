"""Progress you can see: `sway run` reports every step (each calibrated probe under the nulls,
then each entry) as a bar on a terminal and as plain lines in a pipe or CI log."""

from __future__ import annotations

import io
import re
import subprocess
import sys

from sway_engine.progress import Step, display
from sway_engine.runner import evaluate
from sway_engine.suite import load_spec


def test_a_run_reports_each_step_once_in_order(fx) -> None:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    steps: list[Step] = []
    evaluate(spec, entries, progress=steps.append)
    calibrated = ["delta_kl_doc", "ablation"]  # the fixture suite's calibrated probes
    total = len(calibrated) + len(entries)
    assert [s.index for s in steps] == list(range(1, total + 1))
    assert {s.total for s in steps} == {total}
    assert [s.label.split()[0] for s in steps] == [*calibrated, *(e.spec.name for e in entries)]
    assert "under 16 null adapters" in steps[0].label


def test_a_pipe_gets_plain_lines_and_a_terminal_gets_a_bar(fx) -> None:  # type: ignore[no-untyped-def]
    done = subprocess.run(
        [sys.executable, "-m", "sway_engine.cli", "run", str(fx.suite)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = re.findall(r"^sway \[(\d+)/(\d+), \d+ s\] (.+)$", done.stderr, re.M)
    assert [int(i) for i, _, _ in lines] == list(range(1, len(lines) + 1))
    assert lines and all(int(n) == len(lines) for _, n, _ in lines)
    assert "\x1b[" not in done.stderr  # no terminal control codes in a log

    out = io.StringIO()
    with display(out, tty=True) as show:
        show(Step(1, 4, "delta_kl_doc under 16 null adapters"))
        show(Step(2, 4, "ablation (adapter_ablation)"))
    shown = out.getvalue()
    assert "ablation (adapter_ablation)" in shown and "1/4" in shown and "\x1b[" in shown
