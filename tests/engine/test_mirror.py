"""What a published evaluation looks like in MLflow, made for comparing adapters: the probe
table, one external LoggedModel per adapter holding the run's metrics, the DuckDB run id and
Dagster link as tags, the report as the description, and (when the suite asks) a registered
version with the `gate-passed` alias. Real DuckDB and MLflow (sqlite); no model is loaded."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

from sway_engine.history import registered_model
from sway_engine.mirror import Mirror, forget_failures
from sway_engine.report.text import to_markdown
from sway_engine.result import NullStats, ProbeResult, SuiteResult, SwayScore, Verdict
from sway_engine.store import AdapterRecord, ResultStore
from sway_engine.suite import Suite
from sway_engine.tracking import GATE_ALIAS, TABLE_COLUMNS, TABLE_FILE, MlflowTracking

KEY = "doc-strong-1835ed0a"
PARAMS = {
    "base_model": "tiny-base",
    "rank": 8,
    "alpha": 16.0,
    "target_modules": '["q_proj", "v_proj"]',
    "spec_hash": "spec-aaaa",
    "null_mode": "matched",
}


@pytest.fixture(autouse=True)
def _fresh_breaker() -> None:
    forget_failures()


@pytest.fixture
def tracking(tmp_path: Path, template_db: Path) -> MlflowTracking:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_db, db)
    return MlflowTracking(f"sqlite:///{db}", "sway-suite", artifact_root=tmp_path / "artifacts")


@pytest.fixture
def store(tmp_path: Path) -> ResultStore:
    store = ResultStore(tmp_path / "sway.duckdb")
    for key, sha in ((KEY, "1835ed0a" + "0" * 56), ("noise-77aa00bb", "77aa00bb" + "1" * 56)):
        store.record_adapter(
            AdapterRecord(
                key,
                key.rsplit("-", 1)[0],
                f"/adapters/{key}",
                sha256=sha,
                base_model="tiny-base",
                rank=8,
                alpha=16.0,
                target_modules=("q_proj", "v_proj"),
            )
        )
    return store


def _probe(name: str, verdict: Verdict, **changes: object) -> ProbeResult:
    values: dict[str, object] = {
        "name": name,
        "kind": "delta_kl",
        "category": "adherence",
        "verdict": verdict,
        "message": f"{name} is {verdict.value}",
        "score": 0.8,
        "raw": 0.42,
        "z": 3.1,
        "p": 0.001,
        "null": NullStats(0.05, 0.02, 3, (), False),
        "evidence": {"q": 0.003},
    }
    values.update(changes)
    return ProbeResult(**values)  # type: ignore[arg-type]


def _suite(finished_at: str = "2025-01-02T03:05:05+00:00") -> SuiteResult:
    return SuiteResult(
        spec_path="/suites/sway.yaml",
        spec_hash="spec-aaaa",
        base_model="tiny-base",
        adapter=KEY,
        started_at="2025-01-02T03:04:05+00:00",
        finished_at=finished_at,
        wall_s=60.0,
        sway_version="0.1.0",
        probes=(
            _probe("delta_kl_doc", Verdict.PASS),
            _probe("style", Verdict.FAIL, z=0.4, p=0.34, score=0.1, evidence={"q": 0.34}),
            _probe(
                "leak", Verdict.ERROR, score=None, raw=None, z=None, p=None, null=None, evidence={}
            ),
        ),
        score=SwayScore(0.71, "strong", {"adherence": 0.71}, {"adherence": 1.0}, ()),
    )


def _evaluation(
    store: ResultStore, run_id: str, key: str, *, passed: bool, finished_at: str, dagster: str
) -> str:
    result = replace(_suite(finished_at), adapter=key)
    store.write_suite(key, result, passed, run_id, dagster_run_id=dagster, origin="dagster")
    return run_id


def test_a_published_evaluation_holds_the_table_the_model_the_tags_and_the_report(
    tracking: MlflowTracking, store: ResultStore, tmp_path: Path
) -> None:
    run_id = _evaluation(
        store, "dag-1:" + KEY, KEY, passed=True, finished_at="2025-01-02T03:05:05", dagster="dag-1"
    )
    mirror = Mirror(tracking, store, dagster_ui="http://dagster.internal:3000/")
    # The probe step logged its metrics live, before the model existed.
    mirror.preview(KEY, "dag-1", {}, _probe("delta_kl_doc", Verdict.PASS))
    first = mirror.publish(run_id, PARAMS)
    again = mirror.publish(run_id, PARAMS)  # a retry, or `sway sync-mlflow`
    assert first.synced and again.synced and first.mlflow_run_id == again.mlflow_run_id
    assert first.mlflow_run_id is not None
    client = tracking.client
    run = client.get_run(first.mlflow_run_id)

    # Tags: the DuckDB evaluation and the Dagster run it came from; the report as description.
    assert run.data.tags["sway.run_id"] == run_id
    assert run.data.tags["sway.dagster_run_url"] == "http://dagster.internal:3000/runs/dag-1"
    report = to_markdown(store.suite_of(run_id))
    assert run.data.tags["mlflow.note.content"] == report
    assert "| style | delta_kl | fail |" in report

    # The probe rows as an MLflow table, once however often the run is copied.
    # (read as MLflow wrote it: `load_table` searches through the global tracking URI)
    saved = client.download_artifacts(run.info.run_id, TABLE_FILE, str(tmp_path))
    table = json.loads(Path(saved).read_text())
    assert table["columns"] == list(TABLE_COLUMNS)
    rows = {row[0]: dict(zip(TABLE_COLUMNS, row, strict=True)) for row in table["data"]}
    assert len(table["data"]) == len(rows) == 3
    assert {probe: row["verdict"] for probe, row in rows.items()} == {
        "delta_kl_doc": "pass",
        "style": "fail",
        "leak": "error",
    }
    numbers = ("raw", "z", "p", "q", "score")
    assert tuple(rows["style"][c] for c in numbers) == (0.42, 0.4, 0.34, 0.34, 0.1)
    assert tuple(rows["leak"][c] for c in numbers) == (None,) * 5
    assert rows["delta_kl_doc"]["q"] == 0.003
    assert rows["style"]["message"] == "style is fail"
    logged = json.loads(run.data.tags["mlflow.loggedArtifacts"])
    assert logged == [{"path": TABLE_FILE, "type": "table"}]

    # One external LoggedModel for the adapter, holding each of the run's metrics once.
    (model,) = client.search_logged_models([tracking.experiment_id()])
    assert (model.name, model.model_type, str(model.status)) == (KEY, "lora-adapter", "READY")
    assert model.tags["mlflow.model.isExternal"] == "true"
    assert model.params == {
        "base_model": "tiny-base",
        "rank": "8",
        "alpha": "16.0",
        "target_modules": '["q_proj", "v_proj"]',
        "weights_sha256": "1835ed0a" + "0" * 56,
    }
    linked = sorted((m.key, m.value) for m in client.get_logged_model(model.model_id).metrics)
    assert linked == sorted(run.data.metrics.items())
    assert ("delta_kl_doc/z", 3.1) in linked and ("sway/score", 0.71) in linked
    assert {m.run_id for m in client.get_logged_model(model.model_id).metrics} == {run.info.run_id}
    history = client.get_metric_history(run.info.run_id, "delta_kl_doc/z")
    assert [m.value for m in history] == [3.1]  # the preview's point, linked, not doubled
    assert [i.model_id for i in run.inputs.model_inputs] == [model.model_id]
    assert client.search_registered_models() == []  # the suite did not ask to register


def test_a_second_evaluation_of_the_adapter_reports_to_the_same_model(
    tracking: MlflowTracking, store: ResultStore
) -> None:
    mirror = Mirror(tracking, store)
    for dagster, finished in (("dag-1", "2025-01-02T03:05:05"), ("dag-2", "2025-01-03T03:05:05")):
        run_id = _evaluation(
            store, f"{dagster}:{KEY}", KEY, passed=True, finished_at=finished, dagster=dagster
        )
        assert mirror.publish(run_id, PARAMS).synced
    client = tracking.client
    (model,) = client.search_logged_models([tracking.experiment_id()])
    runs = client.search_runs([tracking.experiment_id()])
    assert len(runs) == 2
    assert {m.run_id for m in client.get_logged_model(model.model_id).metrics} == {
        r.info.run_id for r in runs
    }
    assert "sway.dagster_run_url" not in runs[0].data.tags  # no Dagster UI configured


def test_a_passing_adapter_gets_a_version_and_the_alias_a_failing_one_does_not(
    tracking: MlflowTracking, store: ResultStore
) -> None:
    name = "sway-suite"
    mirror = Mirror(tracking, store)
    client = tracking.client

    def publish(run_id: str, key: str, passed: bool, finished_at: str) -> str:
        _evaluation(store, run_id, key, passed=passed, finished_at=finished_at, dagster=run_id)
        published = mirror.publish(run_id, PARAMS, register=name)
        assert published.synced, published.error
        assert published.mlflow_run_id is not None
        return published.mlflow_run_id

    def alias() -> int:
        return int(client.get_registered_model(name).aliases[GATE_ALIAS])

    strong = publish("r1", KEY, True, "2025-01-02T00:00:00")
    assert alias() == 1
    (version,) = client.search_model_versions(f"name = '{name}'")
    (model,) = client.search_logged_models([tracking.experiment_id()])
    assert version.run_id == strong and version.source == model.artifact_location
    assert version.tags["sway.model_id"] == model.model_id
    assert json.loads(client.get_logged_model(model.model_id).tags["mlflow.modelVersions"]) == [
        {"name": name, "version": 1}
    ]
    mirror.publish("r1", PARAMS, register=name)  # copied again: still one version
    assert len(client.search_model_versions(f"name = '{name}'")) == 1

    publish("r2", "noise-77aa00bb", False, "2025-01-03T00:00:00")  # fails the gate
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    assert alias() == 1

    # An older pass of the noise adapter, caught up late: a version, but the alias stays on
    # the newer pass; its next, newer pass takes the alias to the same version.
    publish("r0", "noise-77aa00bb", True, "2025-01-01T00:00:00")
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert alias() == 1
    publish("r3", "noise-77aa00bb", True, "2025-01-04T00:00:00")
    assert len(client.search_model_versions(f"name = '{name}'")) == 2
    assert alias() == 2
    assert len(client.search_logged_models([tracking.experiment_id()])) == 2


def test_a_refused_registration_leaves_the_copy_pending_and_the_evaluation_complete(
    tracking: MlflowTracking, store: ResultStore
) -> None:
    run_id = _evaluation(
        store, "r1", KEY, passed=True, finished_at="2025-01-02T00:00:00", dagster="r1"
    )
    warnings: list[str] = []
    published = Mirror(tracking, store, warnings.append).publish(
        run_id, PARAMS, register="no/slashes"
    )
    assert not published.synced and "no/slashes" in str(published.error)
    row = store.run_row(run_id)
    assert row is not None
    assert (row["status"], row["mlflow_status"]) == ("complete", "pending")
    assert row["mlflow_params"]["register"] == "no/slashes"  # what the catch-up will retry
    assert published.mlflow_run_id is not None
    assert tracking.client.get_run(published.mlflow_run_id).info.status == "FAILED"
    assert "pending" in warnings[0]


def test_defaults_mlflow_names_the_registered_model_without_changing_the_spec_hash(
    tmp_path: Path,
) -> None:
    spec = {
        "version": 1,
        "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
        "suite": [{"name": "dkl", "kind": "delta_kl", "prompts": ["hi"]}],
    }

    def load(name: str, mlflow: dict[str, object] | None) -> Suite:
        data = spec if mlflow is None else {**spec, "defaults": {"mlflow": mlflow}}
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(data), encoding="utf-8")
        return Suite.load(path)

    plain = load("docs", None)
    named = load("docs", {"register": True, "model_name": "doc-adapters"})
    assert registered_model(plain) is None
    assert registered_model(load("docs", {"register": True})) == "sway-docs"
    assert registered_model(named) == "doc-adapters"
    assert registered_model(load("docs", {"model_name": "doc-adapters"})) is None
    assert plain.spec_hash == named.spec_hash  # where results go is not what is measured
    with pytest.raises(Exception, match="model_name"):
        load("docs", {"register": True, "model_name": "a/b"})


def test_a_full_disk_on_a_busy_machine_is_not_taken_for_a_dead_server(
    tracking: MlflowTracking, store: ResultStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A preview whose calls are slow (a loaded machine) before the artifact write fails at once
    (a full disk) must not stop the mirror for COOLDOWN_S: the score step's copy is still
    tried, and closes the MLflow run FAILED instead of leaving it RUNNING. (Timing the whole
    preview made it look like a dead server; a fresh-clone test met this under load.)"""
    import errno
    import time

    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository

    def no_space(*_args: object, **_kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(LocalArtifactRepository, "log_artifact", no_space)
    slow_log = tracking.log_probe

    def busy(*args: object, **kwargs: object) -> None:
        time.sleep(1.2)  # longer than SLOW_FAILURE_S, and it succeeds
        slow_log(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tracking, "log_probe", busy)
    run_id = _evaluation(
        store, "dag-1:" + KEY, KEY, passed=True, finished_at="2025-01-02T03:05:05", dagster="dag-1"
    )
    warned: list[str] = []
    mirror = Mirror(tracking, store, warn=warned.append)
    plotted = _probe(
        "delta_kl_doc", Verdict.PASS, null=NullStats(0.05, 0.02, 3, (0.03, 0.05, 0.07), False)
    )
    mirror.preview(KEY, "dag-1", {}, plotted)  # logs the metrics (slowly), then the plot fails
    assert warned and "No space left on device" in warned[0], warned
    published = mirror.publish(run_id, PARAMS)
    assert not published.synced and "No space left on device" in (published.error or "")
    assert published.mlflow_run_id is not None  # the copy was tried, not refused
    assert tracking.client.get_run(published.mlflow_run_id).info.status == "FAILED"
