"""MlflowTracking against a real MLflow sqlite store and a local artifact root."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import pytest

from sway_engine.result import NullStats, ProbeResult, SuiteResult, SwayScore, Verdict
from sway_engine.tracking import NOTE_LIMIT, MlflowTracking, TrackingError, is_secret_name

EXPERIMENT = "sway tests/adapters"


@pytest.fixture
def tracking(tmp_path: Path, template_db: Path) -> MlflowTracking:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template_db, db)
    return MlflowTracking(
        f"sqlite:///{db}",
        EXPERIMENT,
        artifact_root=tmp_path / "artifacts",
        ui_url="http://127.0.0.1:5000/",
    )


def _probe(name: str, verdict: Verdict, **changes: object) -> ProbeResult:
    values: dict[str, object] = {
        "name": name,
        "kind": name,
        "category": "adherence",
        "verdict": verdict,
        "message": "",
        "score": 0.8,
        "raw": 0.42,
        "z": 3.1,
        "p": 0.01,
        "null": NullStats(0.05, 0.02, 3, (0.03, 0.05, 0.07), False),
    }
    values.update(changes)
    return ProbeResult(**values)  # type: ignore[arg-type]


def _suite() -> SuiteResult:
    return SuiteResult(
        spec_path="/tmp/sway.yaml",
        spec_hash="spec-aaaa",
        base_model="tiny-base",
        adapter="/adapters/a",
        started_at="2025-01-02T03:04:05+00:00",
        finished_at="2025-01-02T03:05:05+00:00",
        wall_s=60.0,
        sway_version="0.1.0",
        probes=(
            _probe("delta_kl", Verdict.PASS),
            _probe("style", Verdict.FAIL, z=math.nan, p=math.inf, score=0.1),
            _probe("leak", Verdict.ERROR, score=None, raw=None, z=None, p=None, null=None),
        ),
        score=SwayScore(0.71, "strong", {"adherence": 0.71}, {"adherence": 1.0}, ()),
    )


def test_experiment_is_created_once_with_artifact_root(tracking: MlflowTracking) -> None:
    experiment_id = tracking.experiment_id()
    experiment = tracking.client.get_experiment(experiment_id)
    assert experiment.name == EXPERIMENT
    assert tracking.artifact_root is not None
    expected = (tracking.artifact_root / "sway_tests_adapters").as_uri()
    assert experiment.artifact_location == expected
    other = MlflowTracking(tracking.tracking_uri, EXPERIMENT, artifact_root="/elsewhere")
    assert other.experiment_id() == experiment_id


def test_run_for_reuses_the_run_of_the_same_dagster_run(tracking: MlflowTracking) -> None:
    tags = {"dagster.partition": "it's-a", "sway.adapter_sha": "ab12"}
    first = tracking.run_for("it's-a", "dagster-1", tags)
    assert tracking.run_for("it's-a", "dagster-1", tags) == first
    retried = tracking.run_for("it's-a", "dagster-2", tags)
    other_adapter = tracking.run_for("b", "dagster-1", {})
    assert len({first, retried, other_adapter}) == 3
    run = tracking.client.get_run(first)
    assert run.info.run_name == "it's-a"
    assert run.data.tags["sway.adapter_id"] == "it's-a"
    assert run.data.tags["dagster.run_id"] == "dagster-1"
    assert run.data.tags["dagster.partition"] == "it's-a"
    assert run.data.tags["sway.adapter_sha"] == "ab12"


def test_run_for_reopens_a_terminated_run(tracking: MlflowTracking) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    tracking.finish(run_id, "FAILED")
    assert tracking.client.get_run(run_id).info.status == "FAILED"
    assert tracking.run_for("a", "dagster-1", {}) == run_id
    assert tracking.client.get_run(run_id).info.status == "RUNNING"
    tracking.finish(run_id)
    assert tracking.client.get_run(run_id).info.status == "FINISHED"
    with pytest.raises(TrackingError, match="status 'DONE'"):
        tracking.finish(run_id, "DONE")


def test_run_for_reuse_searches_once_until_the_run_is_terminated(
    tracking: MlflowTracking, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Dagster run's probe steps each preview into the adapter's MLflow run: with `reuse`
    the run is searched for once, not once per step; a run this object terminates, or a pair
    it was told to forget, is searched for again (and a terminated run reopened)."""
    searches: list[object] = []
    original = tracking.client.search_runs

    def counted(*args: object, **kwargs: object) -> object:
        searches.append(args)
        return original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tracking.client, "search_runs", counted)
    first = tracking.run_for("a", "dagster-1", {}, reuse=True)
    assert [tracking.run_for("a", "dagster-1", {}, reuse=True) for _ in range(5)] == [first] * 5
    assert len(searches) == 1
    assert tracking.run_for("a", "dagster-1", {}) == first  # without reuse: searched
    assert len(searches) == 2
    tracking.finish(first, "FAILED")
    assert tracking.run_for("a", "dagster-1", {}, reuse=True) == first
    assert len(searches) == 3
    assert tracking.client.get_run(first).info.status == "RUNNING"
    tracking.forget_run("a", "dagster-1")
    tracking.run_for("a", "dagster-1", {}, reuse=True)
    assert len(searches) == 4


