"""The HTML report (`sway run/gate --html`): one self-contained page that leads with the gate's
verdict, plots each calibrated probe's null distribution and the ablation curve, and escapes
user text (prompts)."""

from __future__ import annotations

import base64
import contextlib
import html.parser
import io
import json
import re
from html import escape
from pathlib import Path

import pytest
import yaml

from sway_engine.backends.hf import HFBackend
from sway_engine.cli import main
from sway_engine.report.html import page_path
from tests.conftest import count_constructions

SCRIPT_PROMPT = 'Q: <script>alert("sway")</script> Where is Quellmoor?\nA:'


class _Resources(html.parser.HTMLParser):
    """Every src and href of the page, and the alt text of each <img>."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[str] = []
        self.images: list[tuple[str, str]] = []  # (alt, src)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.links += [v for k, v in attrs if k in ("src", "href") and v is not None]
        if tag == "img":
            self.images.append((a.get("alt") or "", a.get("src") or ""))


def suite_with_script_prompt(fx, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    """The fixture suite with a prompt holding a <script> tag added to delta_kl_doc."""
    data = yaml.safe_load(Path(fx.suite).read_text())
    (dkl,) = [e for e in data["suite"] if e["name"] == "delta_kl_doc"]
    dkl["prompts"] = [*dkl["prompts"], SCRIPT_PROMPT]
    spec = tmp_path / "sway.yaml"
    spec.write_text(yaml.safe_dump(data))
    return spec


@pytest.fixture(scope="module")
def gated(fx, tmp_path_factory) -> tuple[int, str, dict, str]:  # type: ignore[no-untyped-def]
    """`sway gate --html --json` once: (exit code, stdout, JSON result, page)."""
    tmp = tmp_path_factory.mktemp("html")
    spec = suite_with_script_prompt(fx, tmp)
    page, out = tmp / "report.html", tmp / "r.json"
    stdout = io.StringIO()  # a module fixture has no capsys
    with contextlib.redirect_stdout(stdout):
        code = main(["gate", str(spec), "--html", str(page), "--json", str(out)])
    return code, stdout.getvalue(), json.loads(out.read_text()), page.read_text()


def test_the_page_leads_with_the_gate_decision_and_its_reason(gated) -> None:  # type: ignore[no-untyped-def]
    code, stdout, result, page = gated
    line = next(ln for ln in stdout.splitlines() if ln.startswith("gate "))
    decision, reason = line.split(" — ", 1)
    assert code == (0 if decision == "gate passed" else 1)
    banner = re.search(r'<section class="banner (pass|fail)" id="verdict">(.*?)</section>', page)
    assert banner is not None
    assert banner.group(1) == ("pass" if code == 0 else "fail")
    text = banner.group(2)
    assert ("Gate passed" if code == 0 else "Gate FAILED") in text
    assert escape(reason) in text  # '>=' and all: escaped like every text
    assert f"{result['score']['overall']:.2f}" in text and result["score"]["band"] in text


def test_each_calibrated_probe_has_its_null_plot_and_the_ablation_its_curve(gated) -> None:  # type: ignore[no-untyped-def]
    _, _, result, page = gated
    parser = _Resources()
    parser.feed(page)
    calibrated = [p["name"] for p in result["probes"] if (p["null"] or {}).get("samples")]
    assert sorted(calibrated) == ["ablation", "delta_kl_doc"]
    expected = sorted([f"{n} null distribution" for n in calibrated] + ["ablation ablation curve"])
    assert sorted(alt for alt, _ in parser.images) == expected
    for _, src in parser.images:
        head, data = src.split(",", 1)
        assert head == "data:image/png;base64"
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "The nulls' whole curves are not kept" in page  # the ablation caption says so
    # q (Benjamini-Hochberg) beside p, and the calibration summary
    dkl = next(p for p in result["probes"] if p["name"] == "delta_kl_doc")
    assert f"{dkl['evidence']['q']:.2g}" in page
    assert "Null mode <b>matched</b>: <b>16</b> random adapters" in page
    assert "Benjamini&ndash;Hochberg over the suite's <b>2</b> calibrated effect" in page


def test_prompts_are_escaped_and_rows_are_capped(gated) -> None:  # type: ignore[no-untyped-def]
    _, _, result, page = gated
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&quot;sway&quot;)&lt;/script&gt;" in page
    nulls = next(p for p in result["probes"] if p["kind"] == "null_adapter")
    assert len(nulls["items"]) == 32  # 2 probes x 16 seeds: 20 shown
    assert "12 more rows not shown (of 32)" in page


def test_the_page_fetches_nothing(gated) -> None:  # type: ignore[no-untyped-def]
    _, _, _, page = gated
    parser = _Resources()
    parser.feed(page)
    assert parser.links, "the page has links (anchors, images)"
    for link in parser.links:
        assert link.startswith(("#", "data:image/png;base64,")), link
    assert not re.search(r"(src|href)\s*=\s*[\"']?\s*(https?:)?//", page, re.I)
    assert "url(" not in page and "@import" not in page


def test_html_into_a_missing_folder_exits_2_before_a_model_loads(
    fx, tmp_path: Path, capsys, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    loads = count_constructions(monkeypatch, HFBackend)
    target = tmp_path / "missing" / "report.html"
    assert main(["run", str(fx.suite), "--html", str(target)]) == 2
    assert f"{target.parent} does not exist" in capsys.readouterr().err
    assert loads == [] and not target.parent.exists()


def test_every_run_gets_its_own_page_path(tmp_path: Path) -> None:
    key = "doc-strong-1835ed0a"
    runs = [f"cli:4f1c2a9b7e01:{key}", f"cli_4f1c2a9b7e01_{key}", f"9b1e-77aa:{key}"]
    paths = [page_path(tmp_path, key, run) for run in runs]
    assert len(set(paths)) == 3
    assert paths[1] == tmp_path / key / f"cli_4f1c2a9b7e01_{key}.html"  # safe names unchanged
    assert all(p.parent == tmp_path / key and ":" not in p.name for p in paths)
    assert page_path(tmp_path, "../up", "x").parent.parent == tmp_path


def test_a_stored_gate_keeps_its_decision_and_names_the_blocking_probes() -> None:
    from sway_engine.report.html import recorded_gate
    from sway_engine.result import ProbeResult, SuiteResult, SwayScore, Verdict

    def probe(name: str, verdict: Verdict, **evidence: str) -> ProbeResult:
        return ProbeResult(name, "delta_kl", "adherence", verdict, "", evidence=evidence)

    def suite(*probes: ProbeResult) -> SuiteResult:
        score = SwayScore(0.4, "weak evidence", {}, {}, ())
        return SuiteResult("", "", "m", "a", "", "", 0.0, "", probes, score)

    mixed = suite(
        probe("dkl", Verdict.FAIL),
        probe("drift", Verdict.WARN, uncalibrated="no null calibration"),
        probe("ok", Verdict.PASS),
    )
    assert recorded_gate(mixed, False).reason == "failed: dkl; uncalibrated: drift"
    # allow_uncalibrated was set when it passed: the recorded decision stands
    assert recorded_gate(mixed, True).passed
    clean = suite(probe("ok", Verdict.PASS))
    assert recorded_gate(clean, False).reason == "overall 0.40 below the suite's threshold"
    assert recorded_gate(clean, True).reason == "overall 0.40, no FAIL or ERROR"
    assert recorded_gate(mixed, None) == recorded_gate(mixed, False)  # no decision stored


def test_a_plot_is_drawn_once_per_process_however_many_pages_show_it(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A Dagster run shows each probe's plot in five places (the probe's metadata, MLflow's
    preview and copy, two HTML pages); matplotlib drew it each time, most of an unchanged
    adapter's run. The same plot is now drawn once; another result's plot is its own."""
    from sway_engine.report import plots
    from sway_engine.result import NullStats, ProbeResult, Verdict

    drawn: list[str] = []
    real = plots.null_histogram

    def counting(name, *args, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(plots, "null_histogram", counting)
    plots._drawn.cache_clear()
    null = NullStats(0.1, 0.02, 4, (0.08, 0.1, 0.11, 0.12), False)
    one = ProbeResult("dkl", "delta_kl", "adherence", Verdict.PASS, "", raw=0.9, null=null)
    pngs = {plots.plot_of(one) for _ in range(5)}
    assert len(pngs) == 1 and next(iter(pngs)).startswith(b"\x89PNG") and drawn == ["dkl"]
    other = ProbeResult("dkl", "delta_kl", "adherence", Verdict.PASS, "", raw=0.5, null=null)
    assert plots.plot_of(other) not in pngs and drawn == ["dkl", "dkl"]


def test_a_plot_kept_in_the_score_cache_is_not_drawn_again_by_a_new_process(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Inside `kept_in(store)` (Dagster's probe and score steps), a plot is stored in the
    persistent scoring cache: a later process (here: the in-process memory cleared) reads it
    back, byte for byte, without drawing; another result's plot is drawn; outside, nothing is
    read or kept."""
    from sway_engine.report import plots
    from sway_engine.result import NullStats, ProbeResult, Verdict
    from sway_engine.score_cache import ScoreCache

    drawn: list[float] = []
    real = plots.null_histogram

    def counting(name, samples, raw, **kwargs):  # type: ignore[no-untyped-def]
        drawn.append(raw)
        return real(name, samples, raw, **kwargs)

    monkeypatch.setattr(plots, "null_histogram", counting)
    store = ScoreCache(tmp_path / "scores.sqlite")
    null = NullStats(0.1, 0.02, 4, (0.08, 0.1, 0.11, 0.12), False)
    one = ProbeResult("dkl", "delta_kl", "adherence", Verdict.PASS, "", raw=0.9, null=null)
    other = ProbeResult("dkl", "delta_kl", "adherence", Verdict.PASS, "", raw=0.5, null=null)
    plots._drawn.cache_clear()
    with plots.kept_in(store):
        first = plots.plot_of(one)
    plots._drawn.cache_clear()
    with plots.kept_in(store):
        again = plots.plot_of(one)
        assert plots.plot_of(other) != first
    assert again == first and drawn == [0.9, 0.5]
    plots._drawn.cache_clear()
    assert plots.plot_of(one) == first and drawn == [0.9, 0.5, 0.9]  # outside: drawn
    store.close()
    plots._drawn.cache_clear()
