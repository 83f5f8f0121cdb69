"""The Dagster and MLflow UIs and sway's HTML report, rendered by headless Chromium after one real
evaluation.

Each page is loaded once with `--dump-dom` (the DOM after React has rendered) and
`--screenshot` (kept in test-artifacts/ for a human to look at). Needs Debian's `chromium`:
`make browser` installs it, and `make test` runs that first.
"""

from __future__ import annotations

import html.parser
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow import MlflowClient

from sway_engine.cli import main
from sway_engine.store import ResultStore
from tests.dagster.conftest import BIN, REPO, DagsterDev, Evaluation, Server

pytestmark = [
    pytest.mark.slow,
    pytest.mark.filterwarnings("ignore:Using variable_values:DeprecationWarning"),
]

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
    "--virtual-time-budget=20000",
]


class _Text(html.parser.HTMLParser):
    """Collects the text a reader would see: everything outside <script>, <style>, <title>."""

    def __init__(self) -> None:
        super().__init__()
        self.chunks: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: object) -> None:
        self._skip += tag in ("script", "style", "title")

    def handle_endtag(self, tag: str) -> None:
        self._skip -= tag in ("script", "style", "title") and self._skip > 0

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.chunks.append(data)


def visible_text(dom: str) -> str:
    """The page's text with every run of whitespace (and every tag boundary) as one space."""
    parser = _Text()
    parser.feed(dom)
    return " ".join(" ".join(parser.chunks).split())


@dataclass(frozen=True)
class Page:
    url: str
    dom: str
    text: str
    screenshot: Path


