"""`dagster dev` end to end: the webserver serves the sway location, a run launched through
GraphQL evaluates an adapter partition, and the results land in DuckDB and MLflow.

The server (session fixture `dagster_dev`) is shared with test_browser.py; its teardown sends
SIGTERM to the server's process group and fails if anything survives it.
"""

from __future__ import annotations

import pytest
from mlflow import MlflowClient

from sway_engine.store import ResultStore
from tests.dagster.conftest import REPOSITORIES, DagsterDev, Evaluation

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
    assert sensors == {"adapter_sensor": "RUNNING", "sway_automation": "RUNNING"}


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
    assert run.data.metrics["delta_kl_doc.z"] == pytest.approx(dkl["z"])
    ledger = next(r for r in store.runs() if r["dagster_run_id"] == doc_strong_run.run_id)
    assert ledger["mlflow_run_id"] == run.info.run_id
