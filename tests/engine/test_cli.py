"""The `sway` command on the fixtures: reports, exit codes, and errors users can act on."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from sway_engine.cli import main
from sway_engine.runner import CALIBRATION_LABEL


def test_run_writes_json_markdown_and_junit(fx, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    md = tmp_path / "r.md"
    junit = tmp_path / "r.xml"
    trace = tmp_path / "trace.jsonl"
    argv = ["run", str(fx.suite), "-j", str(out), "-m", str(md), "--junit", str(junit)]
    assert main([*argv, "--trace", str(trace)]) == 0
    data = json.loads(out.read_text())
    verdicts = {p["name"]: p["verdict"] for p in data["probes"]}
    assert verdicts == {"null_baseline": "pass", "delta_kl_doc": "pass", "ablation": "pass"}
    assert data["backend_stats"]["forward_passes"] >= 1
    assert "| delta_kl_doc | delta_kl | pass |" in md.read_text()
    suite = ET.fromstring(junit.read_text())
    assert suite.get("failures") == "0" and suite.get("tests") == "3"
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert {e["probe"] for e in events} >= {CALIBRATION_LABEL, "ablation"}
    assert "delta_kl_doc" in capsys.readouterr().out


def test_gate_exit_codes(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["gate", str(fx.suite)]) == 0
    assert "gate passed" in capsys.readouterr().out
    assert main(["gate", str(fx.suite), "--adapter", str(fx.adapters["zero"])]) == 1
    assert "gate FAILED" in capsys.readouterr().out
    assert main(["gate", str(fx.suite), "--adapter", str(fx.adapters["nan"])]) == 1
    assert "errored" in capsys.readouterr().out


def test_weights_override_is_merged_and_validated(fx, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "r.json"
    assert main(["run", str(fx.suite), "-j", str(out), "--weights", "ablation=0"]) == 0
    weights = json.loads(out.read_text())["score"]["weights"]
    assert weights["ablation"] == 0 and weights["adherence"] == 0.30
    assert main(["run", str(fx.suite), "--weights", "adherance=1"]) == 2
    assert "unknown score weight categories ['adherance']" in capsys.readouterr().err


def test_bad_spec_exits_2_listing_every_problem(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sway.yaml"
    spec.write_text(
        "version: 1\nmodels: {base: {base: m}, ft: {base: m, adpter: a}}\n"
        "suite:\n  - {name: d, kind: delta_kl, prompts: [x], bogus: 1}\n  - {name: e, kind: nope}\n"
    )
    assert main(["run", str(spec)]) == 2
    err = capsys.readouterr().err
    for path in ("models.ft.adpter", "suite[0].bogus", "suite[1].kind"):
        assert path in err


def test_check_gives_one_line_verdict_and_exits_by_it(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    """`check` exits 0 only on PASS (it always exited 0). doc-strong on the generic prompts
    passes on some builds and not others (p near alpha with 8 nulls): the code follows the
    line."""
    code = main(["check", str(fx.adapters["doc-strong"])])
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith("doc-strong: delta_kl")
    assert code == (0 if "delta_kl PASS" in line else 1)
    assert main(["check", str(fx.adapters["zero"])]) == 1


def test_check_refuses_a_directory_that_is_not_an_adapter(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["check", str(tmp_path)]) == 2
    assert "adapter_config.json is missing" in capsys.readouterr().err


def test_missing_base_model_is_an_error_row_not_a_crash(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sway.yaml"
    spec.write_text(fx.suite.read_text().replace(str(fx.base), str(tmp_path / "no-such-model")))
    out = tmp_path / "r.json"
    assert main(["gate", str(spec), "-j", str(out)]) == 1
    probes = json.loads(out.read_text())["probes"]
    assert {p["verdict"] for p in probes} == {"error"}
    assert "no such directory" in probes[0]["message"]  # not transformers' "repo id" error


@pytest.mark.parametrize("argv", [["--version"], ["fixtures", "build"]])
def test_small_commands(argv: list[str], capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip()


def test_run_exits_1_when_a_probe_errored(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    """Every probe ERROR (NaN weights) used to exit 0 from `sway run`."""
    assert main(["run", str(fx.suite), "--adapter", str(fx.adapters["nan"])]) == 1
    assert "probe(s) errored" in capsys.readouterr().err


def test_an_output_into_a_missing_folder_is_refused_before_the_evaluation(
    fx, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    target = tmp_path / "nope" / "r.json"
    assert main(["gate", str(fx.suite), "--json", str(target)]) == 2
    assert f"{target.parent} does not exist" in capsys.readouterr().err


def test_bad_inputs_exit_2_with_a_message_and_no_traceback(fx, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(fx.suite.read_bytes() + b"# caf\xe9\n")
    assert main(["run", str(spec)]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["check", str(fx.adapters["doc-strong"]), "--prompts", str(tmp_path / "x")]) == 2
    assert "--prompts" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"r": "sixteen"}')
    (broken / "adapter_model.safetensors").write_bytes(b"")
    assert main(["check", str(broken)]) == 2
    err = capsys.readouterr().err
    assert "r must be a positive whole number" in err and "Traceback" not in err


def test_an_internal_error_is_exit_3_with_a_hint_and_a_traceback_under_debug(
    monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # type: ignore[no-untyped-def]
    import sway_engine.cli as cli

    def boom(_args: object) -> int:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(cli, "_fixtures", boom)
    assert main(["fixtures", "build"]) == 3
    err = capsys.readouterr().err
    assert "internal error: ZeroDivisionError: a bug" in err and "--debug" in err
    with pytest.raises(ZeroDivisionError):
        main(["--debug", "fixtures", "build"])


def test_defaults_null_in_plain_yaml(tmp_path: Path) -> None:
    """`null:` is YAML's None key; users saw "defaults.None: Keys should be strings"."""
    from sway_engine.suite import load_spec

    for key in ("null", "nulls", '"null"'):
        spec = tmp_path / f"{key.strip(chr(34))}.yaml"
        spec.write_text(
            "version: 1\nmodels: {base: {base: m}, ft: {base: m, adapter: a}}\n"
            f"defaults:\n  {key}:\n    seeds: 12\n    mode: spectrum\n"
            "suite:\n  - {name: n, kind: null_adapter}\n"
        )
        parsed, _ = load_spec(spec)
        assert (parsed.defaults.null.seeds, parsed.defaults.null.mode) == (12, "spectrum"), key


