"""A change that should not move a number does not: the fixture battery's results under the
current code equal those under a reference commit, within 1e-6.

`tests/golden_ref` names the reference: the commit whose numbers this code must reproduce.
Refactors leave it alone. A change that moves numbers on purpose (a bug fix, a new default)
says so in its commit message, and the next commit points `golden_ref` at it.

Both runs are the same `sway run` on the same fixture files, in fresh processes; the
reference code is `git archive`d from this clone. Compared: every number (raws, z, p, null
samples, scores, token counts), verdicts and generated texts; not timings or free-text
messages (wording may change without a number changing).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tarfile
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest

from sway_engine.fixtures.battery import write_battery

ROOT = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-6
IGNORED = {
    "duration_s",
    "wall_s",
    "wall_seconds",  # upstream's name for wall_s
    "started_at",
    "finished_at",
    "backend_stats",
    "spec_path",
    "sway_version",
    "message",
    "findings",
}


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    """Where result `b` differs from reference `a`: numbers beyond TOLERANCE (relative above 1),
    anything else unequal, a key `b` lost; keys in IGNORED are skipped. Keys only `b` has are
    additions (a new field), not moved numbers."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: missing now" for k in sorted(set(a) - set(b)) if k not in IGNORED]
        for k in sorted(set(a) & set(b) - IGNORED):
            out += differences(a[k], b[k], f"{path}/{k}")
        return out
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} items against {len(b)}"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool):
        if math.isnan(a) and math.isnan(b):
            return []
        if abs(a - b) <= TOLERANCE * max(1.0, abs(a)):
            return []
    elif a == b:
        return []
    return [f"{path}: {a!r} against {b!r}"]


def test_the_comparison_catches_a_moved_number_and_ignores_timings() -> None:
    before = {"probes": [{"raw": 0.25, "duration_s": 3.0, "verdict": "pass", "message": "a"}]}
    assert (
        differences(
            before,
            {
                "probes": [
                    {"raw": 0.25 + 5e-7, "duration_s": 9.0, "verdict": "pass", "message": "b"}
                ]
            },
        )
        == []
    )
    moved = differences(
        before,
        {"probes": [{"raw": 0.25 + 2e-6, "duration_s": 3.0, "verdict": "pass", "message": "a"}]},
    )
    assert moved == ["/probes[0]/raw: 0.25 against 0.250002"]
    assert differences(before, {"probes": [{**before["probes"][0], "verdict": "fail"}]})
    added = {"probes": [{**before["probes"][0], "z_score": 1.0}]}
    assert differences(before, added) == []  # a new field is not a moved number
    assert differences(added, before) == ["/probes[0]/z_score: missing now"]


def _tree_of(ref: str, dest: Path) -> Path:
    found = subprocess.run(
        ["git", "-C", str(ROOT), "cat-file", "-e", f"{ref}^{{commit}}"], capture_output=True
    )
    if found.returncode != 0:
        pytest.skip(f"reference commit {ref[:12]} is not in this clone (a shallow clone?)")
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    return dest


def _kinds(tree: Path) -> set[str]:
    """The probe kinds the sway_engine of `tree` registers."""
    code = (
        "import json\nfrom sway_engine.probes.registry import PROBES\n"
        "print(json.dumps(sorted(PROBES)))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tree,  # `-c` puts the working directory first on sys.path
        env={**os.environ, "PYTHONPATH": str(tree)},
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(done.stdout))


def _only(spec: Path, kinds: set[str]) -> Path:
    """The battery without the entries of kinds the reference does not have (a new probe has
    no reference numbers until golden_ref points past it)."""
    import yaml

    data = yaml.safe_load(spec.read_text())
    data["suite"] = [e for e in data["suite"] if e["kind"] in kinds]
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    return spec


def _run(tree: Path, spec: Path, out: Path) -> dict[str, Any]:
    """`sway run SPEC --json OUT` with the sway_engine of `tree`, in a fresh process."""
    code = (
        "import sys, sway_engine\n"
        f"assert sway_engine.__file__.startswith({str(tree)!r}), sway_engine.__file__\n"
        "from sway_engine.cli import main\n"
        f"sys.exit(main(['run', {str(spec)!r}, '--json', {str(out)!r}]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=spec.parent, env=env, capture_output=True, text=True
    )
    assert done.returncode in (0, 1), f"sway run under {tree} failed:\n{done.stderr[-3000:]}"
    return json.loads(out.read_text())


@pytest.mark.slow
def test_battery_results_equal_the_reference_commits(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    ref = (ROOT / "tests" / "golden_ref").read_text().split()[0]
    old_tree = _tree_of(ref, tmp_path / "ref")
    spec = _only(write_battery(fx, tmp_path / "battery.yaml"), _kinds(old_tree))
    now = _run(ROOT, spec, tmp_path / "now.json")
    then = _run(old_tree, spec, tmp_path / "then.json")
    assert len(now["probes"]) >= 15
    found = differences(then, now)
    assert not found, f"{len(found)} numbers moved since {ref[:12]}:\n" + "\n".join(found[:30])
