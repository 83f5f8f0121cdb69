"""`make run` / `make clean`: the demo touches only the folder it created, and a first run on
freshly built fixtures evaluates every adapter (the sensor waits for settling folders)."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import duckdb
import pytest

from sway_dagster import demo
from sway_engine.fixtures import FixturePaths

REPO = Path(__file__).resolve().parents[2]


def users_home(root: Path) -> Path:
    """A SWAY_HOME as a user keeps it: a DuckDB history and an adapters folder."""
    home = root / "sway"
    (home / "adapters" / "v1").mkdir(parents=True)
    (home / "adapters" / "v1" / "adapter_config.json").write_text("{}")
    with duckdb.connect(str(home / "sway.duckdb")) as con:
        con.execute("CREATE TABLE history AS SELECT 42 AS answer")
    return home


def assert_intact(home: Path) -> None:
    assert (home / "adapters" / "v1" / "adapter_config.json").read_text() == "{}"
    with duckdb.connect(str(home / "sway.duckdb"), read_only=True) as con:
        assert con.execute("SELECT answer FROM history").fetchone() == (42,)


def make(target: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), target, f"PY={sys.executable}"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_make_clean_demo_refuses_a_folder_it_did_not_create(tmp_path: Path) -> None:
    home = users_home(tmp_path)
    done = make("clean-demo", {"SWAY_HOME": str(home), "SWAY_DEMO_HOME": str(home)})
    assert done.returncode != 0
    assert "refusing to remove" in done.stderr and "did not create it" in done.stderr
    assert_intact(home)


def test_make_clean_never_names_sway_home(tmp_path: Path) -> None:
    """The README tells users to export SWAY_HOME; `make clean` must not reach it: its demo
    step removes only the demo's folder, and its other deletions are checkout-relative."""
    home = users_home(tmp_path)
    demo_home = tmp_path / "demo"
    demo.reset_home(demo_home)
    env = {"SWAY_HOME": str(home), "SWAY_DEMO_HOME": str(demo_home)}
    done = make("clean-demo", env)
    assert done.returncode == 0, done.stderr
    assert not demo_home.exists()
    assert_intact(home)
    plan = make("clean", {**env, "MAKEFLAGS": "-n"})
    assert plan.returncode == 0, plan.stderr
    for line in plan.stdout.splitlines():
        if line.startswith("rm "):
            targets = [t for t in shlex.split(line)[1:] if not t.startswith("-")]
            assert all(not os.path.isabs(t) for t in targets), line
    assert str(home) not in plan.stdout


def test_demo_run_refuses_sway_home_and_defaults_to_its_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home = users_home(tmp_path)
    monkeypatch.setenv("SWAY_HOME", str(home))
    monkeypatch.delenv(demo.HOME_ENV, raising=False)
    assert demo.demo_home() == REPO / ".sway_demo"
    monkeypatch.setenv(demo.HOME_ENV, str(home))
    # refused before any fixture is built or any file is written
    assert demo.main(["run"]) == 2
    assert "did not create it" in capsys.readouterr().err
    assert_intact(home)
    assert not (home / demo.MARKER).exists()


def test_demo_home_is_marked_reset_and_removed_only_by_the_demo(tmp_path: Path) -> None:
    home = tmp_path / "demo"
    demo.reset_home(home)
    assert demo.owned(home)
    (home / "sway.duckdb").write_text("old demo run")
    (home / "adapters").mkdir()
    demo.reset_home(home)
    assert sorted(p.name for p in home.iterdir()) == [demo.MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    demo.reset_home(empty)  # an empty folder holds nothing to lose
    assert demo.owned(empty)
    assert demo.remove_home(home) and not home.exists()
    assert not demo.remove_home(home)
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(demo.DemoHomeError, match="not a plain folder"):
        demo.reset_home(not_a_dir)


def fresh_copy(fx: FixturePaths, root: Path) -> FixturePaths:
    """The fixture adapters as a new machine has them: every file written just now."""
    adapters = {}
    for name, src in fx.adapters.items():
        dst = root / name
        shutil.copytree(src, dst, copy_function=shutil.copyfile)
        adapters[name] = dst
    assert any((root / name / "logs").is_dir() for name in adapters)
    return replace(fx, adapters=adapters)


@pytest.mark.slow
def test_first_run_on_freshly_built_fixtures_evaluates_all_five(
    tmp_path: Path,
    fx: FixturePaths,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On a new machine the fixtures were written seconds ago, logs/ included: the demo keeps
    ticking the sensor until every folder has settled, so doc-strong and doc-weak are not lost
    (the sensor once skipped them and the leaderboard showed noise, zero and nan only)."""
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))  # evaluate_all points it at the home
    home = tmp_path / "demo"
    demo.prepare_home(home, fresh_copy(fx, tmp_path / "fresh"), suite=fx.suite)
    keys = demo.evaluate_all(home)
    out = capsys.readouterr().out
    # One line when the set of unsettled folders changes (the first screen once showed 38);
    # on a busy machine the copies may have settled before the first tick: then none.
    waits = [line for line in out.splitlines() if "waiting for" in line]
    assert len(waits) <= len(fx.adapters), waits
    assert all("to settle (no file changed for" in line for line in waits), waits
    assert sorted(k.rsplit("-", 1)[0] for k in keys) == sorted(fx.adapters)
    with duckdb.connect(str(home / "sway.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT probe, verdict FROM probe_results WHERE adapter_id LIKE 'doc-strong-%'"
        ).fetchall()
        adapters = con.execute("SELECT count(DISTINCT adapter_id) FROM scores").fetchone()
    assert {probe for probe, _ in rows} >= {"delta_kl_doc", "ablation"}
    assert adapters == (5,)
