"""`sway diff`, `sway trace` and `sway mine` on the fixtures: what they compute, their exit
codes, and the bad inputs they name."""

from __future__ import annotations

import json

import pytest
import yaml

from sway_engine.cli import main
from sway_engine.runner import CALIBRATION_LABEL, evaluate
from sway_engine.suite import load_spec, parse_spec


def _json_of(capsys: pytest.CaptureFixture[str]) -> dict:  # type: ignore[type-arg]
    return json.loads(capsys.readouterr().out)


def test_diff_runs_both_adapters_on_one_base_and_flags_the_regression(fx, capsys) -> None:  # type: ignore[no-untyped-def]
    weak, strong = str(fx.adapters["doc-weak"]), str(fx.adapters["doc-strong"])
    assert main(["diff", str(fx.suite), weak, strong, "--fail-on-regression", "--json"]) == 0
    forward = _json_of(capsys)
    assert forward["base_loads"] == 1  # both adapters over one base load
    rows = {r["probe"]: r for r in forward["probes"]}
    # doc-strong moves the document's prompts far beyond any random adapter; doc-weak barely
    assert rows["delta_kl_doc"]["delta"] > 0 and rows["delta_kl_doc"]["beyond_nulls"]
    assert not any(r["regression"] for r in forward["probes"])
    # each side equals a run of that adapter alone (the request cache is reset between them)
    spec, entries = load_spec(fx.suite)
    alone = {p.name: p.raw for p in evaluate(spec, entries, adapter=strong).probes}
    for name, row in rows.items():
        if alone[name] is not None:
            assert row["raw_b"] == pytest.approx(alone[name], abs=1e-9), name
    # the other way round B lost what A had: exit 1 for CI
    assert main(["diff", str(fx.suite), strong, weak, "--fail-on-regression"]) == 1
    out = capsys.readouterr().out
    assert "delta_kl_doc  pass  fail" in out and "overall:" in out


def test_diff_of_an_adapter_that_cannot_load_is_error_rows_not_a_crash(
    fx, tmp_path, capsys
) -> None:  # type: ignore[no-untyped-def]
    missing = tmp_path / "no-such-adapter"
    code = main(["diff", str(fx.suite), str(fx.adapters["doc-strong"]), str(missing), "--json"])
    rows = _json_of(capsys)["probes"]
    assert code == 0  # no --fail-on-regression: a report, not a verdict
    assert all(r["verdict_b"] == "error" for r in rows)
    assert any(r["regression"] for r in rows)  # a PASS that became ERROR


def test_trace_summarises_time_rows_and_cache_hits_per_probe_and_view(fx, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    trace, result = tmp_path / "trace.jsonl", tmp_path / "r.json"
    assert main(["run", str(fx.suite), "--trace", str(trace), "-j", str(result)]) == 0
    stats = json.loads(result.read_text())["backend_stats"]
    capsys.readouterr()
    assert main(["trace", str(trace), "--json"]) == 0
    summary = _json_of(capsys)
    probes = {p["probe"]: p for p in summary["probes"]}
    # the null calibration (every probe, shared batches) is one line, before the probes
    assert list(probes)[:3] == ["preflight", CALIBRATION_LABEL, "delta_kl_doc"]
    total = summary["total"]
    assert total["requests"] == stats["requests"] and total["cache_hits"] == stats["cache_hits"]
    assert total["rows_forwarded"] == stats["rows_forwarded"]
    assert total["forward_passes"] == stats["forward_passes"]
    views = {v["view"]: v for v in summary["views"]}
    assert views["base"]["computed"] >= max(v["computed"] for v in views.values())
    assert sum(v["computed"] for v in views.values()) >= total["computed"]
    assert any(k.startswith("null_") for k in views) and "ft" in views
    assert main(["trace", str(trace), "--views", "3"]) == 0
    text = capsys.readouterr().out
    assert CALIBRATION_LABEL in text and "more views" in text


def test_trace_names_the_line_that_is_not_an_event(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    bad = tmp_path / "t.jsonl"
    bad.write_text('{"probe": "a", "requests": 1, "computed": 1, "wall_ms": 2}\n[1, 2]\n')
    assert main(["trace", str(bad)]) == 2
    assert f"{bad}:2: not a sway trace event" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "missing.jsonl")]) == 2
    assert "cannot read the trace" in capsys.readouterr().err


def test_mine_writes_suite_entries_ranked_by_the_adapters_effect(fx, tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "mined.yaml"
    assert main(["mine", str(fx.suite), "--top", "2", "-o", str(out), "--json"]) == 0
    mined = _json_of(capsys)
    spec, entries = load_spec(fx.suite)
    named = {p for e in entries for p in getattr(e.spec, "prompts", None) or ()}
    assert {r["prompt"] for r in mined["prompts"]} == named  # every prompt, once
    largest, smallest = mined["largest"], mined["smallest"]
    assert len(largest) == len(smallest) == 2
    assert min(r["z"] for r in largest) >= max(r["z"] for r in smallest)
    # doc-strong moves its own document's prompts far beyond random adapters of its size
    assert largest[0]["z"] > 3, largest
    data = yaml.safe_load(out.read_text())
    suite = {"version": 1, "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}}}
    _, parsed = parse_spec({**suite, **data})
    kinds = [e.spec.kind for e in parsed]
    assert kinds == ["null_adapter", "delta_kl", "delta_kl", "delta_kl"]
    assert list(parsed[1].spec.prompts) == [r["prompt"] for r in largest]
    # an existing output is kept unless --force
    before = out.read_text()
    assert main(["mine", str(fx.suite), "-o", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_text() == before
    assert main(["mine", str(fx.suite), "--top", "0"]) == 2
