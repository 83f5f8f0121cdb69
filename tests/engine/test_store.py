"""ResultStore against real DuckDB files: migrations, idempotent writes, locks, bad files."""

from __future__ import annotations

import math
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pytest

from sway_engine.calibration import NullCell, NullPlan
from sway_engine.result import NullStats, ProbeResult, SuiteResult, SwayScore, Verdict
from sway_engine.store import (
    MIGRATIONS,
    AdapterRecord,
    ResultStore,
    RunRecord,
    StoreError,
    snapshot,
)

SPEC = "spec-aaaa"


def _probe(name: str, verdict: Verdict = Verdict.PASS, **changes: object) -> ProbeResult:
    values: dict[str, object] = {
        "name": name,
        "kind": "delta_kl",
        "category": "adherence",
        "verdict": verdict,
        "message": f"{name} moved more than the null",
        "score": 0.8,
        "raw": 0.42,
        "z": 3.1,
        "p": 0.01,
        "ci_95": (0.35, 0.49),
        "null": NullStats(
            mean=0.05, std=0.02, n=6, samples=(0.03, 0.04, 0.05, 0.05, 0.06, 0.07), degenerate=False
        ),
        "evidence": {"top_tokens": ["a", "b"], "ratio": 1.5},
        "duration_s": 1.25,
    }
    values.update(changes)
    return ProbeResult(**values)  # type: ignore[arg-type]


def _suite(overall: float, probes: tuple[ProbeResult, ...], spec_hash: str = SPEC) -> SuiteResult:
    score = SwayScore(
        overall=overall,
        band="strong" if overall >= 0.7 else "weak",
        components={"adherence": overall},
        weights={"adherence": 1.0},
        findings=("adherence above null",),
    )
    return SuiteResult(
        spec_path="/tmp/sway.yaml",
        spec_hash=spec_hash,
        base_model="tiny-base",
        adapter="/adapters/a",
        started_at="2025-01-02T03:04:05+00:00",
        finished_at="2025-01-02T03:05:05+00:00",
        wall_s=60.0,
        sway_version="0.1.0",
        probes=probes,
        score=score,
        backend_stats={"requests": 120.0, "cache_hits": 30.0, "forward_passes": 90.0},
        backend_kind="hf",
    )


def _suite_abc(overall: float = 0.75, spec_hash: str = SPEC) -> SuiteResult:
    return _suite(
        overall,
        (
            _probe("delta_kl"),
            _probe("style", Verdict.FAIL, score=0.1, z=-0.5, p=0.6),
            _probe("leak", Verdict.ERROR, score=None, raw=None, z=None, p=None, null=None),
        ),
        spec_hash,
    )


