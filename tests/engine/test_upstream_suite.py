"""The upstream dlm-sway README's full suite, unchanged but for its paths, on the fixture `.dlm`
and doc-strong: every probe runs (none SKIPs, none ERRORs) and each reports its own kind.

Only the model and document paths are rewritten (the README names a hub model and relative
files); every probe entry is the README's, with upstream field names and no inputs of ours, so
the inputs come from the document (questions, reworded questions, sections, preferences,
prose), the built-in packs (general knowledge, tool cases, external corpus) and the adapter's
training files (loss log, training_state.pt).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sway_engine.fixtures import FixturePaths
from sway_engine.probes.registry import PROBES
from sway_engine.result import Verdict
from sway_engine.runner import evaluate
from sway_engine.suite import load_spec, spec_warnings

DATA = Path(__file__).parents[1] / "data"


def upstream_suite_on_fixture(fx: FixturePaths, out: Path) -> Path:
    data = yaml.safe_load((DATA / "upstream_full_suite.yaml").read_text())
    data["dlm_source"] = str(fx.document)
    data["models"]["base"]["base"] = str(fx.base)
    data["models"]["ft"]["base"] = str(fx.base)
    data["models"]["ft"]["adapter"] = str(fx.adapters["doc-strong"])
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


def test_only_paths_are_rewritten(fx: FixturePaths, tmp_path: Path) -> None:
    original = yaml.safe_load((DATA / "upstream_full_suite.yaml").read_text())
    rewritten = yaml.safe_load(upstream_suite_on_fixture(fx, tmp_path / "s.yaml").read_text())
    assert rewritten["suite"] == original["suite"]
    assert rewritten["defaults"] == original["defaults"]
    _, entries = load_spec(tmp_path / "s.yaml")
    # the README names every kind upstream has; these three are sway's own
    ours = {"weight_spectrum", "intruder_dimensions", "forgetting_budget"}
    assert {e.spec.kind for e in entries} == set(PROBES) - ours


@pytest.mark.slow
def test_upstream_full_suite_runs_every_probe_on_the_fixture_document(
    fx: FixturePaths, tmp_path: Path
) -> None:
    spec, entries = load_spec(upstream_suite_on_fixture(fx, tmp_path / "sway.yaml"))
    result = evaluate(spec, entries)
    by_name = {p.name: p for p in result.probes}
    assert len(by_name) == 17
    bad = {
        n: (p.verdict.value, p.message)
        for n, p in by_name.items()
        if p.verdict in (Verdict.SKIP, Verdict.ERROR)
    }
    assert not bad, bad
    # inputs that came from the document, the packs and the training files, not the spec
    assert (
        by_name["revert_check"].evidence["kept"]
        + by_name["revert_check"].evidence["dropped_trivial"]
        == 5
    )  # the document's five reworded questions
    assert by_name["paraphrase_invariance"].evidence["held_out"] is True  # `!probe` rewordings
    assert by_name["cluster_kl_topics"].evidence["num_prompts"] == 23
    assert by_name["tool_use"].evidence["cases"] == 8
    assert by_name["preference_flip"].evidence["total"] == 3
    # the README's `runs: 3` cannot calibrate (a z >= 3 rule on 3 nulls passes 6.1% of random
    # adapters): the headline probes see the training but report WARN uncalibrated, never PASS
    for name in ("section_attribution", "paraphrase_invariance"):
        assert by_name[name].verdict is Verdict.WARN, (name, by_name[name].message)
        assert "only 3 null draw(s)" in by_name[name].evidence["uncalibrated"]
    assert by_name["training_drift"].verdict is Verdict.PASS  # reads the loss log, no null
    assert not any(p.verdict is Verdict.PASS for p in result.probes if p.evidence.get("q"))
    (warning,) = spec_warnings(entries, spec.defaults)
    assert "runs: 3 is too few" in warning and "6.1%" in warning
