"""`dagster dev` end to end: the webserver serves the sway location, a run launched through
GraphQL evaluates an adapter partition, and the results land in DuckDB and MLflow.

The server (session fixture `dagster_dev`) is shared with test_browser.py; its teardown sends
SIGTERM to the server's process group and fails if anything survives it.
"""

from __future__ import annotations

from typing import Any

import dagster as dg
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)
from mlflow import MlflowClient

from sway_dagster.definitions import build_definitions
from sway_engine.adapters import read_adapter
from sway_engine.store import ResultStore
from tests.dagster.conftest import (
    ADD_PARTITION,
    REPOSITORIES,
    DagsterDev,
    Evaluation,
    add_adapter,
    asset_of,
    verdict_checks,
    wait_until,
)

pytestmark = [
    pytest.mark.slow,
    # raised by gql inside DagsterGraphQLClient, not by this code
    pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning"),
]

RUNS_FOR_PARTITION = """query Runs($key: String!) {
  runsOrError(filter: {tags: [{key: "dagster/partition", value: $key}]}) {
    ... on Runs { results { runId jobName status } } } }"""


def test_webserver_serves_the_sway_location_with_its_job_and_running_sensors(
    dagster_dev: DagsterDev,
) -> None:
    (repo,) = dagster_dev.graphql(REPOSITORIES)["repositoriesOrError"]["nodes"]
    assert (repo["location"]["name"], repo["name"]) == ("sway", "__repository__")
    assert "evaluate_adapter" in {job["name"] for job in repo["jobs"]}
    sensors = {s["name"]: s["sensorState"]["status"] for s in repo["sensors"]}
    assert sensors == {
        "adapter_sensor": "RUNNING",
        "sway_automation": "RUNNING",
        "dead_run_reaper": "RUNNING",
        "sway_failed_runs": "RUNNING",
    }


def test_a_graphql_launched_run_evaluates_the_partition(
    dagster_dev: DagsterDev, doc_strong_run: Evaluation
) -> None:
    assert doc_strong_run.status == "SUCCESS"
    runs = dagster_dev.graphql(RUNS_FOR_PARTITION, key=doc_strong_run.key)["runsOrError"]
    # Only ours: the sensor found the partition already registered and launched nothing.
    assert runs["results"] == [
        {"runId": doc_strong_run.run_id, "jobName": "evaluate_adapter", "status": "SUCCESS"}
    ]


def test_the_run_writes_probe_rows_and_a_passing_score_to_duckdb(
    dagster_dev: DagsterDev, doc_strong_run: Evaluation
) -> None:
    store = ResultStore(dagster_dev.settings.database)
    rows = {r["probe"]: r for r in store.probe_results(doc_strong_run.key)}
    assert set(rows) == {"null_baseline", "delta_kl_doc", "ablation"}
    assert {r["dagster_run_id"] for r in rows.values()} == {doc_strong_run.run_id}
    assert rows["delta_kl_doc"]["verdict"] == "pass" and rows["delta_kl_doc"]["z"] >= 3
    (score,) = [s for s in store.scores() if s["adapter_id"] == doc_strong_run.key]
    assert score["gate_passed"] is True
    assert score["dagster_run_id"] == doc_strong_run.run_id


