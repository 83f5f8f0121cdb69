"""Several adapters in one Dagster run: the model assets take a partition range (the run a
single-run backfill launches), load the base once and evaluate the adapters in turn;
sway_score, its gate check and each probe's verdict check then run once per partition. Real
instance, real DuckDB, real MLflow (sqlite)."""

from __future__ import annotations

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from mlflow import MlflowClient

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.assets import MODEL_BACKFILL, SCORE_BACKFILL
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_engine.store import ResultStore
from tests.conftest import scaled_adapter
from tests.dagster.conftest import add_adapter, asset_of, gate_of, model_loads, verdict_checks

NAMES = ["doc-strong", "noise", "zero", "nan"]
MODEL_GROUPS = ("adapters", "calibration", "probes")


def registered(settings, instance, fx, names):  # type: ignore[no-untyped-def]
    for name in names:
        add_adapter(settings, fx.adapters[name])
    keys = [
        c.key
        for c in AdapterStoreResource(root=str(settings.adapters_dir), settle_seconds=0).scan()
        if c.key is not None
    ]
    instance.add_dynamic_partitions("adapters", keys)
    return {k.rsplit("-", 1)[0]: k for k in keys}


def ranged(first: str, last: str) -> dict[str, str]:
    return {ASSET_PARTITION_RANGE_START_TAG: first, ASSET_PARTITION_RANGE_END_TAG: last}


def test_backfill_policies_put_model_assets_in_one_run_and_score_per_partition(home) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(home)
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        if not node.is_partitioned or not node.is_materializable:
            continue
        expected = SCORE_BACKFILL if key == dg.AssetKey("sway_score") else MODEL_BACKFILL
        assert node.backfill_policy == expected, key


@pytest.mark.slow
def test_one_ranged_run_evaluates_every_adapter_with_one_base_load(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(home)
    keys = registered(home, instance, fx, NAMES)
    ordered = instance.get_dynamic_partitions("adapters")
    model_job = defs.get_implicit_global_asset_job_def()
    graph = defs.resolve_asset_graph()
    selection = [
        k
        for k in dg.AssetSelection.groups(*MODEL_GROUPS).resolve(graph)
        if graph.get(k).is_materializable
    ]
    result = model_job.execute_in_process(
        instance=instance,
        tags=ranged(ordered[0], ordered[-1]),
        asset_selection=selection,
    )
    assert result.success
    assert model_loads(instance, result.run_id) == 1  # four adapters, one base load
    assert result.get_asset_check_evaluations() == []  # verdicts are final only after scoring

    # every partition got its own materialization with its own metadata
    mats = result.asset_materializations_for_node("sway__delta_kl_doc")
    by_key = {m.partition: m.metadata for m in mats}
    assert set(by_key) == set(keys.values())
    assert by_key[keys["doc-strong"]]["verdict"].value == "pass"
    assert by_key[keys["nan"]]["verdict"].value == "error"
    assert "non-finite" in by_key[keys["nan"]]["message"].value
    # a random adapter's own numbers, not doc-strong's (its verdict is FAIL on all but one
    # build in a hundred: the calibration audit measures that rate)
    assert by_key[keys["noise"]]["z"].value < by_key[keys["doc-strong"]]["z"].value - 1
    calib = {
        m.partition: m.metadata for m in result.asset_materializations_for_node("null_calibration")
    }
    assert calib[keys["doc-strong"]]["calibrated_probes"].value == 2  # delta_kl, ablation
    assert calib[keys["nan"]]["calibrated_probes"].value == 0

    store = ResultStore(home.database)
    assert store.probe_results() == []  # no evaluation is complete before sway_score: unseen
    rows = {
        key: r
        for key in keys.values()
        for r in store.probe_results(run_id=f"{result.run_id}:{key}")
        if r["probe"] == "delta_kl_doc"
    }
    assert set(rows) == set(keys.values())
    assert {r["dagster_run_id"] for r in rows.values()} == {result.run_id}

    # sway_score and the gate, one partition per run (what the backfill's score runs do)
    gates = {}
    for name, key in keys.items():
        scored = model_job.execute_in_process(
            instance=instance, partition_key=key, asset_selection=[dg.AssetKey("sway_score")]
        )
        assert scored.success
        gates[name] = gate_of(scored).passed
        # every probe's final verdict, on its own asset, in this partition
        stored = {asset_of(r): r["verdict"] for r in store.probe_results(key)}
        checks = verdict_checks(defs, instance, key)
        assert {a: c.evaluation.passed for a, c in checks.items()} == {
            a: v in ("pass", "skip") for a, v in stored.items()
        }, name
        assert {c.run_id for c in checks.values()} == {scored.run_id}
    assert gates == {"doc-strong": True, "noise": False, "zero": False, "nan": False}
    assert store.row_counts()["scores"] == 4
    assert {r["adapter_id"] for r in store.probe_results()} == set(keys.values())
    # the score runs opened no model session: they record the configured kind
    assert {r["backend_kind"] for r in store.runs()} == {"hf"}

    # one MLflow run per adapter: the score logged to the run the probes logged to
    client = MlflowClient(home.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.data.tags["dagster.partition"] for r in runs) == sorted(keys.values())
    assert {r.data.tags["dagster.run_id"] for r in runs} == {result.run_id}
    strong = next(r for r in runs if r.data.tags["dagster.partition"] == keys["doc-strong"])
    assert "sway/score" in strong.data.metrics and "delta_kl_doc/z" in strong.data.metrics

    # the same numbers as evaluating doc-strong alone
    alone = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=keys["doc-strong"], instance=instance
    )
    assert alone.success
    (m,) = alone.asset_materializations_for_node("sway__delta_kl_doc")
    assert m.metadata["raw"].value == pytest.approx(
        by_key[keys["doc-strong"]]["raw"].value, abs=1e-6
    )
    assert m.metadata["z"].value == pytest.approx(by_key[keys["doc-strong"]]["z"].value, abs=1e-3)