def test_log_suite_writes_metrics_params_and_tags(tracking: MlflowTracking) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    params = {
        "base_model": "tiny-base",
        "null_seeds": 6,
        "lam": 0.5,
        "api_key": "sk-123",
        "HF_TOKEN": "hf_x",
    }
    tracking.log_suite(run_id, _suite(), params)
    tracking.log_suite(run_id, _suite(), params)

    data = tracking.client.get_run(run_id).data
    assert data.metrics == {
        "delta_kl/raw": 0.42,
        "delta_kl/z": 3.1,
        "delta_kl/p": 0.01,
        "delta_kl/score": 0.8,
        "style/raw": 0.42,
        "style/score": 0.1,
        "sway/score": 0.71,
    }
    assert data.params == {"base_model": "tiny-base", "null_seeds": "6", "lam": "0.5"}
    assert data.tags["sway.band"] == "strong"
    assert data.tags["sway.spec_hash"] == "spec-aaaa"
    assert data.tags["sway.verdict.delta_kl"] == "pass"
    assert data.tags["sway.verdict.style"] == "fail"
    assert data.tags["sway.verdict.leak"] == "error"
    history = tracking.client.get_metric_history(run_id, "sway/score")
    assert [m.value for m in history] == [0.71]  # logged again at the same value: once

    with pytest.raises(TrackingError, match=r"null_seeds: '6' -> '7'"):
        tracking.log_suite(run_id, _suite(), {**params, "null_seeds": 7})
    assert tracking.client.get_run(run_id).data.params["null_seeds"] == "6"


def test_log_probe_writes_one_probe(tracking: MlflowTracking) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    tracking.log_probe(run_id, _probe("style", Verdict.WARN, p=math.nan))
    data = tracking.client.get_run(run_id).data
    assert data.metrics == {"style/raw": 0.42, "style/z": 3.1, "style/score": 0.8}
    assert data.tags["sway.verdict.style"] == "warn"


def test_artifacts_land_under_artifact_root(tracking: MlflowTracking, tmp_path: Path) -> None:
    from matplotlib.figure import Figure

    run_id = tracking.run_for("a", "dagster-1", {})
    figure = Figure(figsize=(2, 2))
    figure.add_subplot().plot([0, 1], [1, 0])
    png = io.BytesIO()
    figure.savefig(png, format="png")
    report = tmp_path / "report.html"
    report.write_text("<h1>sway</h1>", encoding="utf-8")

    tracking.log_text(run_id, "all good", "notes/summary.txt")
    tracking.log_json(run_id, {"z": math.nan, "ok": [1, 2]}, "suite.json")
    tracking.log_figure_png(run_id, png.getvalue(), "figures/null.png")
    tracking.log_figure_png(run_id, png.getvalue(), "top.png")
    tracking.log_artifact_file(run_id, report, "reports")

    listed = {f.path for f in tracking.client.list_artifacts(run_id)}
    assert listed == {"notes", "suite.json", "figures", "top.png", "reports"}
    nested = {f.path for f in tracking.client.list_artifacts(run_id, "figures")}
    assert nested == {"figures/null.png"}
    assert tracking.artifact_root is not None
    root = tracking.artifact_root / "sway_tests_adapters"
    suite_json = next(root.glob(f"{run_id}/artifacts/suite.json"))
    assert json.loads(suite_json.read_text()) == {"z": None, "ok": [1, 2]}
    assert next(root.glob(f"{run_id}/artifacts/figures/null.png")).read_bytes() == png.getvalue()
    assert (root / run_id / "artifacts" / "reports" / "report.html").is_file()

    with pytest.raises(TrackingError, match="not a PNG"):
        tracking.log_figure_png(run_id, b"GIF89a", "bad.png")
    with pytest.raises(TrackingError, match="no such file"):
        tracking.log_artifact_file(run_id, tmp_path / "missing.txt")


