"""The evaluate_adapter job on a real Dagster instance, real DuckDB and real MLflow (sqlite)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from mlflow import MlflowClient

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_engine.adapters import read_adapter
from sway_engine.store import ResultStore
from tests.dagster.conftest import add_adapter, asset_of, gate_of, model_loads, verdict_checks


def evaluate(settings, instance, names, fx):  # type: ignore[no-untyped-def]
    """Copy adapters in, register their partitions, run the job once per partition."""
    defs = build_definitions(settings)
    keys = []
    for name in names:
        add_adapter(settings, fx.adapters[name])
    for cand in AdapterStoreResource(root=str(settings.adapters_dir), settle_seconds=0).scan():
        if cand.key is not None:
            keys.append(cand.key)
    instance.add_dynamic_partitions("adapters", keys)
    job = defs.resolve_job_def(JOB_NAME)
    results = {k: job.execute_in_process(partition_key=k, instance=instance) for k in keys}
    return defs, results


def test_one_partition_writes_duckdb_and_one_mlflow_run(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    defs, results = evaluate(home, instance, ["doc-strong"], fx)
    ((key, result),) = results.items()
    assert result.success
    assert model_loads(instance, result.run_id) == 1  # one base load for the whole run
    sha8 = read_adapter(fx.adapters["doc-strong"]).sha8
    assert key == f"doc-strong-{sha8}"
    # the run's log says each step, as `sway run` shows it
    logged = [e.user_message for e in instance.all_logs(result.run_id)]
    assert f"{key}: delta_kl_doc under the null adapters" in logged
    assert f"{key}: delta_kl_doc (delta_kl)" in logged

    store = ResultStore(home.database)
    counts = store.row_counts()
    assert counts["adapters"] == 1 and counts["scores"] == 1 and counts["runs"] == 1
    assert counts["probe_results"] == 3  # null_baseline, delta_kl_doc, ablation
    assert counts["null_calibration"] == 32  # (delta_kl, ablation) x 16 seeds
    dkl = next(r for r in store.probe_results(key) if r["probe"] == "delta_kl_doc")
    assert dkl["verdict"] == "pass" and dkl["p"] <= 0.01 and dkl["evidence"]["q"] <= 0.01

    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.data.tags["dagster.run_id"] == result.run_id
    assert run.data.tags["dagster.partition"] == key
    assert run.data.metrics["delta_kl_doc/z"] == pytest.approx(dkl["z"])
    # Logged while the probe ran and copied again by sway_score: one point, not two.
    assert len(client.get_metric_history(run.info.run_id, "delta_kl_doc/z")) == 1
    assert "sway/score" in run.data.metrics and run.data.params["rank"] == "8"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.md", "report.html", "plots"} <= artifacts

    mats = result.asset_materializations_for_node("sway__delta_kl_doc")
    meta = mats[0].metadata
    assert meta["verdict"].value == "pass" and meta["z"].value >= 3
    assert "mlflow_run" in meta and "plot" in meta and "items" in meta
    # sway_score links this evaluation's HTML page, written under the home's reports folder
    (score,) = result.asset_materializations_for_node("sway_score")
    page = Path(score.metadata["report"].value)
    assert page == home.reports / key / f"{result.run_id}_{key}-{page.stem[-8:]}.html"
    text = page.read_text()
    assert "Gate passed" in text and 'alt="delta_kl_doc null distribution"' in text

    # Again: a new Dagster run is a second evaluation beside the first (history is kept), the
    # reads show the latest complete one, and it gets its own MLflow run.
    again = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=key, instance=instance)
    assert again.success
    doubled = {t: 2 * n for t, n in counts.items() if t != "adapters"}
    assert store.row_counts() == {**doubled, "adapters": 1}
    runs = store.runs()
    assert {r["status"] for r in runs} == {"complete"} and len(runs) == 2
    latest = {r["run_id"] for r in store.probe_results(key)}
    assert latest == {f"{again.run_id}:{key}"}
    assert len(store.probe_results(run_id=f"{result.run_id}:{key}")) == 3  # still queryable
    assert len(client.search_runs([exp.experiment_id])) == 2
    (again_score,) = again.asset_materializations_for_node("sway_score")
    assert Path(again_score.metadata["report"].value) != page and page.is_file()
    assert sorted(p.name for p in (home.reports / key).iterdir()) == sorted(
        [page.name, Path(again_score.metadata["report"].value).name]
    )


def test_gate_check_per_adapter(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    _, results = evaluate(home, instance, ["doc-strong", "noise", "zero", "nan"], fx)
    outcome = {}
    for key, result in results.items():
        assert result.success  # a rejected adapter is a successful evaluation with a red check
        check = gate_of(result)
        outcome[key.rsplit("-", 1)[0]] = (check.passed, check.severity)
    assert outcome["doc-strong"] == (True, dg.AssetCheckSeverity.WARN)
    for bad in ("noise", "zero", "nan"):
        assert outcome[bad] == (False, dg.AssetCheckSeverity.ERROR), bad
    store = ResultStore(home.database)
    nan_rows = [r for r in store.probe_results() if r["adapter_id"].startswith("nan-")]
    assert nan_rows and {r["verdict"] for r in nan_rows} == {"error"}
    board = store.leaderboard()
    assert board[0]["adapter_id"].startswith("doc-strong-")
    assert board[-1]["adapter_id"].startswith("nan-")  # all ERROR: below noise and zero


def test_each_probe_asset_has_its_final_verdict_as_a_check_per_adapter(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    """sway_score records every probe's stored (Benjamini-Hochberg adjusted) verdict as the
    `verdict` check of the probe's asset, in the adapter's partition: PASS passes, and a
    verdict that fails the gate (here nan's ERRORs) fails at ERROR severity."""
    defs, results = evaluate(home, instance, ["doc-strong", "nan"], fx)
    store = ResultStore(home.database)
    for key, result in results.items():
        assert result.success
        stored = {asset_of(r): r for r in store.probe_results(key)}
        checks = verdict_checks(defs, instance, key)
        assert set(checks) == set(stored) and len(stored) == 3  # null_baseline and two probes
        for asset, record in checks.items():
            verdict = stored[asset]["verdict"]
            assert (record.run_id, record.partition) == (result.run_id, key)
            assert record.evaluation.passed == (verdict in ("pass", "skip")), asset
            assert record.evaluation.metadata["verdict"].value == verdict

    strong = verdict_checks(defs, instance, next(k for k in results if k.startswith("doc-")))
    dkl = strong[dg.AssetKey(["sway", "delta_kl_doc"])].evaluation
    assert dkl.passed and dkl.metadata["q"].value <= 0.01 and dkl.metadata["z"].value >= 3
    nan = verdict_checks(defs, instance, next(k for k in results if k.startswith("nan-")))
    for record in nan.values():
        assert not record.evaluation.passed
        assert record.evaluation.severity == dg.AssetCheckSeverity.ERROR
        assert record.evaluation.metadata["verdict"].value == "error"


def test_a_run_hashes_the_adapter_weights_once(home, instance, fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Every asset verifies its partition against its key, but an unchanged weights file is
    read and hashed once per run (it was read by each of the run's four model assets)."""
    import sway_dagster.adapter_store as adapter_store

    reads: list[object] = []
    original = adapter_store.read_adapter

    def spy(*args: object, **kwargs: object) -> object:
        reads.append(args[0])
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(adapter_store, "read_adapter", spy)
    _, results = evaluate(home, instance, ["doc-strong"], fx)
    assert all(r.success for r in results.values())
    assert len(reads) == 1 + 1  # the scan that found it, then the whole run


def test_an_unchanged_adapter_again_forwards_nothing(home, instance, fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The persistent scoring cache on the Dagster path: it lives in the home's cache/ folder,
    and a second run of the same partition takes every result from it, with equal numbers,
    without loading the base model (backends/deferred.py)."""
    monkeypatch.setenv("SWAY_SCORE_CACHE", "on")
    defs, results = evaluate(home, instance, ["doc-strong"], fx)
    ((key, first),) = results.items()
    again = defs.resolve_job_def(JOB_NAME).execute_in_process(partition_key=key, instance=instance)
    assert first.success and again.success
    assert (home.home / "cache" / "scores.sqlite").is_file()
    store = ResultStore(home.database)
    passes = {r["run_id"]: r["forward_passes"] for r in store.runs()}
    assert passes[f"{first.run_id}:{key}"] > 0
    assert passes[f"{again.run_id}:{key}"] == 0, passes
    assert model_loads(instance, first.run_id) == 1
    assert model_loads(instance, again.run_id) == 0
    rows = {
        run: {r["probe"]: (r["raw"], r["z"], r["verdict"]) for r in store.probe_results(run_id=run)}
        for run in passes
    }
    assert rows[f"{first.run_id}:{key}"] == rows[f"{again.run_id}:{key}"]
