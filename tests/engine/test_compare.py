"""`sway compare A B` over a real DuckDB store: per-probe deltas oriented by each probe's
direction, judged against both runs' nulls, and --fail-on-regression for CI (issue 15)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sway_engine.cli import main
from sway_engine.diff import NOISE_SIGMAS
from sway_engine.errors import SwayError
from sway_engine.history import compare
from sway_engine.result import Verdict
from sway_engine.store import ResultStore
from tests.engine.test_store import SPEC, _probe, _suite


def _record(store: ResultStore, adapter: str, run: str, dkl: float, revert: float, **kw) -> None:  # type: ignore[no-untyped-def]
    spec = kw.pop("spec", SPEC)
    probes = (
        _probe("delta_kl_doc", raw=dkl),  # higher is better, null std 0.02
        _probe("revert", kind="adapter_revert", raw=revert, **kw),  # lower is better
    )
    store.write_suite(adapter, _suite(0.7, probes, spec), True, run_id=run)


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "sway.duckdb")
    _record(store, "v2-aaaaaaaa", "r1", dkl=0.40, revert=0.30)
    return store


def test_a_worse_candidate_beyond_both_nulls_is_a_regression(store: ResultStore) -> None:
    # delta_kl drops by 0.1 = 5 null stds (worse); revert falls 0.30 -> 0.20 (better: lower).
    _record(store, "v3-bbbbbbbb", "r2", dkl=0.30, revert=0.20)
    rows = {r["probe"]: r for r in compare(store, "v2-aaaaaaaa", "v3-bbbbbbbb")}
    assert rows["delta_kl_doc"]["delta"] == pytest.approx(-0.10)
    assert rows["delta_kl_doc"]["beyond_nulls"] and rows["delta_kl_doc"]["regression"]
    assert rows["revert"]["delta"] == pytest.approx(+0.10)  # oriented: lower raw is better
    assert rows["revert"]["beyond_nulls"] and not rows["revert"]["regression"]


def test_a_difference_inside_the_null_spread_is_not_a_regression(store: ResultStore) -> None:
    small = NOISE_SIGMAS * 0.02 * 0.5  # half the bar
    _record(store, "v3-bbbbbbbb", "r2", dkl=0.40 - small, revert=0.30)
    (dkl, _) = compare(store, "v2-aaaaaaaa", "v3-bbbbbbbb")
    assert not dkl["beyond_nulls"] and not dkl["regression"]


def test_a_lost_pass_is_a_regression_whatever_the_size(store: ResultStore) -> None:
    _record(store, "v3-bbbbbbbb", "r2", dkl=0.40, revert=0.30, verdict=Verdict.FAIL)
    rows = {r["probe"]: r for r in compare(store, "v2-aaaaaaaa", "v3-bbbbbbbb")}
    assert rows["revert"]["regression"] and not rows["delta_kl_doc"]["regression"]


def test_the_cli_exits_1_on_regression_only_when_asked(store: ResultStore, capsys) -> None:  # type: ignore[no-untyped-def]
    _record(store, "v3-bbbbbbbb", "r2", dkl=0.30, revert=0.30)
    home = str(store.path.parent)
    args = ["compare", "v2-aaaaaaaa", "v3-bbbbbbbb", "--home", home]
    assert main(args) == 0
    assert main([*args, "--fail-on-regression"]) == 1
    capsys.readouterr()
    assert main([*args, "--json"]) == 0
    assert {r["probe"] for r in json.loads(capsys.readouterr().out)} == {"delta_kl_doc", "revert"}
    assert main(["compare", "v2-aaaaaaaa", "nobody", "--home", home]) == 2


def test_different_suites_are_refused(store: ResultStore) -> None:
    _record(store, "v3-bbbbbbbb", "r2", dkl=0.3, revert=0.3, spec="spec-other")
    with pytest.raises(SwayError, match="different suites are not comparable"):
        compare(store, "v2-aaaaaaaa", "v3-bbbbbbbb")