def _hold_lock(database: Path, seconds: float, *, read_only: bool = False) -> subprocess.Popen[str]:
    """Start a process that holds a connection on `database` for `seconds` (a write
    connection, or a notebook's read-only one)."""
    code = (
        "import sys, time, duckdb\n"
        f"con = duckdb.connect({str(database)!r}, read_only={read_only})\n"
        "con.execute('SELECT 1')\n"
        "print('locked', flush=True)\n"
        f"time.sleep({seconds})\n"
        "con.close()\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    return ResultStore(tmp_path / "sway.duckdb")


def test_migrate_records_every_step_and_is_idempotent(store: ResultStore) -> None:
    assert store.migrate() == MIGRATIONS[-1].version
    first = store.migrations()
    assert [m["version"] for m in first] == [m.version for m in MIGRATIONS]
    assert all(m["applied_at"] is not None for m in first)
    again = ResultStore(store.path)
    assert again.migrate() == MIGRATIONS[-1].version
    assert again.migrations() == first


def test_first_use_creates_folder_and_migrates(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "deep" / "er" / "sway.duckdb")
    assert store.row_counts() == {
        "adapters": 0,
        "null_calibration": 0,
        "probe_results": 0,
        "scores": 0,
        "runs": 0,
    }
    assert store.path.is_file()
    assert len(store.migrations()) == len(MIGRATIONS)


def test_newer_schema_is_refused(store: ResultStore) -> None:
    store.migrate()
    con = duckdb.connect(str(store.path))
    con.execute("INSERT INTO schema_migrations VALUES (999, 'from the future', now())")
    con.close()
    with pytest.raises(StoreError, match="newer than this sway"):
        ResultStore(store.path).migrate()


def test_write_suite_twice_keeps_one_copy(store: ResultStore) -> None:
    """A retried write of the same run replaces that run's rows (no duplicates)."""
    suite = _suite_abc()
    assert store.write_suite("a1", suite, gate_passed=True, run_id="run-1") == 3
    assert store.write_suite("a1", suite, gate_passed=True, run_id="run-1") == 3
    counts = store.row_counts()
    assert counts["probe_results"] == 3
    assert counts["scores"] == 1
    assert counts["runs"] == 1
    [run] = store.runs()
    assert run["forward_passes"] == 90 and run["status"] == "complete" and run["origin"] == "cli"
    assert run["cache_hits"] == 30
    assert run["tokens_forwarded"] is None
    assert run["stats"]["requests"] == 120.0
    assert run["started_at"].isoformat() == "2025-01-02T03:04:05"
    [score] = store.scores()
    assert score["components"] == {"adherence": 0.75}
    assert score["findings"] == ["adherence above null"]


def test_re_evaluating_keeps_history_and_reads_show_the_latest(store: ResultStore) -> None:
    store.write_suite("a1", _suite_abc(0.75), gate_passed=True, run_id="run-1")
    failing = _suite(0.1, (_probe("delta_kl", Verdict.ERROR, raw=None),))
    store.write_suite("a1", replace_times(failing, "2025-01-03"), gate_passed=False, run_id="run-2")
    assert [r["run_id"] for r in store.probe_results("a1")] == ["run-2"]
    old = store.probe_results(run_id="run-1")
    assert {r["probe"]: r["verdict"] for r in old}["delta_kl"] == "pass"  # not overwritten
    assert store.row_counts()["probe_results"] == 4 and len(store.runs()) == 2


def replace_times(suite: SuiteResult, day: str) -> SuiteResult:
    return SuiteResult(
        **{
            **suite.__dict__,
            "started_at": f"{day}T00:00:00+00:00",
            "finished_at": f"{day}T00:01:00",
        }
    )


def test_an_incomplete_run_is_never_shown_and_cannot_spoil_a_complete_one(
    store: ResultStore,
) -> None:
    """Run A passes and scores; run B writes an ERROR row and dies before its score: the reads
    and the leaderboard still show A whole (before, B's row overwrote A's and the leaderboard
    said gate_passed with n_error 1)."""
    store.write_suite("a1", _suite(0.8, (_probe("delta_kl"), _probe("style"))), True, "run-A")
    store.begin_run(RunRecord("run-B", "a1", SPEC, dagster_run_id="d-B"))
    store.write_probe_results("run-B", "a1", SPEC, [_probe("delta_kl", Verdict.ERROR)], "d-B")
    [board] = store.leaderboard()
    assert (board["run_id"], board["gate_passed"], board["n_error"]) == ("run-A", True, 0)
    assert {r["verdict"] for r in store.probe_results("a1")} == {"pass"}
    assert store.latest_run("a1", SPEC, status="incomplete")["run_id"] == "run-B"  # type: ignore[index]
    store.fail_run("run-B", "worker killed")
    assert {r["run_id"]: r["status"] for r in store.runs()} == {
        "run-A": "complete",
        "run-B": "failed",
    }


def test_probe_rows_of_a_run_replace_only_that_run(store: ResultStore) -> None:
    store.begin_run(RunRecord("r1", "a1", SPEC))
    assert store.write_probe_results("r1", "a1", SPEC, [_probe("delta_kl")], "d1") == 1
    store.write_probe_results("r1", "a1", SPEC, [_probe("delta_kl", Verdict.FAIL, score=0.2)], "d2")
    store.begin_run(RunRecord("r2", "a1", "spec-bbbb"))
    store.write_probe_results("r2", "a1", "spec-bbbb", [_probe("delta_kl")])
    assert store.probe_results("a1") == []  # neither run is complete
    rows = store.probe_results(run_id="r1")
    assert [(r["spec_hash"], r["verdict"]) for r in rows] == [(SPEC, "fail")]
    current = rows[0]
    assert current["dagster_run_id"] == "d2"
    assert current["score"] == pytest.approx(0.2)
    assert (current["ci_lo"], current["ci_hi"]) == (0.35, 0.49)
    assert (current["null_mean"], current["null_std"], current["null_n"]) == (0.05, 0.02, 6)
    assert current["evidence"] == {"top_tokens": ["a", "b"], "ratio": 1.5}
    assert store.probe_results("nobody") == []
    [back] = store.results_of("r1", {"delta_kl": 2.0})
    assert back.verdict is Verdict.FAIL and back.weight == 2.0 and back.ci_95 == (0.35, 0.49)


def test_null_cells_replaced_per_probe_within_a_run(store: ResultStore) -> None:
    first = [NullCell("delta_kl", "delta_kl", seed, 1.0, 0.1 * seed) for seed in range(4)]
    first += [NullCell("style", "style", 0, 1.0, 0.3)]
    assert store.write_null_cells("r1", "a1", SPEC, first) == 5
    second = [
        NullCell("delta_kl", "delta_kl", seed, scale, 0.2)
        for seed in range(2)
        for scale in (0.5, 1.0)
    ]
    assert store.write_null_cells("r1", "a1", SPEC, second) == 4
    rows = store.null_calibration(run_id="r1")
    assert len([r for r in rows if r["probe"] == "delta_kl"]) == 4
    assert {r["raw"] for r in rows if r["probe"] == "delta_kl"} == {0.2}
    assert [r["raw"] for r in rows if r["probe"] == "style"] == [0.3]
    plan = NullPlan((0, 1), (0.5, 1.0), "matched", 0.02)
    matrix = store.null_matrix("r1", plan)
    assert len(matrix.cells) == 5 and matrix.stats("delta_kl") is not None


def test_non_finite_floats_stored_as_null(store: ResultStore) -> None:
    probe = _probe(
        "delta_kl",
        raw=math.nan,
        z=math.inf,
        p=-math.inf,
        ci_95=(math.nan, 1.0),
        evidence={"bad": math.nan, "nested": [math.inf, 1.0]},
    )
    store.write_suite("a1", _suite(math.nan, (probe,)), gate_passed=False, run_id="r1")
    store.write_null_cells("r1", "a1", SPEC, [NullCell("delta_kl", "delta_kl", 0, 1.0, math.nan)])
    [row] = store.probe_results("a1")
    assert (row["raw"], row["z"], row["p"], row["ci_lo"], row["ci_hi"]) == (
        None,
        None,
        None,
        None,
        1.0,
    )
    assert row["evidence"] == {"bad": None, "nested": [None, 1.0]}
    # a NaN null comes back as NaN (never silently dropped: the probe then refuses to calibrate)
    matrix = store.null_matrix("r1", NullPlan((0,), (1.0,), "matched", 0.02))
    assert math.isnan(matrix.cells[0].raw)
    con = duckdb.connect(str(store.path), read_only=True)
    try:
        nans = con.execute(
            "SELECT (SELECT count(*) FROM probe_results WHERE isnan(raw) OR isinf(z)) + "
            "(SELECT count(*) FROM null_calibration WHERE raw IS NOT NULL) + "
            "(SELECT count(*) FROM scores WHERE overall IS NOT NULL)"
        ).fetchone()
    finally:
        con.close()
    assert nans == (0,)


def test_leaderboard_ranks_the_latest_run_per_adapter_within_one_suite(store: ResultStore) -> None:
    store.record_adapter(AdapterRecord("a1", "Alpha", "/adapters/a1", target_modules=("q_proj",)))
    store.record_adapter(AdapterRecord("a2", "Beta", "/adapters/a2"))
    store.write_suite("a1", _suite_abc(0.55), gate_passed=False, run_id="r1")
    store.write_suite("a2", _suite_abc(0.80), gate_passed=False, run_id="r2")
    store.write_suite("a3", _suite_abc(0.65), gate_passed=True, run_id="r3")
    newer = replace_times(_suite_abc(0.90, spec_hash="spec-new"), "2025-02-01")
    store.write_suite("a1", newer, gate_passed=True, run_id="r4")

    board = store.leaderboard()  # the newest run's suite: spec-new, a1 alone
    assert [(r["rank"], r["adapter_id"], r["name"], r["run_id"]) for r in board] == [
        (1, "a1", "Alpha", "r4")
    ]
    top = board[0]
    assert (top["spec_hash"], top["overall"], top["band"], top["gate_passed"]) == (
        "spec-new",
        0.9,
        "strong",
        True,
    )
    assert (top["n_pass"], top["n_fail"], top["n_error"], top["n_probes"]) == (1, 1, 1, 3)

    old_spec = store.leaderboard(SPEC)  # gate-passing first, then by overall
    assert [(r["adapter_id"], r["overall"]) for r in old_spec] == [
        ("a3", 0.65),
        ("a2", 0.8),
        ("a1", 0.55),
    ]
    assert store.leaderboard("spec-none") == []


def test_a_failed_check_never_erases_what_a_good_one_recorded(store: ResultStore) -> None:
    """Moving an adapter and re-materialising once turned sha256/rank/path into None/''."""
    record = AdapterRecord(
        "a1",
        "Alpha",
        "/adapters/a1",
        sha256="ab" * 32,
        size_bytes=1024,
        base_model="tiny",
        rank=8,
        alpha=16.0,
        target_modules=("q_proj", "v_proj"),
        preflight_ok=True,
    )
    store.record_adapter(record)
    store.record_adapter(
        AdapterRecord("a1", "a1", "", preflight_ok=False, preflight_message="no such directory")
    )
    [row] = store.adapters()
    assert (row["path"], row["sha256"], row["rank"], row["alpha"]) == (
        "/adapters/a1",
        "ab" * 32,
        8,
        16.0,
    )
    assert row["target_modules"] == ["q_proj", "v_proj"]
    assert (row["preflight_ok"], row["preflight_message"]) == (False, "no such directory")
    store.begin_run(RunRecord("r9", "a9", SPEC, stats={"wall_s": 1.0}))
    store.write_null_cells("r8", "a8", SPEC, [NullCell("p", "k", 0, 1.0, 0.0)])
    assert store.seen_adapter_ids() == {"a1", "a8", "a9"}


def test_a_store_written_before_runs_migrates_its_rows_into_one_complete_run(
    tmp_path: Path,
) -> None:
    """Rows of schema 4 (one copy per adapter and spec) become that adapter's complete run."""
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description VARCHAR, "
        "applied_at TIMESTAMP)"
    )
    for step in MIGRATIONS[:4]:
        for statement in step.statements:
            con.execute(statement)
        con.execute("INSERT INTO schema_migrations VALUES (?, ?, now())", [step.version, "x"])
    con.execute(
        "INSERT INTO probe_results (adapter_id, spec_hash, probe, verdict, dagster_run_id) "
        "VALUES ('a1', 's', 'delta_kl', 'pass', 'model-run'), ('a2', 's', 'delta_kl', 'fail', NULL)"
    )
    con.execute(
        "INSERT INTO scores (adapter_id, spec_hash, overall, gate_passed, dagster_run_id) "
        "VALUES ('a1', 's', 0.9, true, 'score-run')"
    )
    con.execute("INSERT INTO runs (run_id, adapter_id, spec_hash) VALUES ('score-run', 'a1', 's')")
    con.close()
    store = ResultStore(path)
    assert store.migrate() == MIGRATIONS[-1].version
    assert [r["run_id"] for r in store.probe_results("a1")] == ["score-run"]
    assert [r["adapter_id"] for r in store.leaderboard("s")] == ["a1"]
    assert store.probe_results("a2") == []  # never scored: an incomplete legacy run
    statuses = {r["run_id"]: r["status"] for r in store.runs()}
    assert statuses == {"score-run": "complete", "legacy:a2:s": "incomplete"}


