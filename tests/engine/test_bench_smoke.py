"""The benchmark harness's own pieces at tiny settings (the peers' virtualenv is not used here).

`make bench` runs the real thing; these check that its specs load, its measurements are
sane and its correctness checks hold on the fixture.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bench import run as bench
from bench import work
from sway_engine.suite import load_spec


@pytest.fixture(scope="module")
def specs(fx, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:  # type: ignore[no-untyped-def]
    out = tmp_path_factory.mktemp("bench-specs")
    return bench.suite_specs(fx.suite, fx.base, fx.adapters["doc-strong"], out)


@pytest.fixture(scope="module")
def exact_run(specs: dict[str, Path]) -> dict[str, Any]:
    return work.sway({"tool": "sway", "spec": str(specs["exact"]), "plain_check": True})


def test_suite_a_specs_hold_upstream_settings(specs: dict[str, Path]) -> None:
    parity, entries = load_spec(specs["parity"])
    assert parity.defaults.divergence_mode == "topk_tail" and parity.defaults.top_k == 256
    assert parity.defaults.null.mode == "fixed" and parity.defaults.null.seeds == 3
    assert [e.spec.kind for e in entries] == ["null_adapter", "delta_kl", "adapter_ablation"]
    default, _ = load_spec(specs["default"])
    assert default.defaults.null.mode == "matched" and default.defaults.divergence_mode == "exact"
    upstream = bench._load_yaml(specs["upstream"])
    assert upstream["suite"][0] == {
        "name": "null_baseline",
        "kind": "null_adapter",
        "runs": 3,
        "cache": False,
    }
    assert upstream["suite"][1]["prompts"] == list(entries[1].spec.prompts)  # type: ignore[attr-defined]


def test_exact_mode_equals_a_plain_full_vocabulary_computation(exact_run: dict[str, Any]) -> None:
    check = bench.exact_check(exact_run)
    assert check["ok"], check
    assert len(exact_run["plain"]["delta_kl"]) == len(exact_run["probes"]["delta_kl_doc"]["values"])


def test_work_counts_forwarded_tokens_against_unique_tokens(exact_run: dict[str, Any]) -> None:
    w = bench.work_stats(exact_run)
    assert w["unique_tokens"] > 0 and w["forward_passes"] >= 1
    assert w["forwarded_over_unique"] <= 1.05  # no row is computed twice
    assert w["padded_over_unique"] <= 1.5  # padding traded against passes (tiny model)
    peak = bench.matmul_peak(128, 0.05)
    f = bench.flops(exact_run, peak)
    assert f["achieved_flops"] > 0 and f["tokens_per_s"] > 0


def test_parity_reports_the_largest_difference() -> None:
    ours = {
        "probes": {
            "delta_kl_doc": {"raw": 0.2, "values": [0.1, 0.3]},
            "ablation": {"curve": [0.0, 0.2]},
        }
    }
    up = {
        "probes": {
            "delta_kl_doc": {"raw": 0.2, "per_prompt": [0.1, 0.30002]},
            "ablation": {"curve": [0.0, 0.2000001]},
        }
    }
    p = bench.parity(ours, up)
    assert p["delta_kl_max_abs_diff"] == pytest.approx(2e-5) and p["ok"]
    up["probes"]["ablation"]["curve"] = [0.0, 0.21]
    assert not bench.parity(ours, up)["ok"]


def test_alternate_interleaves_jobs_and_records_failures() -> None:
    order: list[str] = []

    def job(name: str) -> Any:
        def call() -> dict[str, Any]:
            order.append(name)
            if name == "b":
                raise RuntimeError("b broke")
            return {"suite_s": 1.0}

        return call

    runs = bench.alternate({"a": job("a"), "b": job("b")}, 2, lambda _m: None)
    assert order == ["a", "b", "a", "b"]
    assert bench.median_of(runs["a"], "suite_s") == 1.0
    assert runs["b"][0]["error"] == "b broke"


def test_report_renders_a_table_from_measured_values(exact_run: dict[str, Any]) -> None:
    peak = 1e11
    entry = {
        "suite_s": exact_run["suite_s"],
        "load_s": exact_run["load_s"],
        "first_result_s": exact_run["first_result_s"],
        "peak_rss_mb": exact_run["peak_rss_mb"],
    }
    report = {
        "date": "now",
        "machine": bench.machine(),
        "threads": 1,
        "repeats": 1,
        "matmul_peak_flops": peak,
        "suite_a": {"fixture": {"sway_parity": entry, "exact": bench.exact_check(exact_run)}},
        "work": {"fixture": bench.work_stats(exact_run)},
        "flops": {"fixture": bench.flops(exact_run, peak)},
        "flops_note": "note",
        "seeds": {"1": {"suite_s": 1.0, "ratio_to_1_seed": 1.0}},
        "adapters": {
            "1": {
                "load_s": 1.0,
                "suite_s": 1.0,
                "ratio_total_to_1": 1.0,
                "ratio_suite_to_1": 1.0,
                "process_s": 5.0,
                "ratio_process_to_1": 1.0,
            }
        },
        "cuda": {"available": False, "note": "no CUDA device on this machine: not measured"},
    }
    text = bench.markdown(report)
    assert f"{exact_run['suite_s']:.2f}" in text
    assert "dlm-sway 0.1.0 (3 fixed nulls, top-k) | not run" in text
    assert "no CUDA device" in text


def test_battery_profile_splits_phases_and_counts_generation_waste(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """`make bench-battery`'s profile on the small fixture suite: one whole `sway run` with a
    trace; the null phase is told from the adapter's, and generation row-steps are at least
    the tokens kept (a kept token was computed)."""
    from bench import battery
    from sway_engine.runner import CALIBRATION_LABEL

    run = battery.profile(fx.suite, fx.adapters["doc-strong"], tmp_path)
    assert 0 < run["suite_s"] < run["process_s"]
    split = battery.phases(run["summary"])
    # the calibration computes the adapter's rows too: after it, only preflight's 2 rows
    assert split["nulls"]["rows_forwarded"] > 10 * split["adapter"]["rows_forwarded"] > 0
    lines = battery.table("doc-strong", run)
    assert any(line.startswith("- null calibration (nulls and adapter") for line in lines)
    assert any(line.startswith(f"| {CALIBRATION_LABEL} |") for line in lines)


# dlm-sway 0.1.0's kinds and a few of their fields, as `full_suite.upstream_accepts` reports
UPSTREAM_ACCEPTS = {
    "null_adapter": {"runs", "init_scale", "seed_base", "rank_multipliers", "cache"},
    "delta_kl": {"prompts", "assert_mean_gte", "assert_z_gte"},
    "adapter_revert": {"cases", "assert_revert_rate_lt"},
    "cluster_kl": {"prompts", "min_prompts", "num_clusters"},
    "adapter_ablation": {"prompts", "lambdas", "assert_linearity_gte"},
}


def test_full_suite_specs_keep_the_readme_suite_and_give_dlm_sway_what_it_takes(
    fx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    from bench import full_suite

    inputs = full_suite.document_inputs(bench.full_suite_spec(fx, tmp_path))
    specs = full_suite.full_suite_specs(
        fx.suite,
        fx.base,
        fx.adapters["doc-strong"],
        fx.document,
        tmp_path,
        UPSTREAM_ACCEPTS,
        inputs,
    )
    readme = bench._load_yaml(full_suite.README_SUITE)
    file = bench._load_yaml(specs["file"])
    assert file["dlm_source"] == str(fx.document) and file["defaults"] == readme["defaults"]
    assert [e["name"] for e in file["suite"]] == [e["name"] for e in readme["suite"]]
    fixture_prompts = {e["kind"]: e.get("prompts") for e in bench._load_yaml(fx.suite)["suite"]}
    assert file["suite"][1]["prompts"] == fixture_prompts["delta_kl"]
    assert file["suite"][2] == readme["suite"][2]  # entries without prompts are the README's

    parity, entries = load_spec(specs["parity"])
    assert parity.defaults.divergence_mode == "topk_tail" and parity.defaults.null.mode == "fixed"
    assert len(entries) == 17
    default, _ = load_spec(specs["default"])
    assert default.defaults.null.seeds == 8 and default.defaults.divergence_mode == "exact"
    assert bench._load_yaml(specs["default"])["suite"][0] == {
        "name": "null_baseline",
        "kind": "null_adapter",
    }

    up = {e["name"]: e for e in bench._load_yaml(specs["upstream"])["suite"]}
    assert list(up) == [
        "null_baseline",
        "delta_kl_doc",
        "revert_check",
        "cluster_kl_topics",
        "ablation",
    ]
    assert "k" not in up["cluster_kl_topics"]  # README's `k` is not a 0.1.0 field: its default
    assert up["cluster_kl_topics"]["prompts"] == inputs["cluster_kl"]["prompts"]
    assert up["revert_check"]["cases"] == inputs["adapter_revert"]["cases"]
    assert up["delta_kl_doc"]["prompts"] == fixture_prompts["delta_kl"]  # ours, not autogen's


def test_dlm_sway_cache_is_cleared_only_when_it_holds_only_null_stats(tmp_path: Path) -> None:
    from bench import full_suite

    folder = tmp_path / ".dlm-sway"
    (folder / "null-stats").mkdir(parents=True)
    (folder / "null-stats" / ("0" * 32 + ".json")).write_text("{}")
    full_suite.clear_dlm_sway_cache(folder)
    assert not folder.exists()
    (folder / "null-stats").mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError, match="not deleting"):
        full_suite.clear_dlm_sway_cache(folder)
    assert (folder / "notes.txt").exists()
    assert full_suite.dlm_sway_cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/dlm-sway")


def test_full_suite_table_shows_both_times_and_verdicts_per_tool() -> None:
    from bench import full_suite

    def run(process: float, suite: float, verdicts: list[str]) -> dict[str, Any]:
        names = {f"p{i}": v for i, v in enumerate(verdicts)}
        counts = full_suite.verdict_counts(verdicts)
        done = counts["PASS"] + counts["FAIL"] + counts["WARN"]
        messages = {n: "no cases" for n, v in names.items() if v in ("SKIP", "ERROR")}
        return {
            "process_s": process,
            "suite_s": suite,
            "probes": len(verdicts),
            "completed": done,
            "counts": counts,
            "verdicts": names,
            "messages": messages,
        }

    runs = {
        "dlm_sway": [run(40.0, 30.0, ["PASS", "SKIP"]), run(44.0, 34.0, ["PASS", "SKIP"])],
        "sway_file": [run(20.0, 10.0, ["PASS", "WARN"]), {"error": "boom"}],
    }
    summary = full_suite.summarize(runs)
    assert summary["sway_file"]["process_s_x"] == pytest.approx(2.1)
    assert summary["sway_file"]["suite_s_x"] == pytest.approx(3.2)
    assert summary["sway_file"]["errors"] == ["boom"]
    text = "\n".join(full_suite.markdown_rows({"fixture": summary}))
    assert "| fixture | sway, README suite file as is | 2 | 2 | 1/0/1/0/0 | 20.0 | 2.10x" in text
    assert "- fixture, dlm_sway: p1 SKIP: no cases" in text


def test_dlm_sway_runs_with_a_cache_of_the_benchs_own_and_leaves_the_users_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench import full_suite

    home = tmp_path / "home"
    user_cache = home / ".dlm-sway" / "null-stats"
    user_cache.mkdir(parents=True)
    (user_cache / ("a" * 32 + ".json")).write_text("{}")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    seen: dict[str, str] = {}

    def run(cmd: list[str], out: Path, threads: int, env: dict[str, str], timeout: float) -> dict:
        seen.update(env)
        return {}

    monkeypatch.setattr(full_suite, "whole_run", run)
    work = tmp_path / "work"
    ours = work / "dlm-sway-cache" / "dlm-sway" / "null-stats"
    ours.mkdir(parents=True)
    (ours / ("b" * 32 + ".json")).write_text("{}")
    full_suite.dlm_sway_job(tmp_path / "venv" / "bin" / "python", tmp_path / "s.yaml", work, 1)
    assert (user_cache / ("a" * 32 + ".json")).is_file()  # the user's cache: untouched
    assert not ours.exists()  # the bench's own: emptied before the run
    assert seen["XDG_CACHE_HOME"] == str(work / "dlm-sway-cache")