def test_list_probes_names_every_kind_with_what_it_measures_and_its_inputs(capsys) -> None:  # type: ignore[no-untyped-def]
    import json

    from sway_engine.probes.registry import PROBES

    assert main(["list-probes", "--json"]) == 0
    rows = {r["kind"]: r for r in json.loads(capsys.readouterr().out)}
    assert set(rows) == set(PROBES)
    assert all(r["measures"] and r["direction"].endswith("is better") for r in rows.values())
    assert "prompts" in rows["delta_kl"]["inputs"] and rows["delta_kl"]["claim"] == "effect"
    assert rows["leakage"]["direction"] == "lower is better"
    assert main(["list-probes"]) == 0
    assert "delta_kl (adherence, higher is better)" in capsys.readouterr().out


def test_validate_checks_each_spec_without_loading_a_model(fx, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nsuite: [{name: d, kind: nope}]\n")
    no_doc = tmp_path / "no-doc.yaml"
    no_doc.write_text(fx.suite.read_text() + "dlm_source: missing.dlm\n")
    few_nulls = tmp_path / "few.yaml"
    few_nulls.write_text(fx.suite.read_text().replace("runs: 16", "runs: 2"))
    assert main(["validate", str(fx.suite), str(bad), str(no_doc), str(few_nulls)]) == 2
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"ok: {fx.suite} (3 probes)", f"ok: {few_nulls} (3 probes)"]
    assert "suite[0].kind: unknown probe kind 'nope'" in err
    assert f"{tmp_path / 'missing.dlm'}: cannot read the document" in err
    assert f"warning: {few_nulls}: null_baseline: runs: 2 is too few" in err
    assert main(["validate", str(fx.suite)]) == 0
    code = (
        "import sys; from sway_engine.cli import main; "
        f"print(main(['validate', {str(fx.suite)!r}]), 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.splitlines()[-1] == "0 False", done.stderr
