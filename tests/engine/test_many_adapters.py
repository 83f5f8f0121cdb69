"""Several adapters of one base in one run: shared batches, same answers as one at a time."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from sway_engine.backends.hf import HFBackend
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.errors import SwayError
from sway_engine.multi import bind_request, evaluate_many, run_many
from sway_engine.requests import Divergence, NextToken, Request, Result
from sway_engine.result import SuiteResult, Verdict
from sway_engine.runner import run_suite
from sway_engine.suite import load_spec
from sway_engine.views import BASE, FINETUNED, Finetuned, Null, Scaled, bind, canonical
from tests.conftest import count_constructions

# ---- views and requests bound to an adapter ----


def test_default_views_keep_their_keys_and_bound_views_name_the_adapter() -> None:
    assert FINETUNED.key == "ft" and Scaled(0.5).key == "scaled_0.5"
    assert Null(3).key == "null_matched_3_r1.0"
    assert Finetuned("b").key == "ft@b" and Scaled(0.5, "b").key == "scaled_0.5@b"
    assert Null(3, adapter="b").key == "null_matched_3_r1.0@b"
    assert canonical(Scaled(1.0, "b")) == Finetuned("b")
    assert canonical(Scaled(0.0, "b")) == BASE
    assert bind(BASE, "b") is BASE
    assert bind(Null(3, rank_scale=2.0, mode="fixed"), "b") == Null(3, 2.0, "fixed", 0.02, "b")


def test_bind_request_binds_every_view_of_a_request() -> None:
    req = bind_request(Divergence("p", BASE, Scaled(0.25)), "b")
    assert isinstance(req, Divergence)
    assert req.view_a == BASE and req.view_b == Scaled(0.25, "b")
    assert bind_request(NextToken("p", FINETUNED, 4), "") == NextToken("p", FINETUNED, 4)


# ---- the engine entry points on the fixtures ----

NAMES = ["doc-strong", "noise", "nan", "doc-weak"]


def _alone(fx, name: str) -> SuiteResult:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    return run_suite(spec, entries, Instrumented(HFBackend(str(fx.base), str(fx.adapters[name]))))


def test_many_adapters_equal_each_alone_with_one_base_load(fx, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    loads = count_constructions(monkeypatch, HFBackend)
    results = evaluate_many(spec, entries, [fx.adapters[n] for n in NAMES])
    assert len(loads) == 1
    by_name = dict(zip(NAMES, results, strict=True))
    assert all(p.verdict is Verdict.ERROR for p in by_name["nan"].probes)
    assert "non-finite" in by_name["nan"].probes[0].message
    stats = by_name["doc-strong"].backend_stats
    assert stats["adapters_loaded"] == 3
    for name in ("doc-strong", "noise", "doc-weak"):
        many, alone = by_name[name], _alone(fx, name)
        assert many.adapter == str(fx.adapters[name])
        for m, a in zip(many.probes, alone.probes, strict=True):
            assert m.verdict is a.verdict, (name, m.name)
            if a.raw is not None:
                assert m.raw == pytest.approx(a.raw, abs=1e-6), (name, m.name)
            for mi, ai in zip(m.items, a.items, strict=True):  # null cells and per-prompt items
                for key, value in ai.items():
                    if isinstance(value, float):
                        assert mi[key] == pytest.approx(value, abs=1e-6), (name, m.name, key)


def test_many_adapters_share_base_rows_and_batches(fx) -> None:  # type: ignore[no-untyped-def]
    spec, entries = load_spec(fx.suite)
    one = Instrumented(HFBackend(str(fx.base)))
    run_many(spec, entries, one, [fx.adapters["doc-strong"]])
    two = Instrumented(HFBackend(str(fx.base)))
    run_many(spec, entries, two, [fx.adapters["doc-strong"], fx.adapters["doc-weak"]])
    c1, c2 = one.counters(), two.counters()
    # the same rounds with fuller batches: fewer passes than two runs one after the other
    assert c2["forward_passes"] < 2 * c1["forward_passes"]
    # base rows are computed once for both adapters: two adapters cost less than twice one
    assert c2["rows_forwarded"] < 2 * c1["rows_forwarded"]


def test_run_many_refuses_a_backend_that_holds_one_adapter(fx) -> None:  # type: ignore[no-untyped-def]
    class OneAdapter:
        kind = "one"
        capabilities = frozenset()

        def execute(self, requests: Sequence[Request]) -> list[Result]:
            return []

        def close(self) -> None:
            pass

    spec, entries = load_spec(fx.suite)
    with pytest.raises(SwayError, match="one adapter at a time"):
        run_many(spec, entries, Instrumented(OneAdapter()), [fx.adapters["doc-strong"]])
    with pytest.raises(SwayError, match="at least one adapter"):
        evaluate_many(spec, entries, [])
