"""forgetting_budget: KL(base || ft) per token on the shipped corpus, with a bootstrap interval.

The request (SequenceDivergence) against a direct float64 torch computation and against the mlx
backend, base rows computed once, the persistent cache's round trip; the probe's arithmetic and
verdicts by hand; and the real fixtures: doc-strong spends far more than doc-weak (intervals
apart), the zero adapter spends exactly 0, a budget gates, `sway history` shows the lineage.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import score_cache, stats
from sway_engine.adapters import partition_key, read_adapter
from sway_engine.backends.base import ROLLING, SEQUENCE_DIVERGENCE
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.cli import main
from sway_engine.errors import SpecError
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.base import Context, Measurement
from sway_engine.probes.common.corpus import chunk_text, load_corpus
from sway_engine.probes.forgetting_budget import ForgettingBudget, ForgettingBudgetSpec
from sway_engine.requests import (
    Request,
    Result,
    RollingLogprob,
    SequenceDivergence,
    SequenceDivergenceResult,
)
from sway_engine.result import Verdict
from sway_engine.store import AdapterRecord, ResultStore, RunRecord
from sway_engine.suite import parse_spec
from sway_engine.views import BASE, FINETUNED, Null, View
from tests.conftest import entry_for, show

TEXT = load_corpus("public_domain_en")[:700]  # under the fixture's 256-token context
LONG = chunk_text(load_corpus("public_domain_en"), 2048, 1)[0]  # several windows


# ---------------------------------------------------------------- the probe, by hand


def fake_ctx(kl_of: dict[tuple[str, str], list[float]], caps: frozenset[str]) -> Context:
    """Chunk text -> per-token KL for view Finetuned; nulls spend half as much."""

    def execute(reqs: Sequence[Request]) -> list[Result]:
        out: list[Result] = []
        for r in reqs:
            assert isinstance(r, SequenceDivergence) and r.view_a == BASE
            kl = np.asarray(kl_of[r.text[:8], r.view_b.key], dtype=float)
            out.append(SequenceDivergenceResult(np.arange(kl.size + 1), kl))
        return out

    return Context(execute=execute, capabilities=caps)


def test_raw_is_total_nats_over_total_tokens_and_the_interval_is_token_weighted(
    tmp_path: Path,
) -> None:
    corpus = tmp_path / "c.txt"
    a, b = "alpha " * 30, "bravo " * 30
    corpus.write_text(f"{a}\n\n{b}")
    chunks = chunk_text(load_corpus(str(corpus)), 200, 8)
    assert [c[:8] for c in chunks] == ["alpha al", "bravo br"]
    kls = {
        ("alpha al", FINETUNED.key): [0.1, 0.3],  # 2 tokens, mean 0.2
        ("bravo br", FINETUNED.key): [1.0] * 6,  # 6 tokens, mean 1.0
        ("alpha al", Null(1).key): [0.05, 0.15],
        ("bravo br", Null(1).key): [0.5] * 6,
    }
    spec = ForgettingBudgetSpec(name="f", corpus=str(corpus), chunk_chars=200)
    ctx = fake_ctx(kls, frozenset({SEQUENCE_DIVERGENCE}))
    ft, null = ForgettingBudget().measure(spec, ctx, [FINETUNED, Null(1)])
    assert ft.raw == pytest.approx(6.4 / 8)  # (0.4 + 6) / 8, not the chunk mean 0.6
    assert null.raw == pytest.approx(3.2 / 8)
    assert ft.values == pytest.approx((0.2, 1.0)) and ft.weights == (2.0, 6.0)
    assert ft.evidence["scored_tokens"] == 8 and ft.evidence["total_nats"] == pytest.approx(6.4)
    assert ft.evidence["ci_95"] == list(stats.bootstrap_ci(ft.values, weights=ft.weights))


def test_weighted_bootstrap_is_the_ratio_of_sums() -> None:
    values, weights = [0.2, 1.0, 0.5], [2.0, 6.0, 2.0]
    lo, hi = stats.bootstrap_ci(values, weights=weights, seed=3) or (0, 0)
    pooled = (0.4 + 6.0 + 1.0) / 10
    assert lo < pooled < hi and lo >= 0.2 and hi <= 1.0
    assert stats.bootstrap_ci(values, weights=[1, 1, 1]) == pytest.approx(
        stats.bootstrap_ci(values), abs=1e-12
    )
    assert stats.bootstrap_ci(values, weights=[1, 0, 1]) is None  # a weight must be > 0
    assert stats.bootstrap_ci([0.3, 0.3], weights=[1, 5]) == (0.3, 0.3)


def measurement(raw: float, ci: tuple[float, float]) -> Measurement:
    return Measurement(raw=raw, values=(raw, raw), weights=(1.0, 1.0), evidence={"ci_95": ci})


NULL = stats.null_stats([0.1, 0.12, 0.09, 0.11, 0.1, 0.13, 0.08, 0.1])


@pytest.mark.parametrize(
    ("budget", "raw", "ci", "verdict", "says"),
    [
        (None, 2.0, (1.9, 2.1), Verdict.PASS, "no budget set (report only)"),
        (0.5, 2.0, (1.9, 2.1), Verdict.FAIL, "over budget 0.5 nats/token (the whole interval"),
        (0.5, 0.55, (0.45, 0.6), Verdict.FAIL, "the interval reaches below it (0.45)"),
        (0.5, 0.45, (0.4, 0.52), Verdict.PASS, "within budget 0.5 nats/token; the interval"),
        (0.5, 0.1, (0.09, 0.11), Verdict.PASS, "within budget 0.5 nats/token: spends"),
    ],
)
def test_the_budget_rule(
    budget: float | None, raw: float, ci: tuple[float, float], verdict: Verdict, says: str
) -> None:
    spec = ForgettingBudgetSpec(name="f", max_nats_per_token=budget)
    j = ForgettingBudget().judge(spec, measurement(raw, ci), NULL)
    assert j.verdict == verdict and says in j.message, j.message
    assert "random adapters of its size" in j.message
    assert j.z is not None and (j.z < 0) == (raw > NULL.mean)  # negative: spends more
    if budget is not None:
        assert j.score == pytest.approx(max(0.0, 1 - raw / budget / 2))


def test_nulls_give_context_never_the_verdict() -> None:
    """A budget is absolute: spending under it passes even far beyond the nulls, and over it
    fails even where random adapters of that size spend as much."""
    spec = ForgettingBudgetSpec(name="f", max_nats_per_token=1.0)
    probe = ForgettingBudget()
    beyond = probe.judge(spec, measurement(0.9, (0.85, 0.95)), NULL)
    assert beyond.verdict == Verdict.PASS and "more than random adapters" in beyond.message
    big_null = stats.null_stats([1.5, 1.6, 1.4, 1.55, 1.45, 1.5, 1.6, 1.4])
    like_null = probe.judge(spec, measurement(1.5, (1.45, 1.55)), big_null)
    assert like_null.verdict == Verdict.FAIL and "no more than random" in like_null.message


def test_spec_fields_are_validated() -> None:
    entry: Any = entry_for("forgetting_budget", max_nats_per_token=0.25)
    assert entry.spec.max_nats_per_token == 0.25 and entry.category == "calibration"
    for bad in ({"max_nats_per_token": 0}, {"corpus": " "}, {"chunk_chars": 10}):
        with pytest.raises(SpecError):
            entry_for("forgetting_budget", **bad)


def test_a_backend_without_sequence_divergences_skips_it() -> None:
    from sway_engine.runner import run_entry

    entry: Any = entry_for("forgetting_budget")
    ctx = fake_ctx({}, frozenset({ROLLING}))  # what the api backend offers
    r = run_entry(entry, ctx, None)
    assert r.verdict == Verdict.SKIP and "sequence_divergence" in r.message


# ---------------------------------------------------------------- the request, on the model


@pytest.fixture(scope="module")
def session(fx: FixturePaths) -> Iterator[Any]:
    """One loaded base; torch on one thread (a busy 2-core box), restored afterwards."""
    import torch

    from sway_engine.backends.hf import HFBackend

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = HFBackend(str(fx.base), str(fx.adapters["doc-strong"]))
    try:
        yield backend, Instrumented(backend)
    finally:
        backend.close()
        torch.set_num_threads(threads)


def reference_kl(fx: FixturePaths, adapter: str, ids: np.ndarray) -> np.ndarray:
    """KL(base || adapter) per position, straight from transformers + PEFT in float64."""
    import peft
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(fx.base), dtype=torch.float64)
    model = peft.PeftModel.from_pretrained(model, str(fx.adapters[adapter])).eval()
    x = torch.tensor(ids[None, :], dtype=torch.long)
    with torch.no_grad():
        ft = torch.log_softmax(model(x).logits[0, :-1], -1)
        with model.disable_adapter():
            base = torch.log_softmax(model(x).logits[0, :-1], -1)
    return (base.exp() * (base - ft)).sum(-1).numpy()


def test_per_token_kl_equals_a_direct_float64_computation(fx: FixturePaths, session: Any) -> None:
    backend, _ = session
    backend.load_adapter(str(fx.adapters["doc-strong"]))
    (res,) = backend.execute([SequenceDivergence(TEXT, BASE, FINETUNED)])
    assert isinstance(res, SequenceDivergenceResult) and res.kl.dtype == np.float64
    assert res.kl.size == res.token_ids.size - 1 and res.token_ids.size < backend.max_len
    ref = reference_kl(fx, "doc-strong", res.token_ids)
    np.testing.assert_allclose(res.kl, ref, rtol=1e-4, atol=2e-6)
    assert res.mean > 0.1  # doc-strong moved general text well beyond fp32 noise


def test_long_texts_are_scored_in_the_rolling_windows(fx: FixturePaths, session: Any) -> None:
    backend, _ = session
    backend.load_adapter(str(fx.adapters["doc-strong"]))
    long, rolling = backend.execute(
        [SequenceDivergence(LONG, BASE, FINETUNED), RollingLogprob(LONG, BASE)]
    )
    assert isinstance(long, SequenceDivergenceResult)
    assert long.token_ids.size > backend.max_len  # more than one window
    assert long.kl.size == rolling.logprobs.size  # the positions RollingLogprob scores
    (head,) = backend.execute(
        [SequenceDivergence(backend.tokenizer.decode(long.token_ids[:100]), BASE, FINETUNED)]
    )
    assert isinstance(head, SequenceDivergenceResult)
    assert np.array_equal(head.token_ids, long.token_ids[:100])  # the fixture decodes exactly
    np.testing.assert_allclose(long.kl[:99], head.kl, rtol=1e-4, atol=2e-6)


def test_base_against_base_is_zero_without_a_forward_and_base_rows_are_shared(
    fx: FixturePaths, session: Any
) -> None:
    backend, _ = session
    backend.load_adapter(str(fx.adapters["doc-strong"]))
    before = backend.counters()
    (same,) = backend.execute([SequenceDivergence(TEXT, BASE, BASE)])
    assert isinstance(same, SequenceDivergenceResult) and same.kl.size > 10
    assert np.all(same.kl == 0.0)
    assert backend.counters()["rows_forwarded"] == before["rows_forwarded"]
    views: list[View] = [FINETUNED, Null(1), Null(2)]
    backend.execute([SequenceDivergence(TEXT, BASE, v) for v in views])
    # one window: the base row once, one row per treatment
    assert backend.counters()["rows_forwarded"] - before["rows_forwarded"] == 1 + len(views)


def test_the_persistent_cache_round_trips_it(
    fx: FixturePaths, session: Any, tmp_path: Path
) -> None:
    result = SequenceDivergenceResult(np.arange(4, dtype=np.int64), np.array([0.5, 1e-300, 0.0]))
    back = score_cache.decode(score_cache.encode(result) or b"", None)
    assert isinstance(back, SequenceDivergenceResult)
    assert back.kl.dtype == np.float64 and np.array_equal(back.kl, result.kl)
    assert np.array_equal(back.token_ids, result.token_ids)

    backend, _ = session
    backend.load_adapter(str(fx.adapters["doc-weak"]))
    req = SequenceDivergence(TEXT, BASE, FINETUNED)
    first = Instrumented(backend, store=score_cache.ScoreCache(tmp_path / "s.sqlite"))
    (computed,) = first.execute([req])
    again = Instrumented(backend, store=score_cache.ScoreCache(tmp_path / "s.sqlite"))
    (stored,) = again.execute([req])
    assert again.stats["stored_hits"] == 1 and again.stats["executes"] == 0
    assert isinstance(stored, SequenceDivergenceResult) and isinstance(computed, type(stored))
    assert np.array_equal(stored.kl, computed.kl)


def test_mlx_gives_the_same_per_token_kl(fx: FixturePaths, session: Any, tmp_path: Path) -> None:
    pytest.importorskip("mlx_lm")
    from sway_engine.backends.mlx import MLXBackend

    backend, _ = session
    backend.load_adapter(str(fx.adapters["doc-strong"]))
    reqs = [SequenceDivergence(t, BASE, v) for t in (TEXT, LONG) for v in (FINETUNED, Null(1))]
    hf = backend.execute(reqs)
    mlx = MLXBackend(str(fx.base), str(fx.adapters["doc-strong"]), cache_dir=tmp_path)
    try:
        for a, b in zip(hf, mlx.execute(reqs), strict=True):
            assert isinstance(a, SequenceDivergenceResult) and isinstance(b, type(a))
            assert np.array_equal(a.token_ids, b.token_ids)
            np.testing.assert_allclose(b.kl, a.kl, rtol=1e-3, atol=5e-5)
    finally:
        mlx.close()


# ---------------------------------------------------------------- the real fixtures

# Lighter than the defaults to keep the module fast on 2 CPU cores.
FORGET = {"name": "forget", "kind": "forgetting_budget", "max_chunks": 6, "chunk_chars": 1024}


def suite_with(fx: FixturePaths, **fields: Any) -> tuple[Any, list[Any]]:
    data = yaml.safe_load(Path(fx.suite).read_text())
    null_entry = next(e for e in data["suite"] if e["kind"] == "null_adapter")
    data["suite"] = [null_entry, {**FORGET, **fields}]
    return parse_spec(data, base_dir=Path(fx.suite).parent)


def run_adapter(session: Any, suite: tuple[Any, list[Any]], adapter: Path) -> Any:
    from sway_engine.runner import run_suite

    backend, inst = session
    backend.load_adapter(str(adapter))
    inst.reset()
    return run_suite(suite[0], suite[1], inst)


@pytest.fixture(scope="module")
def fixture_runs(fx: FixturePaths, session: Any) -> dict[str, Any]:
    """Each fixture adapter's suite result with a budget of 0.1 nats/token."""
    suite = suite_with(fx, max_nats_per_token=0.1)
    return {
        n: run_adapter(session, suite, fx.adapters[n]) for n in ("doc-strong", "doc-weak", "zero")
    }