def test_log_suite_links_each_metric_to_the_model_once(tracking: MlflowTracking) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    tracking.log_probe(run_id, _probe("delta_kl", Verdict.PASS))  # live, before any model
    model_id = tracking.logged_model("a", {"rank": 8})
    tracking.log_suite(run_id, _suite(), {}, model_id)
    tracking.log_suite(run_id, _suite(), {}, model_id)

    run = tracking.client.get_run(run_id)
    model = tracking.client.get_logged_model(model_id)
    assert sorted((m.key, m.value) for m in model.metrics) == sorted(run.data.metrics.items())
    assert len(model.metrics) == 7  # delta_kl x4, style raw and score, sway/score
    for key in ("delta_kl/z", "sway/score"):
        assert len(tracking.client.get_metric_history(run_id, key)) == 1, key
    assert [i.model_id for i in run.inputs.model_inputs] == [model_id]


def test_logged_model_is_made_once_and_a_half_made_one_is_finished(
    tracking: MlflowTracking,
) -> None:
    model_id = tracking.logged_model("a", {"rank": 8, "api_key": "sk-1"})
    assert tracking.logged_model("a", {"rank": 9}) == model_id  # found by its tag, kept
    model = tracking.client.get_logged_model(model_id)
    assert (model.name, str(model.status), model.params) == ("a", "READY", {"rank": "8"})
    assert {a.path for a in tracking.client.list_logged_model_artifacts(model_id)} == {"MLmodel"}

    # A copy that died between creating the model and finishing it: the next one finishes it.
    pending = tracking.client.create_logged_model(
        tracking.experiment_id(), name="b", tags={"sway.adapter_id": "b"}
    )
    assert str(pending.status) == "PENDING"
    assert tracking.logged_model("b", {}) == pending.model_id
    assert str(tracking.client.get_logged_model(pending.model_id).status) == "READY"
    found = tracking.client.search_logged_models([tracking.experiment_id()])
    assert sorted(m.name for m in found) == ["a", "b"]


def test_describe_sets_the_report_and_cuts_a_long_one_at_a_line_end(
    tracking: MlflowTracking,
) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    tracking.describe(run_id, "# sway report\n\nall good\n")
    assert tracking.client.get_run(run_id).data.tags["mlflow.note.content"] == (
        "# sway report\n\nall good\n"
    )
    lines = [f"| probe_{i:04d} | pass |" for i in range(1000)]  # 21 characters a line
    tracking.describe(run_id, "\n".join(lines) + "\n")
    note = tracking.client.get_run(run_id).data.tags["mlflow.note.content"]
    assert len(note) <= NOTE_LIMIT
    head, _, tail = note.partition("\n*(cut")
    assert head.splitlines() == lines[: len(head.splitlines())]
    assert len(head.splitlines()) > 300
    assert "report.md" in tail


def test_run_url(tracking: MlflowTracking) -> None:
    run_id = tracking.run_for("a", "dagster-1", {})
    experiment_id = tracking.experiment_id()
    assert tracking.run_url(run_id) == (
        f"http://127.0.0.1:5000/#/experiments/{experiment_id}/runs/{run_id}"
    )
    quiet = MlflowTracking(tracking.tracking_uri, EXPERIMENT)
    assert quiet.run_url(run_id) is None


def test_unknown_run_raises_tracking_error(tracking: MlflowTracking) -> None:
    with pytest.raises(TrackingError, match="run 0123"):
        tracking.log_suite("0123", _suite(), {})


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("api_key", True),
        ("OPENAI_API_KEY", True),
        ("hf_token", True),
        ("client_secret", True),
        ("base_model", False),
        ("null_seeds", False),
    ],
)
def test_secret_names(name: str, secret: bool) -> None:
    assert is_secret_name(name) is secret
