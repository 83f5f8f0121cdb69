"""One history, every path (issue 15): `sway run --home` records an evaluation into the same
DuckDB store and MLflow experiment as a Dagster run, indistinguishable apart from its origin,
and `sway history` / `sway leaderboard` read it back. Real Dagster, DuckDB, MLflow (sqlite)."""

from __future__ import annotations

import json

import pytest
from mlflow import MlflowClient

from sway_engine.cli import main
from sway_engine.home import Settings
from sway_engine.store import ResultStore
from tests.dagster.test_evaluate import evaluate


def test_a_cli_run_and_a_dagster_run_of_one_adapter_share_one_history(
    home: Settings, instance, fx, capsys: pytest.CaptureFixture[str]
) -> None:  # type: ignore[no-untyped-def]
    spec = home.suite.read_text()
    assert "defaults: {seed: 0}" in spec
    home.suite.write_text(spec.replace("{seed: 0}", "{seed: 0, mlflow: {register: true}}"))
    _, results = evaluate(home, instance, ["doc-strong"], fx)
    ((key, dagster),) = results.items()
    assert dagster.success
    adapter = home.adapters_dir / "doc-strong"
    assert main(["run", str(home.suite), "--adapter", str(adapter), "--home", str(home.home)]) == 0
    assert f"recorded {key} as run cli:" in capsys.readouterr().err

    store = ResultStore(home.database)
    runs = {r["origin"]: r for r in store.runs()}
    assert set(runs) == {"dagster", "cli"}
    assert {r["adapter_id"] for r in runs.values()} == {key}
    assert {r["status"] for r in runs.values()} == {"complete"}
    assert runs["cli"]["spec_hash"] == runs["dagster"]["spec_hash"]
    rows = {
        origin: {r["probe"]: r for r in store.probe_results(run_id=run["run_id"])}
        for origin, run in runs.items()
    }
    assert set(rows["cli"]) == set(rows["dagster"]) == {"null_baseline", "delta_kl_doc", "ablation"}
    for probe in ("delta_kl_doc", "ablation"):
        cli, dag = rows["cli"][probe], rows["dagster"][probe]
        assert cli["verdict"] == dag["verdict"], probe
        assert cli["raw"] == pytest.approx(dag["raw"], rel=1e-3, abs=1e-7), probe
    cells = {o: len(store.null_calibration(run_id=r["run_id"])) for o, r in runs.items()}
    assert cells["cli"] == cells["dagster"] == 32  # (delta_kl, ablation) x 16 seeds, both paths
    board = store.leaderboard()
    assert [r["adapter_id"] for r in board] == [key]  # the latest evaluation, once

    # Both copies in one MLflow experiment with the same params.
    client = MlflowClient(home.mlflow_uri)
    experiment = client.get_experiment_by_name("sway-sway")
    mlflow_runs = client.search_runs([experiment.experiment_id])
    assert len(mlflow_runs) == 2
    assert {r.data.tags.get("sway.origin") for r in mlflow_runs} == {"dagster", "cli"}
    params = [
        {k: r.data.params[k] for k in ("rank", "spec_hash", "null_mode")} for r in mlflow_runs
    ]
    assert params[0] == params[1]
    assert {r["mlflow_status"] for r in store.runs()} == {"synced"}

    # Made for comparing: each run names its DuckDB evaluation (the Dagster one links its
    # Dagster run), holds the probe table and the report as description; one LoggedModel for
    # the adapter holds both runs' metrics, registered once, with the gate-passed alias.
    copies = {r.data.tags["sway.origin"]: r for r in mlflow_runs}
    assert {o: r.data.tags["sway.run_id"] for o, r in copies.items()} == {
        o: r["run_id"] for o, r in runs.items()
    }
    assert copies["dagster"].data.tags["sway.dagster_run_url"] == (
        f"http://127.0.0.1:3000/runs/{dagster.run_id}"
    )
    assert "sway.dagster_run_url" not in copies["cli"].data.tags
    for copy in mlflow_runs:
        assert "probe_results.json" in {a.path for a in client.list_artifacts(copy.info.run_id)}
        assert copy.data.tags["mlflow.note.content"].startswith("# sway report")
    (model,) = client.search_logged_models([experiment.experiment_id])
    assert model.name == key
    linked = client.get_logged_model(model.model_id).metrics
    assert {m.run_id for m in linked} == {r.info.run_id for r in mlflow_runs}
    (version,) = client.search_model_versions("name = 'sway-sway'")
    assert version.tags["sway.model_id"] == model.model_id
    assert version.run_id == copies["dagster"].info.run_id  # the first pass registered it
    assert client.get_registered_model("sway-sway").aliases == {"gate-passed": version.version}

    # The history, by directory name and by key, oldest first; and the leaderboard.
    capsys.readouterr()
    assert main(["history", "doc-strong", "--home", str(home.home), "--json"]) == 0
    lineage = json.loads(capsys.readouterr().out)
    assert [r["origin"] for r in lineage] == ["dagster", "cli"]
    assert main(["history", key, "--home", str(home.home)]) == 0
    assert capsys.readouterr().out.count(key) == 2
    assert main(["leaderboard", "--home", str(home.home)]) == 0
    assert key in capsys.readouterr().out
    assert main(["history", "nobody", "--home", str(home.home)]) == 2

    # A report from the store alone: Markdown and a self-contained HTML page with its plots.
    md, page = home.home / "report.md", home.home / "report.html"
    assert main(["report", "doc-strong", "--home", str(home.home), "--markdown", str(md)]) == 0
    assert main(["report", key, "--home", str(home.home), "--html", str(page)]) == 0
    assert "| delta_kl_doc | delta_kl | pass |" in md.read_text()
    html = page.read_text()
    assert "delta_kl_doc" in html and ">PASS<" in html
    assert html.count("data:image/png;base64,") >= 2  # delta_kl null histogram, ablation curve
    missing = home.home / "nowhere" / "r.html"
    assert main(["report", key, "--home", str(home.home), "--html", str(missing)]) == 2