def test_doc_strong_spends_far_more_than_doc_weak(fixture_runs: dict[str, Any]) -> None:
    strong = fixture_runs["doc-strong"].probe("forget")
    weak = fixture_runs["doc-weak"].probe("forget")
    print(show(strong, weak))
    assert strong.ci_95 is not None and weak.ci_95 is not None
    lo, hi = strong.ci_95
    assert lo <= strong.raw <= hi and weak.ci_95[0] <= weak.raw <= weak.ci_95[1]
    # measured ~1.9 vs ~0.009 nats/token: the intervals are two orders of magnitude apart
    assert lo > 10 * weak.ci_95[1], show(strong, weak)
    # both spend more than random adapters of their size (measured z ~ -34 and -20)
    for r in (strong, weak):
        assert r.null is not None and r.raw > r.null.mean and r.z is not None and r.z < -3, show(r)


def test_the_budget_gates_and_the_zero_adapter_spends_exactly_nothing(
    fixture_runs: dict[str, Any],
) -> None:
    strong = fixture_runs["doc-strong"].probe("forget")
    weak = fixture_runs["doc-weak"].probe("forget")
    zero = fixture_runs["zero"].probe("forget")
    assert strong.verdict == Verdict.FAIL and "the whole interval is above it" in strong.message
    assert weak.verdict == Verdict.PASS and "within budget 0.1" in weak.message, show(weak)
    assert zero.raw == 0.0 and zero.ci_95 == (0.0, 0.0)
    assert zero.verdict == Verdict.PASS and zero.p == 1.0, show(zero)