@dataclass
class Browser:
    """Headless Chromium, one process per page load."""

    binary: str
    profile: Path

    def open(
        self,
        url: str,
        screenshot: str,
        *,
        expect: Sequence[str] = (),
        size: tuple[int, int] = (1400, 900),
        attempts: int = 3,
    ) -> Page:
        """Render `url`; load again (up to `attempts`) while any of `expect` is not in the text."""
        png = ARTIFACTS / screenshot
        page = None
        for _ in range(attempts):
            done = subprocess.run(
                [
                    self.binary,
                    *CHROMIUM_FLAGS,
                    f"--user-data-dir={self.profile}",
                    f"--window-size={size[0]},{size[1]}",
                    f"--screenshot={png}",
                    "--dump-dom",
                    url,
                ],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, f"chromium failed on {url}:\n{done.stderr[-3000:]}"
            page = Page(url, done.stdout, visible_text(done.stdout), png)
            if all(s in page.text for s in expect):
                break
        assert page is not None
        return page


def js_number(value: float) -> str:
    """A float as JavaScript's String() prints it, which is how the MLflow UI shows metrics."""
    if value.is_integer():
        return str(int(value))
    text = repr(value)
    assert "e" not in text, f"{text}: exponent forms differ between Python and JavaScript"
    return text


@pytest.fixture(scope="session")  # session: checked before the session's servers start
def browser(tmp_path_factory: pytest.TempPathFactory) -> Browser:
    binary = shutil.which("chromium")
    if binary is None:
        pytest.fail(
            "chromium is not installed: run `make browser` (Debian: apt-get install chromium)"
        )
    ARTIFACTS.mkdir(exist_ok=True)
    return Browser(binary, tmp_path_factory.mktemp("chromium-profile"))


@pytest.fixture(scope="module")
def dagster_ui(dagster_dev: DagsterDev, doc_strong_run: Evaluation) -> DagsterDev:
    """The Dagster UI after the evaluation, with the first-visit newsletter modal dismissed."""
    assert dagster_dev.graphql("mutation { setNuxSeen }") == {"setNuxSeen": True}
    return dagster_dev


@pytest.fixture(scope="module")
def mlflow_ui(dagster_dev: DagsterDev) -> Iterator[Server]:
    """`mlflow ui` on the evaluation's tracking db, at the port Dagster's MLflow links name."""
    settings = dagster_dev.settings
    port = dagster_dev.mlflow_port
    cmd = [
        str(BIN / "mlflow"),
        "ui",
        "--backend-store-uri",
        settings.mlflow_uri,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no background job runner needed
    with tempfile.TemporaryDirectory() as cwd:  # it may create ./mlartifacts in its cwd
        server = Server.start(
            "mlflow ui",
            cmd,
            url=f"http://127.0.0.1:{port}",
            cwd=Path(cwd),
            env=env,
            log=settings.home / "mlflow-ui.log",
        )
        try:
            server.wait_http("/health", timeout=90)
            yield server
        finally:
            server.stop()


@pytest.fixture(scope="module")
def mlflow_run_url(dagster_dev: DagsterDev, doc_strong_run: Evaluation) -> str:
    """The MLflow UI address of the evaluation's MLflow run."""
    client = MlflowClient(dagster_dev.settings.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    (run,) = client.search_runs(
        [exp.experiment_id], filter_string=f"tags.`dagster.run_id` = '{doc_strong_run.run_id}'"
    )
    return f"http://127.0.0.1:{dagster_dev.mlflow_port}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"


def test_the_asset_graph_shows_the_probe_group_between_calibration_and_score(
    browser: Browser, dagster_ui: DagsterDev
) -> None:
    # One node per probe of the suite (null_baseline is part of null_calibration, not an asset),
    # with the neighbouring groups' assets drawn as links at the edges.
    names = ["null_calibration", "delta_kl_doc", "ablation", "sway_score"]
    page = browser.open(
        f"{dagster_ui.server.url}/locations/sway/asset-groups/probes",
        "dagster-asset-group-probes.png",
        expect=[*names, "100% filled"],
    )
    for name in names:
        assert name in page.text, name
    assert page.text.count("100% filled") == 2  # both probes materialized their one partition


def test_the_catalog_lists_every_asset_of_the_pipeline(
    browser: Browser, dagster_ui: DagsterDev
) -> None:
    page = browser.open(
        f"{dagster_ui.server.url}/assets",
        "dagster-assets.png",
        expect=["sway_score"],
    )
    for key in ("adapter_manifest", "null_calibration", "sway/delta_kl_doc", "sway_score"):
        assert f'href="/assets/{key}"' in page.dom, key


def test_the_partition_page_shows_the_passing_probe_and_links_to_its_mlflow_run(
    browser: Browser, dagster_ui: DagsterDev, doc_strong_run: Evaluation, mlflow_run_url: str
) -> None:
    page = browser.open(
        f"{dagster_ui.server.url}/assets/sway/delta_kl_doc?view=partitions"
        f"&partition={doc_strong_run.key}",
        "dagster-delta_kl_doc-partition.png",
        expect=["verdict pass"],
        size=(1400, 1400),
    )
    assert re.search(r"Materialized \([1-9]\d*\)", page.text), page.text[:300]
    assert f"Run {doc_strong_run.run_id[:8]}" in page.text
    assert "verdict pass" in page.text
    assert mlflow_run_url in page.text
    assert f'href="{mlflow_run_url}"' in page.dom.replace("&amp;", "&")


def test_the_mlflow_run_page_shows_the_probe_metrics_and_verdicts(
    browser: Browser,
    mlflow_ui: Server,
    mlflow_run_url: str,
    dagster_dev: DagsterDev,
    doc_strong_run: Evaluation,
) -> None:
    store = ResultStore(dagster_dev.settings.database)
    dkl = next(r for r in store.probe_results(doc_strong_run.key) if r["probe"] == "delta_kl_doc")
    z = f"delta_kl_doc/z {js_number(dkl['z'])}"
    page = browser.open(mlflow_run_url, "mlflow-run.png", expect=[z], size=(1400, 1800))
    assert z in page.text
    assert doc_strong_run.key in page.text  # the run name
    assert f"dagster.run_id : {doc_strong_run.run_id}" in page.text
    assert "sway.verdict.delta_kl_doc : pass" in page.text
    assert re.search(r"Metrics \(\d+\)", page.text)


def test_mlflow_compares_two_adapters_side_by_side(
    browser: Browser,
    mlflow_ui: Server,
    dagster_dev: DagsterDev,
    doc_strong_run: Evaluation,
    fx,  # type: ignore[no-untyped-def]
) -> None:
    """doc-weak recorded by the CLI into the same home lands in the same experiment as
    Dagster's doc-strong run, and MLflow's compare view puts their probe metrics side by side."""
    settings = dagster_dev.settings
    argv = ["run", str(settings.suite), "--adapter", str(fx.adapters["doc-weak"])]
    assert main([*argv, "--home", str(settings.home)]) == 0
    client = MlflowClient(settings.mlflow_uri)
    exp = client.get_experiment_by_name("sway-sway")
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    weak = next(r for r in runs if r.data.tags.get("sway.origin") == "cli")
    strong = next(r for r in runs if r.data.tags.get("dagster.run_id") == doc_strong_run.run_id)
    ids = json.dumps([strong.info.run_id, weak.info.run_id]).replace(" ", "")
    url = (
        f"http://127.0.0.1:{dagster_dev.mlflow_port}/#/compare-runs?runs={ids}"
        f"&experiments={json.dumps([exp.experiment_id]).replace(' ', '')}"
    )
    names = [strong.info.run_name, weak.info.run_name]
    page = browser.open(
        url, "mlflow-compare.png", expect=[*names, "delta_kl_doc/z"], size=(1600, 1800)
    )
    for name in names:
        assert name in page.text, name
    assert "delta_kl_doc/z" in page.text and "sway/score" in page.text


# After `load`, the page copy says what the reader sees: the banner's text and where it sits,
# and how many images the browser decoded (naturalWidth > 0: a broken data URL has none).
MEASURE = """<script>addEventListener("load", () => {
  const imgs = [...document.images], banner = document.getElementById("verdict");
  document.body.dataset.images = imgs.length;
  document.body.dataset.decoded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.banner = banner.innerText.replace(/\\s+/g, " ").trim();
  document.body.dataset.bannerTop = Math.round(banner.getBoundingClientRect().top);
});</script>"""


def test_the_html_report_renders_its_verdict_and_every_plot(
    browser: Browser, fx, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    page, out = tmp_path / "report.html", tmp_path / "r.json"
    code = main(["gate", str(fx.suite), "--html", str(page), "--json", str(out)])
    result = json.loads(out.read_text())
    plots = sum(bool((p["null"] or {}).get("samples")) for p in result["probes"])
    plots += sum(p["kind"] == "adapter_ablation" for p in result["probes"])
    assert plots == 3  # delta_kl_doc and ablation null histograms, the ablation curve
    measured = tmp_path / "measured.html"
    measured.write_text(page.read_text().replace("</body>", f"{MEASURE}</body>"))

    shown = browser.open(
        measured.as_uri(), "html-report.png", expect=["Calibration"], size=(1400, 2600)
    )
    body = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', shown.dom.split("<body", 1)[1][:2000]))
    verdict = "Gate passed" if code == 0 else "Gate FAILED"
    assert body["banner"].startswith(verdict), body
    assert f"{result['score']['overall']:.2f}" in body["banner"]
    assert 0 <= int(body["banner-top"]) < 300  # in the first screenful
    assert int(body["images"]) == int(body["decoded"]) == plots
    for name in ("null_baseline", "delta_kl_doc", "ablation", "The nulls' whole curves"):
        assert name in shown.text, name
    assert shown.screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
