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


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("2020-13-01", "'2020-13-01' is not a valid timestamp: month must be in 1..12"),
        ("2021-02-30 10:00:00", "is not a valid timestamp: day is out of range"),
        ("!!bool maybe", "'maybe' is not a valid bool"),
        ("!!int ''", "'' is not a valid int"),
        ("!!timestamp x", "'x' is not a valid timestamp"),
        ("[" * 2000 + "]" * 2000, "nested too deeply"),
    ],
)
def test_yaml_values_pyyaml_cannot_build_are_spec_errors(
    tmp_path: Path, value: str, message: str
) -> None:
    """PyYAML raised ValueError, KeyError, IndexError, AttributeError or RecursionError here."""
    path = tmp_path / "sway.yaml"
    path.write_text(f"version: 1\ndlm_source: {value}\n")
    with pytest.raises(SpecError, match="invalid YAML") as info:
        load_spec(path)
    assert message in str(info.value)


def test_a_value_that_holds_itself_is_refused_at_its_path() -> None:
    """A YAML alias inside its own anchor validated, then spec_hash raised ValueError."""
    parameters: dict = {"type": "object"}
    parameters["properties"] = {"p": parameters}
    case = {"prompt": "p", "tool_spec": {"name": "t", "parameters": parameters}}
    data = minimal()
    data["suite"] = [{"name": "tu", "kind": "tool_use_fidelity", "cases": [case]}]
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    [(path, message)] = info.value.problems
    assert path == "suite[0].cases[0].tool_spec.parameters.properties.p"
    assert "holds itself" in message


def test_self_referencing_yaml_file_is_a_spec_error(tmp_path: Path) -> None:
    path = tmp_path / "sway.yaml"
    path.write_text("version: 1\nsuite: &s [*s]\n")
    with pytest.raises(SpecError, match=r"suite\[0\]: holds itself"):
        load_spec(path)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"kind": "multi_turn_coherence_decay", "turn_template": "{message.x}"}, "turn_template"),
        ({"kind": "multi_turn_coherence_decay", "turn_template": "{message[x]}"}, "turn_template"),
        ({"kind": "tool_use_fidelity", "prompt_template": "{tools}{prompt}{tools.x}"}, "prompt_"),
        ({"kind": "tool_use_fidelity", "prompt_template": "{tools}{prompt}{tools[a]}"}, "prompt_"),
        # Valid str.format, but it renders the first character of the message only.
        ({"kind": "multi_turn_coherence_decay", "turn_template": "{message[0]}"}, "turn_template"),
        ({"kind": "multi_turn_coherence_decay", "turn_template": "{message!r}"}, "turn_template"),
        ({"kind": "tool_use_fidelity", "prompt_template": "{tools:>9}{prompt}"}, "prompt_"),
        ({"kind": "tool_use_fidelity", "prompt_template": "{tools}{prompt}{other}"}, "prompt_"),
        ({"kind": "tool_use_fidelity", "prompt_template": "{tools}{prompt"}, "prompt_"),
    ],
)
def test_format_templates_with_attributes_or_keys_are_spec_errors(fields: dict, where: str) -> None:
    """str.format raised AttributeError / TypeError through the validator."""
    data = minimal()
    data["suite"] = [{"name": "t", **fields}]
    with pytest.raises(SpecError, match=rf"suite\[0\]\.{where}"):
        parse_spec(data)


def test_tool_property_type_must_be_one_json_type_name() -> None:
    """`type: [string, null]` raised TypeError: unhashable type: 'list'."""
    parameters = {"type": "object", "properties": {"city": {"type": ["string", "null"]}}}
    case = {"prompt": "p", "tool_spec": {"name": "t", "parameters": parameters}}
    data = minimal()
    data["suite"] = [{"name": "tu", "kind": "tool_use_fidelity", "cases": [case]}]
    with pytest.raises(SpecError, match="type must be one of"):
        parse_spec(data)


def test_paths_this_system_cannot_resolve_load_as_written(tmp_path: Path) -> None:
    """`~nobody/...` raised RuntimeError and a NUL byte ValueError while resolving paths."""
    data = minimal()
    data["models"]["ft"]["adapter"] = "~no-such-user-sway/adapter"
    data["models"]["base"]["base"] = "./m\x00"
    data["dlm_source"] = "doc\x00.dlm"
    spec, _ = parse_spec(data, base_dir=tmp_path)
    assert spec.models.ft.adapter == "~no-such-user-sway/adapter"
    assert spec.models.base.base == "./m\x00" and spec.dlm_source == "doc\x00.dlm"
    with pytest.raises(SpecError, match="cannot read"):
        load_spec(tmp_path / "sway\x00.yaml")
    with pytest.raises(SpecError, match="cannot read"):
        load_spec("~no-such-user-sway/sway.yaml")


def test_home_relative_dlm_source_is_expanded(tmp_path: Path) -> None:
    data = {**minimal(), "dlm_source": "~/doc.dlm"}
    spec, _ = parse_spec(data, base_dir=tmp_path)
    assert spec.dlm_source == str((Path.home() / "doc.dlm").resolve())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_nan_or_infinity_in_any_number_is_a_spec_error_at_its_path(value: float) -> None:
    """`assert_z_gte: .nan` once loaded, and a NaN threshold never holds: every number of a
    spec (probe knobs, defaults) must be finite."""
    data = minimal(assert_z_gte=value, weight=1.0)
    data["defaults"] = {"alpha": 0.05, "null": {"init_scale": value}}
    with pytest.raises(SpecError) as info:
        parse_spec(data)
    problems = dict(info.value.problems)
    assert "finite" in problems["suite[0].assert_z_gte"]
    assert "finite" in problems["defaults.null.init_scale"]


def test_the_weights_category_can_be_given_a_score_weight() -> None:
    data = minimal()
    data["defaults"] = {"score_weights": {"weights": 0.1}}
    spec, _ = parse_spec(data)
    assert spec.weights()["weights"] == 0.1 and spec.weights()["adherence"] == 0.30
    assert merge_weights({})["weights"] == 0.0  # by default it informs and gates, scores nothing
