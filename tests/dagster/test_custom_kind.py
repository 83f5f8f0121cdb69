"""`kind: custom` and `fallback:` end to end: through the CLI and a Dagster materialization.

`TeamBackend` is what a team's own plugin looks like: a class named by `entry_point`, built
with (base_spec, adapter_path), answering the batched protocol (here on transformers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_dagster.resources import CustomModelResource, PriorityModelResource
from sway_engine.backends.hf import HFBackend
from sway_engine.cli import main
from sway_engine.errors import SpecError
from sway_engine.home import Settings
from sway_engine.requests import Request, Result
from sway_engine.store import ResultStore
from tests.dagster.conftest import add_adapter

ENTRY = f"{__name__}:TeamBackend"


class TeamBackend:
    kind = "team"

    def __init__(self, base_spec: Any, adapter_path: str | None) -> None:
        self.engine = HFBackend(base_spec.base, adapter_path)
        self.capabilities = self.engine.capabilities

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return self.engine.execute(requests)

    def close(self) -> None:
        self.engine.close()


def custom_suite(suite: Path, **model: Any) -> str:
    data = yaml.safe_load(suite.read_text())
    for side in ("base", "ft"):
        data["models"][side].update({"kind": "custom", "entry_point": ENTRY, **model})
    return yaml.safe_dump(data, sort_keys=False)


def test_custom_kind_through_the_cli(fx, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    spec = tmp_path / "sway.yaml"
    spec.write_text(custom_suite(fx.suite))
    out = tmp_path / "r.json"
    assert main(["run", str(spec), "--json", str(out)]) == 0
    import json

    result = json.loads(out.read_text())
    assert result["backend_kind"] == "custom"
    verdicts = {p["name"]: p["verdict"] for p in result["probes"]}
    assert verdicts["delta_kl_doc"] == "pass" and verdicts["null_baseline"] == "pass"


def materialize(home, instance, fx) -> tuple[Any, str]:  # type: ignore[no-untyped-def]
    defs = build_definitions(replace(home, allow_spec_code=True))
    add_adapter(home, fx.adapters["doc-strong"])
    (cand,) = AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    assert cand.key is not None
    instance.add_dynamic_partitions("adapters", [cand.key])
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=cand.key, instance=instance
    )
    assert result.success
    return defs, cand.key


def test_custom_kind_materializes_in_dagster(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    home.suite.write_text(custom_suite(fx.suite))
    defs, key = materialize(home, instance, fx)
    assert isinstance(defs.resources["backend"], CustomModelResource)
    store = ResultStore(home.database)
    rows = {r["probe"]: r for r in store.probe_results(key)}
    assert rows["delta_kl_doc"]["verdict"] == "pass"
    assert [r["backend_kind"] for r in store.runs()] == ["custom"]


def test_fallback_materializes_on_the_kind_that_loaded(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    """A custom entry point that cannot be imported, then hf: hf serves and is recorded."""
    data = yaml.safe_load(fx.suite.read_text())
    for side in ("base", "ft"):
        data["models"][side].update(
            {"kind": "custom", "entry_point": "no_such_pkg.mod:Backend", "fallback": ["hf"]}
        )
    home.suite.write_text(yaml.safe_dump(data, sort_keys=False))
    defs, key = materialize(home, instance, fx)
    assert isinstance(defs.resources["backend"], PriorityModelResource)
    store = ResultStore(home.database)
    assert [r["backend_kind"] for r in store.runs()] == ["hf"]
    rows = {r["probe"]: r for r in store.probe_results(key)}
    assert rows["delta_kl_doc"]["verdict"] == "pass"


@pytest.mark.parametrize(
    ("model", "named"),
    [
        ({}, f"imports {ENTRY} (kind custom)"),
        ({"kind": "hf", "entry_point": None, "trust_remote_code": True}, "trust_remote_code"),
    ],
)
def test_the_code_location_refuses_a_spec_that_runs_code_unless_allowed(
    home: Settings, fx, model: dict[str, Any], named: str
) -> None:  # type: ignore[no-untyped-def]
    """Issue 14 item 4: a spec is code. Whoever can write the suite file could make the Dagster
    deployment import any module; the code location refuses unless its environment allows."""
    home.suite.write_text(custom_suite(fx.suite, **model))
    with pytest.raises(SpecError) as caught:
        build_definitions(home)
    assert named in str(caught.value) and "SWAY_ALLOW_SPEC_CODE=1" in str(caught.value)
    allowed = Settings.from_env({"SWAY_HOME": str(home.home), "SWAY_ALLOW_SPEC_CODE": "1"})
    assert allowed.allow_spec_code
