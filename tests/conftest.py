"""Session fixtures: the tiny model and adapters are built once per test run (cached)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

from sway_engine.fixtures import FixturePaths, build_fixtures, default_dest, recipe_hash


@pytest.fixture(autouse=True)
def _no_user_home(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's exported SWAY_HOME or MLflow server must never receive test runs (`sway
    run` records into $SWAY_HOME): every test starts without them."""
    for name in ("SWAY_HOME", "SWAY_SUITE", "SWAY_ADAPTERS_DIR", "SWAY_DATABASE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # The persistent scoring cache is off unless a test turns it on (tests/engine/
    # test_score_cache.py): tests count the model's work, and a cache shared between tests
    # (or with the developer's ~/.cache/sway) would make their counts depend on test order.
    monkeypatch.delenv("SWAY_SCORE_CACHE_DIR", raising=False)
    monkeypatch.setenv("SWAY_SCORE_CACHE", "off")


@pytest.fixture(scope="session")
def template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow sqlite database with every migration applied (slow: built once, then copied)."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture(scope="session")
def fx() -> FixturePaths:
    return build_fixtures(log=lambda _msg: None)


def scaled_adapter(src: Path, dst: Path, factor: float) -> Path:
    """Copy an adapter with every lora_B multiplied by `factor` (update scaled by factor)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "adapter_config.json", dst / "adapter_config.json")
    tensors = load_file(str(src / "adapter_model.safetensors"))
    scaled = {k: (v * factor if "lora_B" in k else v).contiguous() for k, v in tensors.items()}
    save_file(scaled, str(dst / "adapter_model.safetensors"))
    return dst


def entry_for(kind: str, name: str = "p", **fields: object) -> object:
    """One parsed suite entry of `kind` (fields as in sway.yaml) in a minimal valid suite."""
    from sway_engine.suite import parse_spec

    data = {
        "version": 1,
        "models": {"base": {"base": "m"}, "ft": {"base": "m", "adapter": "a"}},
        "suite": [{"name": name, "kind": kind, **fields}],
    }
    return parse_spec(data)[1][0]


def show(*results: Any) -> str:
    """The measured numbers of probe results, one line each, for assertion messages: a test
    that fails on a stranger's fixture build says what it saw."""
    lines = []
    for r in results:
        z = "none" if r.z is None else f"{r.z:+.2f}"
        null = "" if r.null is None else f" null={r.null.mean:.4g}+-{r.null.std:.3g} n={r.null.n}"
        lines.append(f"{r.name}: raw={r.raw:.4g} z={z}{null} {r.verdict.value}: {r.message}")
    return "\n".join(lines)


def fixture_identity() -> str:
    """Which fixture build a test ran on: recipe, variant, threads, CPU and weight hashes."""
    info_path = default_dest() / recipe_hash()[:12] / "build_info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError):
        return f"no build_info.json at {info_path}"
    recipe = info.get("recipe", {})
    lines = [
        f"fixtures {info_path.parent}",
        f"recipe {str(info.get('recipe_hash'))[:12]} (version {info.get('recipe_version')}), "
        f"variant seed {recipe.get('variant_seed', 0)}, torch threads {info.get('torch_threads')}, "
        f"cpu {info.get('cpu', '?')}, torch {info.get('versions', {}).get('torch')}",
    ]
    lines += [f"sha256 {name}: {digest}" for name, digest in info.get("sha256", {}).items()]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """A failing test that used the fixtures reports which build it ran on."""
    outcome = yield
    report = outcome.get_result()
    if report.failed and "fx" in getattr(item, "fixturenames", ()):
        report.sections.append(("sway fixture build", fixture_identity()))


def like_a_null(r: Any, floor: float = 1e-3) -> bool:
    """A result of a null-family adapter (the `noise` fixture) as a test may require it on
    every machine's build: its p is uniform under the null, so p <= floor happens on one build
    in 1/floor. A verdict at alpha (0.01) would fail one build in a hundred per probe; the
    false-PASS rate itself is measured by the audit tests (tests/engine/test_calibration.py)."""
    return r.p is None or r.p > floor


def count_constructions(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[object]:
    """Spy on `cls.__init__` for the rest of the test: the list grows by one per instance
    built (base-model loads of an engine backend class; the product counts them per run in
    Dagster's event log and per backend in `counters()["base_loads"]`)."""
    built: list[object] = []
    original = cls.__init__

    def init(self: object, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        built.append(self)

    monkeypatch.setattr(cls, "__init__", init)
    return built