def test_sway_score_refuses_a_range_with_advice(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    defs = build_definitions(home)
    registered(home, instance, fx, ["doc-strong", "zero"])
    ordered = instance.get_dynamic_partitions("adapters")
    job = defs.get_implicit_global_asset_job_def()
    result = job.execute_in_process(
        instance=instance,
        tags=ranged(ordered[0], ordered[-1]),
        asset_selection=[dg.AssetKey("sway_score")],
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "scores one adapter per run" in str(failure.step_failure_data.error)
    assert "backfill" in str(failure.step_failure_data.error)
    assert ResultStore(home.database).row_counts()["scores"] == 0  # nothing half-written


def test_an_adapter_that_fails_preflight_in_a_range_gets_error_rows(
    home, instance, fx, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    """Finite weights whose outputs overflow load fine and fail the preflight forward: in a
    ranged run that adapter's rows are ERROR (null_baseline included), the other's are not."""
    huge = scaled_adapter(fx.adapters["doc-strong"], tmp_path / "huge", 1e30)
    add_adapter(home, huge)
    add_adapter(home, fx.adapters["doc-strong"])
    keys = {
        c.key.rsplit("-", 1)[0]: c.key
        for c in AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
        if c.key is not None
    }
    instance.add_dynamic_partitions("adapters", list(keys.values()))
    ordered = instance.get_dynamic_partitions("adapters")
    defs = build_definitions(home)
    graph = defs.resolve_asset_graph()
    selection = [
        k
        for k in dg.AssetSelection.groups(*MODEL_GROUPS).resolve(graph)
        if graph.get(k).is_materializable
    ]
    result = defs.get_implicit_global_asset_job_def().execute_in_process(
        instance=instance, tags=ranged(ordered[0], ordered[-1]), asset_selection=selection
    )
    assert result.success
    calib = {
        m.partition: m.metadata for m in result.asset_materializations_for_node("null_calibration")
    }
    assert "preflight failed" in calib[keys["huge"]]["error"].value
    assert calib[keys["doc-strong"]]["calibrated_probes"].value == 2  # delta_kl, ablation
    store = ResultStore(home.database)
    rows = [r for k in keys.values() for r in store.probe_results(run_id=f"{result.run_id}:{k}")]
    verdicts = {(r["adapter_id"], r["probe"]): r["verdict"] for r in rows}
    assert verdicts[keys["huge"], "null_baseline"] == "error"
    assert verdicts[keys["huge"], "delta_kl_doc"] == "error"
    assert verdicts[keys["doc-strong"], "delta_kl_doc"] == "pass"