def test_history_shows_each_adapter_spending(
    fx: FixturePaths,
    fixture_runs: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    home = tmp_path / "home"
    home.mkdir()
    store = ResultStore(home / "sway.duckdb")
    keys = {}
    for name in ("doc-weak", "doc-strong"):
        info = read_adapter(fx.adapters[name], check_finite=False)
        key = keys[name] = partition_key(info.path.name, info.sha256)
        store.record_adapter(AdapterRecord.checked(key, info))
        result = fixture_runs[name]
        store.begin_run(RunRecord(run_id=f"cli:{name}", adapter_id=key, spec_hash=result.spec_hash))
        store.write_suite(key, result, False, f"cli:{name}")
    assert main(["history", "doc-", "--lineage", "--home", str(home), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    # oldest evaluation first (fixture_runs evaluated doc-strong first): a lineage's trend
    assert [r["adapter_id"] for r in rows] == [keys["doc-strong"], keys["doc-weak"]]
    for r in rows:
        name = r["name"]
        assert r["nats_per_token"] == fixture_runs[name].probe("forget").raw
        assert r["nats_ci_lo"] <= r["nats_per_token"] <= r["nats_ci_hi"]
    assert main(["history", "doc-", "--lineage", "--home", str(home)]) == 0
    text = capsys.readouterr().out
    assert "nats_per_token" in text.splitlines()[0]
    strong = fixture_runs["doc-strong"].probe("forget")
    assert f"{strong.raw:.4g} [{strong.ci_95[0]:.4g}, {strong.ci_95[1]:.4g}]" in text
    assert main(["history", "doc-", "--home", str(home)]) == 2  # not a name without --lineage


def test_mlflow_gets_the_lineages_spending_as_a_chart(
    fx: FixturePaths,
    fixture_runs: dict[str, Any],
    tmp_path: Path,
    template_db: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two versions of one adapter folder (`doc`: first doc-strong's weights, then doc-weak's,
    in the order fixture_runs evaluated them): the second evaluation's MLflow run carries a
    chart of both spendings, oldest first."""
    import shutil

    from mlflow import MlflowClient

    import sway_engine.mirror as mirror_module
    from sway_engine.mirror import Mirror
    from sway_engine.tracking import MlflowTracking

    shutil.copyfile(template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = ResultStore(tmp_path / "sway.duckdb")
    charted: list[list[float]] = []
    drawn = mirror_module.trend_plot

    def spy(name: str, rows: Sequence[dict[str, Any]], budget: float | None) -> bytes | None:
        charted.append([r["nats_per_token"] for r in rows])
        return drawn(name, rows, budget)

    monkeypatch.setattr(mirror_module, "trend_plot", spy)
    mirror = Mirror(MlflowTracking(uri, "forgetting", tmp_path / "art"), store, print)
    for version, name in enumerate(("doc-strong", "doc-weak")):
        info = read_adapter(fx.adapters[name], check_finite=False)
        key = partition_key("doc", info.sha256)
        store.record_adapter(replace_name(AdapterRecord.checked(key, info), "doc"))
        result = fixture_runs[name]
        run_id = f"cli:v{version}"
        store.begin_run(RunRecord(run_id=run_id, adapter_id=key, spec_hash=result.spec_hash))
        store.write_suite(key, result, False, run_id)
        published = mirror.publish(run_id, {})
        assert published.synced, published.error
    weak, strong = (fixture_runs[n].probe("forget").raw for n in ("doc-weak", "doc-strong"))
    assert charted == [[strong], [strong, weak]]
    client = MlflowClient(uri)
    mlflow_id = store.run_row("cli:v1")["mlflow_run_id"]
    listed = {f.path for f in client.list_artifacts(mlflow_id, "plots")}
    assert "plots/forget_trend.png" in listed


def replace_name(record: AdapterRecord, name: str) -> AdapterRecord:
    from dataclasses import replace

    return replace(record, name=name)
