"""A result's JSON is read back whole, and upstream dlm-sway's field names are written beside
ours and accepted (`adapter_id`, `base_model_id`, `wall_seconds`, per probe `z_score`)."""

from __future__ import annotations

import json

import pytest

from sway_engine.result import SuiteResult
from tests.engine.test_store import _suite_abc


def test_our_json_round_trips_and_carries_upstreams_names() -> None:
    result = _suite_abc()
    data = json.loads(json.dumps(result.to_dict()))
    assert data["adapter_id"] == result.adapter and data["base_model_id"] == result.base_model
    assert data["wall_seconds"] == result.wall_s
    assert [p["z_score"] for p in data["probes"]] == [p["z"] for p in data["probes"]]
    again = SuiteResult.from_dict(data)
    assert again.to_dict() == result.to_dict()


def test_upstreams_json_is_read_with_its_own_names() -> None:
    upstream = {
        "schema_version": 1,
        "sway_version": "0.1.0",
        "spec_path": "sway.yaml",
        "base_model_id": "HuggingFaceTB/SmolLM2-135M",
        "adapter_id": "runs/v3",
        "wall_seconds": 12.5,
        "score": {"overall": 0.7, "band": "healthy", "components": {"adherence": 0.7}},
        "probes": [
            {"name": "dkl", "kind": "delta_kl", "verdict": "pass", "raw": 0.2, "z_score": 4.5},
            {"name": "gg", "kind": "gradient_ghost", "verdict": "warn", "z_score": None},
        ],
    }
    result = SuiteResult.from_dict(upstream)
    assert (result.adapter, result.base_model, result.wall_s) == (
        "runs/v3",
        upstream["base_model_id"],
        12.5,
    )
    assert [p.z for p in result.probes] == [4.5, None]
    assert result.score.overall == 0.7 and result.probes[1].verdict.value == "warn"


@pytest.mark.parametrize(
    "bad",
    [{}, {"probes": [{"name": "x"}]}, {"probes": [{"name": "x", "kind": "k", "verdict": "maybe"}]}],
)
def test_a_json_that_is_not_a_result_is_refused_by_what_is_missing(bad: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(ValueError, match="not a sway result"):
        SuiteResult.from_dict(bad)


def test_sway_report_renders_a_saved_result_file_ours_or_upstreams(fx, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    from sway_engine.cli import main

    saved = tmp_path / "r.json"
    assert main(["run", str(fx.suite), "-j", str(saved)]) == 0
    md, page = tmp_path / "r.md", tmp_path / "r.html"
    assert main(["report", str(saved), "--markdown", str(md), "--html", str(page)]) == 0
    assert "| delta_kl_doc | delta_kl | pass |" in md.read_text()
    assert "Gate passed" in page.read_text()
    upstream = tmp_path / "upstream.json"
    upstream.write_text(
        json.dumps(
            {
                "adapter_id": "runs/v3",
                "base_model_id": "b",
                "probes": [{"name": "dkl", "kind": "delta_kl", "verdict": "fail", "z_score": 0.4}],
                "score": {"overall": 0.1, "band": "weak"},
            }
        )
    )
    capsys.readouterr()
    assert main(["report", str(upstream), "--html", str(page)]) == 0
    assert "dkl" in capsys.readouterr().out and "Gate FAILED" in page.read_text()
    broken = tmp_path / "broken.json"
    broken.write_text('{"probes": 3}')
    assert main(["report", str(broken)]) == 2
    assert f"{broken}: not a sway result" in capsys.readouterr().err
