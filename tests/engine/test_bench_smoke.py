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

    run = battery.profile(fx.suite, fx.adapters["doc-strong"], tmp_path)
    assert 0 < run["suite_s"] < run["process_s"]
    split = battery.phases(run["summary"])
    assert split["nulls"]["rows_forwarded"] > split["adapter"]["rows_forwarded"] > 0
    lines = battery.table("doc-strong", run)
    assert any(line.startswith("- null calibration / the adapter's own steps") for line in lines)
    assert any(line.startswith("| delta_kl_doc (nulls) |") for line in lines)
