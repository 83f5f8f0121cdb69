"""The MLXModelResource resource: a suite with `kind: mlx` evaluates a partition on mlx-lm."""

from __future__ import annotations

import pytest

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_dagster.resources import HFModelResource, MLXModelResource
from sway_engine.store import ResultStore
from tests.dagster.conftest import add_adapter, model_loads


def test_suite_kind_mlx_picks_the_mlx_resource_and_materializes(
    home, instance, fx, tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("SWAY_CACHE_DIR", str(tmp_path / "cache"))
    home.suite.write_text(fx.suite.read_text().replace("kind: hf", "kind: mlx"))
    defs = build_definitions(home)
    resource = defs.resources["backend"]
    assert isinstance(resource, MLXModelResource) and resource.base == str(fx.base)
    assert not resource.same_model(HFModelResource(base=str(fx.base)))

    add_adapter(home, fx.adapters["doc-strong"])
    (cand,) = AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    assert cand.key is not None
    instance.add_dynamic_partitions("adapters", [cand.key])
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=cand.key, instance=instance
    )
    assert result.success
    assert model_loads(instance, result.run_id) == 1  # one mlx-lm base load for the whole run
    rows = {r["probe"]: r for r in ResultStore(home.database).probe_results(cand.key)}
    assert rows["delta_kl_doc"]["verdict"] == "pass" and rows["delta_kl_doc"]["z"] >= 3
    assert rows["null_baseline"]["verdict"] == "pass"  # nulls exist on mlx now
    checks = {
        (c.asset_key.to_user_string(), c.check_name): c
        for c in result.get_asset_check_evaluations()
    }
    assert checks["sway_score", "gate"].passed
    assert checks["sway/delta_kl_doc", "verdict"].passed  # each probe's final verdict too
    assert any((tmp_path / "cache" / "mlx-adapters").glob("*/adapters.safetensors"))


def test_mlx_resource_rejects_unknown_config(fx) -> None:  # type: ignore[no-untyped-def]
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="bogus"):
        MLXModelResource(base=str(fx.base), bogus=1)  # type: ignore[call-arg]
