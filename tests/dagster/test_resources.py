"""Backend resources: one base load per run, and the two-model composition."""

from __future__ import annotations

import dagster as dg
import pytest
from pydantic import ValidationError

from sway_dagster.definitions import JOB_NAME, build_definitions
from sway_dagster.resources import HFModelResource, ResultStoreResource, TwoModelResource
from sway_engine.backends.hf import HFBackend as Engine
from sway_engine.runner import preflight
from sway_engine.store import ResultStore
from tests.conftest import count_constructions
from tests.dagster.conftest import add_adapter, verdict_checks


def test_two_model_on_one_model_loads_once(fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    loads = count_constructions(monkeypatch, Engine)
    res = TwoModelResource(
        base=HFModelResource(base=str(fx.base)), ft=HFModelResource(base=str(fx.base))
    )
    preflight(res.session(str(fx.adapters["doc-strong"])))  # a session loads on first use
    preflight(res.session(str(fx.adapters["zero"])))
    assert len(loads) == 1


def test_two_model_on_two_models_composes(fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    loads = count_constructions(monkeypatch, Engine)
    res = TwoModelResource(
        base=HFModelResource(base=str(fx.base), dtype="fp32"), ft=HFModelResource(base=str(fx.base))
    )
    session = res.session(str(fx.adapters["doc-strong"]))
    preflight(session)
    assert len(loads) == 2
    assert session.kind == "two_model"


def test_unknown_resource_config_is_rejected(fx) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="bogus"):
        HFModelResource(base=str(fx.base), bogus=1)  # type: ignore[call-arg]


def test_job_runs_with_a_two_model_backend(home, instance, fx) -> None:  # type: ignore[no-untyped-def]
    backend = TwoModelResource(
        base=HFModelResource(base=str(fx.base), dtype="fp32"), ft=HFModelResource(base=str(fx.base))
    )
    defs = build_definitions(home, backend=backend)
    add_adapter(home, fx.adapters["doc-strong"])
    from sway_dagster.adapter_store import AdapterStoreResource

    (cand,) = AdapterStoreResource(root=str(home.adapters_dir), settle_seconds=0).scan()
    assert cand.key is not None
    instance.add_dynamic_partitions("adapters", [cand.key])
    result = defs.resolve_job_def(JOB_NAME).execute_in_process(
        partition_key=cand.key, instance=instance
    )
    assert result.success
    rows = {r["probe"]: r for r in ResultStore(home.database).probe_results(cand.key)}
    assert rows["null_baseline"]["verdict"] == "skip"
    # two composed models have no null views: uncalibrated, WARN (never a fixed-threshold PASS)
    assert rows["delta_kl_doc"]["verdict"] == "warn" and rows["delta_kl_doc"]["z"] is None
    # that WARN fails the gate, so its verdict check fails at ERROR; the SKIP passes
    checks = verdict_checks(defs, instance, cand.key)
    dkl = checks[dg.AssetKey(["sway", "delta_kl_doc"])].evaluation
    assert not dkl.passed and dkl.severity == dg.AssetCheckSeverity.ERROR
    assert checks[dg.AssetKey("null_calibration")].evaluation.passed


def test_teardown_closes_the_backend_and_the_score_cache(fx, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The score cache's sqlite connection was left to garbage collection after a run."""
    from sway_engine.requests import NextToken
    from sway_engine.views import FINETUNED

    monkeypatch.setenv("SWAY_SCORE_CACHE", "on")
    res = HFModelResource(base=str(fx.base), score_cache_dir=str(tmp_path))
    session = res.session(str(fx.adapters["doc-strong"]))
    session.execute([NextToken("Q: Where is Quellmoor?\nA:", FINETUNED)])
    store, engine = session._store, session.inner
    assert store is not None and store._db is not None
    closed = []
    monkeypatch.setattr(engine, "close", lambda: closed.append(True))
    res.teardown_after_execution(dg.build_init_resource_context())
    assert store._db is None and closed == [True]


def test_probe_steps_read_the_null_matrix_once_per_run(fx, tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """null_calibration writes the matrix before any probe step reads it: the store is read
    once per (Dagster run, adapter), not once per probe step, and read again while it holds
    no samples yet."""
    from sway_engine import evaluations
    from sway_engine.calibration import NullCell
    from sway_engine.suite import Suite

    suite = Suite.load(fx.suite)
    res = ResultStoreResource(database=str(tmp_path / "sway.duckdb"))
    reads: list[str] = []
    real = evaluations.null_matrix_for

    def counted(store, key, suite, run):  # type: ignore[no-untyped-def]
        reads.append(run)
        return real(store, key, suite, run)

    monkeypatch.setattr(evaluations, "null_matrix_for", counted)
    empty = res.null_matrix("k", suite, "d1")
    assert empty is not None and empty.cells == ()
    run = evaluations.evaluation_id("d1", "k")
    cells = [NullCell("delta_kl_doc", "delta_kl", 1000 + i, 1.0, 0.01 * (i + 1)) for i in range(4)]
    res.store().write_null_cells(run, "k", suite.spec_hash, cells)
    for _ in range(3):
        matrix = res.null_matrix("k", suite, "d1")
        assert matrix is not None and len(matrix.cells) == 4
    assert reads == [run, run]  # once empty, once with samples, then kept
    other = res.null_matrix("k", suite, "d2")  # another Dagster run reads its own
    assert reads[-1] == evaluations.evaluation_id("d2", "k") and other is not None
