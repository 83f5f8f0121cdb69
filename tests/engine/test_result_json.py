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
