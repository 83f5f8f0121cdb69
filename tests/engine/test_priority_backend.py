"""Fallback kinds: the first that loads serves; each failure is logged; the kind is recorded."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from sway_engine.backends.base import NEXT_TOKEN
from sway_engine.backends.priority import PriorityBackend
from sway_engine.errors import BackendError
from sway_engine.requests import NextToken, Request, Result
from sway_engine.runner import evaluate
from sway_engine.spec import ModelSpec
from sway_engine.suite import parse_spec
from sway_engine.views import BASE
from tests.conftest import count_constructions

HERE = __name__


class NoWeights:
    """A custom backend whose model file is missing: it cannot load."""

    capabilities = frozenset({NEXT_TOKEN})

    def __init__(self, base_spec: ModelSpec, adapter_path: str | None) -> None:
        raise FileNotFoundError(f"no weights at {base_spec.base}/custom.bin")

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return []

    def close(self) -> None:
        pass


class Stub:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.capabilities = frozenset({NEXT_TOKEN})
        self.closed = False
        self.loaded: list[str] = []

    def execute(self, requests: Sequence[Request]) -> list[Result]:
        return []

    def load_adapter(self, path: str) -> None:
        self.loaded.append(path)

    def counters(self) -> dict[str, float]:
        return {"forward_passes": 3.0}

    def close(self) -> None:
        self.closed = True


def fail(message: str) -> Any:
    def build() -> Any:
        raise BackendError(message)

    return build


# ---- the spec field ------------------------------------------------------------------------------


def test_fallback_lists_kinds_tried_after_kind() -> None:
    model = ModelSpec(kind="mlx", fallback=("hf",), base="/m")
    assert (model.kind, model.fallback) == ("mlx", ("hf",))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"kind": "mlx", "fallback": ["hf", "hf"]}, r"fallback repeats kind\(s\) \['hf'\]"),
        ({"kind": "hf", "fallback": ["hf"]}, r"repeats kind\(s\) \['hf'\]"),
        ({"kind": "mlx", "fallback": ["api"]}, "kind api needs `endpoint`"),
        ({"kind": "hf", "fallback": ["custom"]}, "kind custom needs `entry_point`"),
        ({"kind": "dummy", "fallback": ["hf"]}, "kind dummy takes no fallback"),
        ({"kind": "mlx", "fallback": ["tpu"]}, "fallback.0"),
    ],
)
def test_bad_fallback_lists_are_rejected(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        ModelSpec(base="/m", **fields)


def test_spec_errors_name_the_yaml_path() -> None:
    from sway_engine.errors import SpecError

    data = {
        "version": 1,
        "models": {
            "base": {"base": "/m"},
            "ft": {"base": "/m", "kind": "mlx", "fallback": ["mlx"]},
        },
        "suite": [{"name": "d", "kind": "delta_kl", "prompts": ["x"]}],
    }
    with pytest.raises(SpecError, match=r"models.ft: .*fallback repeats kind\(s\) \['mlx'\]"):
        parse_spec(data)


# ---- the backend -------------------------------------------------------------------------------


def test_first_kind_that_loads_serves_and_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    hf = Stub("hf")
    with caplog.at_level(logging.WARNING, logger="sway_engine.backends.priority"):
        backend = PriorityBackend([("mlx", fail("mlx needs Apple silicon")), ("hf", lambda: hf)])
    assert backend.kind == "hf" and backend.chosen is hf
    assert backend.attempts == [("mlx", "BackendError: mlx needs Apple silicon")]
    assert "backend mlx could not load (BackendError: mlx needs Apple silicon)" in caplog.text
    assert backend.counters() == {"forward_passes": 3.0, "fallbacks": 1.0}
    backend.load_adapter("/a2")  # delegated to the chosen backend
    assert hf.loaded == ["/a2"]
    backend.close()
    assert hf.closed


def test_all_kinds_failing_lists_every_reason() -> None:
    with pytest.raises(BackendError) as err:
        PriorityBackend([("mlx", fail("no metal")), ("hf", fail("no torch"))])
    assert "mlx: BackendError: no metal" in str(err.value)
    assert "hf: BackendError: no torch" in str(err.value)


def test_no_kinds_is_an_error() -> None:
    with pytest.raises(BackendError, match="at least one kind"):
        PriorityBackend([])


def _priority_spec(fx) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    model = {
        "kind": "custom",
        "entry_point": f"{HERE}:NoWeights",
        "fallback": ["hf"],
        "base": str(fx.base),
        "adapter": str(fx.adapters["doc-strong"]),
    }
    return {
        "version": 1,
        "models": {"base": model, "ft": model},
        "suite": [
            {
                "name": "delta_kl_doc",
                "kind": "delta_kl",
                "prompts": [
                    "Q: What is brinthorn tea made from?\nA:",
                    "Quellmoor is a small granite",
                ],
            }
        ],
    }


def test_custom_fails_hf_serves_and_duckdb_records_hf(
    fx,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,  # type: ignore[no-untyped-def]
) -> None:
    from sway_engine.store import ResultStore

    spec, entries = parse_spec(_priority_spec(fx))
    with caplog.at_level(logging.WARNING, logger="sway_engine.backends.priority"):
        result = evaluate(spec, entries)
    assert "backend custom could not load (FileNotFoundError: no weights at" in caplog.text
    assert result.backend_kind == "hf"
    assert result.backend_stats["fallbacks"] == 1.0
    assert result.probe("delta_kl_doc").raw is not None
    store = ResultStore(tmp_path / "sway.duckdb")
    store.write_suite("doc-strong", result, True, "run-1")
    import duckdb

    with duckdb.connect(str(tmp_path / "sway.duckdb"), read_only=True) as con:
        (kind,) = con.execute("select backend_kind from runs where run_id = 'run-1'").fetchone()
    assert kind == "hf"


def test_priority_resource_swaps_adapters_on_the_chosen_kind(fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from sway_dagster.resources import PriorityModelResource as Resource
    from sway_engine.backends.hf import HFBackend

    loads = count_constructions(monkeypatch, HFBackend)
    res = Resource(kinds=["custom", "hf"], base=str(fx.base), entry_point=f"{HERE}:NoWeights")
    first = res.session(str(fx.adapters["doc-strong"]))
    again = res.session(str(fx.adapters["zero"]))
    assert first is again and first.kind == "hf"
    assert len(loads) == 1  # the second adapter swapped in place
    (dist,) = first.execute([NextToken("Q: x\nA:", BASE, 4)])
    assert len(dist.logprobs) == 4  # type: ignore[union-attr]


def test_priority_resource_validates_its_kinds_when_configured() -> None:
    from sway_dagster.resources import PriorityModelResource as Resource

    with pytest.raises(ValidationError, match=r"repeats kind\(s\) \['hf'\]"):
        Resource(kinds=["hf", "hf"], base="/m")
    with pytest.raises(ValidationError, match="kind custom needs `entry_point`"):
        Resource(kinds=["mlx", "custom"], base="/m")
