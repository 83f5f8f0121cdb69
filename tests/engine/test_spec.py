"""spec.py: upstream files load unchanged; every problem is reported at once with its path."""

from pathlib import Path

import pytest

from sway_engine.errors import SpecError
from sway_engine.spec import merge_weights, parse_weights
from sway_engine.suite import load_spec, parse_spec

DATA = Path(__file__).parents[1] / "data"


def minimal(**suite_entry: object) -> dict:
    return {
        "version": 1,
        "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
        "suite": [{"name": "d", "kind": "delta_kl", "prompts": ["x"], **suite_entry}],
    }


def test_upstream_full_suite_loads() -> None:
    spec, entries = load_spec(DATA / "upstream_full_suite.yaml")
    kinds = [e.spec.kind for e in entries]
    assert len(kinds) == 17 and kinds[0] == "null_adapter" and kinds[-1] == "adapter_ablation"
    # relative paths resolve against the spec file's folder
    assert spec.models.ft.adapter == str((DATA / "adapter").resolve())
    assert all(e.probe is not None for e in entries)  # every upstream kind is implemented


def test_three_mistakes_reported_together() -> None:
    data = minimal(bogus=1)
    data["models"]["ft"]["adpter"] = "typo"
    data["defaults"] = {"top_k": 0}
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    paths = [p for p, _ in info.value.problems]
    assert paths == ["models.ft.adpter", "defaults.top_k", "suite[0].bogus"]
    assert "suite[0].bogus" in str(info.value)


def test_unknown_kind_and_duplicate_names() -> None:
    data = minimal()
    data["suite"].append({"name": "d", "kind": "delta_kl", "prompts": ["y"]})
    data["suite"].append({"name": "z", "kind": "telepathy"})
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    messages = dict(info.value.problems)
    assert "duplicate" in messages["suite[1].name"]
    assert "unknown probe kind 'telepathy'" in messages["suite[2].kind"]


def test_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "s.yaml"
    bad.write_text("version: [1\n")
    with pytest.raises(SpecError, match="invalid YAML"):
        load_spec(bad)
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "missing.yaml")


def test_version_must_be_one() -> None:
    data = minimal()
    data["version"] = 2
    with pytest.raises(SpecError, match="unsupported sway spec version 2"):
        parse_spec(data)


def test_weights_merge_over_defaults_and_validate() -> None:
    w = merge_weights({"ablation": 0.0})
    assert w["ablation"] == 0.0 and w["adherence"] == 0.30 and w["attribution"] == 0.35
    assert parse_weights("adherence=0.5, calibration=0")["adherence"] == 0.5
    with pytest.raises(ValueError, match="unknown score weight"):
        parse_weights("adherance=1")
    with pytest.raises(ValueError, match="not a number"):
        parse_weights("adherence=lots")
    with pytest.raises(ValueError, match=">= 0"):
        merge_weights({"adherence": -1})


def test_spec_hash_is_stable_and_content_sensitive() -> None:
    a, _ = parse_spec(minimal())
    b, _ = parse_spec(minimal())
    c, _ = parse_spec(minimal(assert_mean_gte=0.05))
    assert a.spec_hash() == b.spec_hash() != c.spec_hash()