def test_the_run_logs_one_mlflow_run_tagged_with_the_dagster_run(
    dagster_dev: DagsterDev, doc_strong_run: Evaluation
) -> None:
    client = MlflowClient(dagster_dev.settings.mlflow_uri)
    tagged = client.search_runs(
        [client.get_experiment_by_name("sway-sway").experiment_id],
        filter_string=f"tags.`dagster.run_id` = '{doc_strong_run.run_id}'",
    )
    assert len(tagged) == 1
    run = tagged[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["dagster.partition"] == doc_strong_run.key
    assert run.data.tags["sway.verdict.delta_kl_doc"] == "pass"
    store = ResultStore(dagster_dev.settings.database)
    dkl = next(r for r in store.probe_results(doc_strong_run.key) if r["probe"] == "delta_kl_doc")
    assert run.data.metrics["delta_kl_doc/z"] == pytest.approx(dkl["z"])
    ledger = next(r for r in store.runs() if r["dagster_run_id"] == doc_strong_run.run_id)
    assert ledger["mlflow_run_id"] == run.info.run_id


LAUNCH_BACKFILL = """mutation Launch($params: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $params) {
    __typename
    ... on LaunchBackfillSuccess { backfillId }
    ... on PythonError { message }
  } }"""

BACKFILL = """query Backfill($id: String!) {
  partitionBackfillOrError(backfillId: $id) {
    __typename
    ... on PartitionBackfill { status runs { runId status tags { key value } } }
    ... on PythonError { message }
  } }"""


def test_a_backfill_runs_the_model_assets_of_all_adapters_in_one_run(
    dagster_dev: DagsterDev, doc_strong_run: Evaluation, fx
) -> None:  # type: ignore[no-untyped-def]
    """The daemon applies the backfill policies: one ranged run for the model assets of both
    adapters (one base load), then one sway_score run per adapter (its gate check and every
    probe's verdict check, in that adapter's partition)."""
    selector = {"repositoryLocationName": "sway", "repositoryName": "__repository__"}
    keys = []
    for name in ("noise", "zero"):
        key = f"{name}-{read_adapter(fx.adapters[name]).sha8}"
        dagster_dev.graphql(ADD_PARTITION, selector=selector, name="adapters", key=key)
        add_adapter(dagster_dev.settings, fx.adapters[name])  # known first: the sensor stays out
        keys.append(key)
    defs = build_definitions(dagster_dev.settings)
    graph = defs.resolve_asset_graph()
    selection = [
        {"path": list(k.path)}
        for k in graph.get_all_asset_keys()
        if graph.get(k).is_materializable and graph.get(k).is_partitioned
    ]
    launched = dagster_dev.graphql(
        LAUNCH_BACKFILL, params={"partitionNames": keys, "assetSelection": selection}
    )["launchPartitionBackfill"]
    assert launched["__typename"] == "LaunchBackfillSuccess", launched
    backfill_id = launched["backfillId"]

    def done() -> dict[str, Any] | None:
        b = dagster_dev.graphql(BACKFILL, id=backfill_id)["partitionBackfillOrError"]
        return b if b["status"] not in ("REQUESTED", "CANCELING") else None

    backfill = wait_until(f"backfill {backfill_id}", done, timeout=420, every=2)
    runs = backfill["runs"]
    assert {r["status"] for r in runs} == {"SUCCESS"}, (backfill, dagster_dev.server.tail(60))
    tags = [{t["key"]: t["value"] for t in r["tags"]} for r in runs]
    span = [(t[ASSET_PARTITION_RANGE_START_TAG], t[ASSET_PARTITION_RANGE_END_TAG]) for t in tags]
    # one run over both adapters (the model assets), one run per adapter (sway_score + gate)
    ranged = [t for t, (a, b) in zip(tags, span, strict=True) if a != b]
    single = sorted(a for a, b in span if a == b)
    assert len(ranged) == 1 and len(runs) == 3, tags
    assert set(span[tags.index(ranged[0])]) == set(keys)
    assert single == sorted(keys)

    model_run = next(r["runId"] for r, t in zip(runs, tags, strict=True) if t in ranged)
    score_runs = {a: r["runId"] for r, (a, b) in zip(runs, span, strict=True) if a == b}
    store = ResultStore(dagster_dev.settings.database)
    with dg.DagsterInstance.from_config(str(dagster_dev.settings.home / "dagster")) as instance:
        for key in keys:
            rows = store.probe_results(key)
            assert rows and {r["dagster_run_id"] for r in rows} == {model_run}
            (score,) = [s for s in store.scores() if s["adapter_id"] == key]
            assert score["gate_passed"] is False
            checks = verdict_checks(defs, instance, key)
            assert {a: c.evaluation.passed for a, c in checks.items()} == {
                asset_of(r): r["verdict"] in ("pass", "skip") for r in rows
            }
            assert {c.run_id for c in checks.values()} == {score_runs[key]}