def test_writer_waits_for_lock_held_by_another_process(store: ResultStore) -> None:
    store.migrate()
    holder = _hold_lock(store.path, 1.0)
    try:
        start = time.monotonic()
        store.write_suite("a1", _suite_abc(), gate_passed=True, run_id="run-1")
        waited = time.monotonic() - start
    finally:
        holder.wait(timeout=30)
    assert holder.returncode == 0
    assert waited > 0.3
    assert store.row_counts()["probe_results"] == 3


def test_writer_gives_up_with_store_error_naming_file(tmp_path: Path) -> None:
    store = ResultStore(tmp_path / "busy.duckdb", lock_timeout_s=0.4)
    store.migrate()
    holder = _hold_lock(store.path, 20.0)
    try:
        start = time.monotonic()
        with pytest.raises(StoreError) as caught:
            store.write_suite("a1", _suite_abc(), gate_passed=True, run_id="r1")
        assert time.monotonic() - start < 5.0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert str(store.path) in str(caught.value)
    assert "another process holds the lock" in str(caught.value)


@pytest.mark.parametrize("content", [b"id,score\na1,0.5\n" * 40, b"", b"short"])
def test_foreign_file_is_refused_and_untouched(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "sway.duckdb"
    path.write_bytes(content)
    with pytest.raises(StoreError, match="not a DuckDB database; move it aside") as caught:
        ResultStore(path).row_counts()
    assert str(path) in str(caught.value)
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sway.duckdb"]


def test_suite_with_bad_time_writes_nothing(store: ResultStore) -> None:
    suite = _suite_abc()
    broken = SuiteResult(**{**suite.__dict__, "started_at": "yesterday"})
    with pytest.raises(StoreError, match="suite.started_at"):
        store.write_suite("a1", broken, gate_passed=True, run_id="run-1")
    assert sum(store.row_counts().values()) == 0


def test_reads_run_beside_a_notebooks_read_only_connection(store: ResultStore) -> None:
    """Issue 14 item 8: sway's readers opened the file read-write and failed while a notebook
    held it; a reader now opens read-only, and a writer names the holder and the way out."""
    store.write_suite("a1", _suite_abc(), gate_passed=True, run_id="run-1")
    notebook = _hold_lock(store.path, 30.0, read_only=True)
    try:
        reader = ResultStore(store.path)  # a fresh process's view: nothing cached
        assert reader.row_counts()["probe_results"] == 3
        assert [r["adapter_id"] for r in reader.leaderboard()] == ["a1"]
        impatient = ResultStore(store.path, lock_timeout_s=0.3)
        with pytest.raises(StoreError) as caught:
            impatient.write_suite("a2", _suite_abc(), gate_passed=True, run_id="run-2")
    finally:
        notebook.kill()
        notebook.wait(timeout=30)
    message = str(caught.value)
    assert f"held by PID {notebook.pid}" in message and "snapshot" in message
    assert store.row_counts()["runs"] == 1  # the refused write left nothing half-done


def test_a_snapshot_stays_open_while_evaluations_keep_writing(
    store: ResultStore, tmp_path: Path
) -> None:
    store.write_suite("a1", _suite_abc(), gate_passed=True, run_id="run-1")
    before = sorted(store.path.parent.iterdir())
    notebook = snapshot(store.path)
    try:
        store.write_suite("a2", _suite_abc(), gate_passed=True, run_id="run-2")  # not blocked
        rows = notebook.execute("SELECT adapter_id FROM runs ORDER BY adapter_id").fetchall()
        assert rows == [("a1",)]  # the copy as it was taken
        with pytest.raises(duckdb.Error):
            notebook.execute("DELETE FROM runs")  # read-only
    finally:
        notebook.close()
    assert store.row_counts()["runs"] == 2
    assert sorted(store.path.parent.iterdir()) == before  # the copy is elsewhere
    kept = tmp_path / "kept.duckdb"
    snapshot(store.path, kept).close()
    with pytest.raises(StoreError, match="already exists"):
        snapshot(store.path, kept)


def test_on_equal_scores_an_adapter_that_errored_ranks_last(store: ResultStore) -> None:
    """`make run` ranked nan (every probe ERROR, overall 0) above noise and zero (overall 0)
    because ties broke by name."""
    failed = _suite(0.0, (_probe("delta_kl", Verdict.FAIL),))
    errored = _suite(0.0, (_probe("delta_kl", Verdict.ERROR, raw=None, z=None, p=None),))
    store.write_suite("a-nan", errored, gate_passed=False, run_id="r1")
    store.write_suite("b-noise", failed, gate_passed=False, run_id="r2")
    assert [r["adapter_id"] for r in store.leaderboard()] == ["b-noise", "a-nan"]
