"""external_perplexity and calibration_drift: the guard rails.

Hand-computed numbers through a fake executor, the one-sided verdict in both directions, the
uncalibrated fallback, spec validation, and the real fixtures (zero adapter, a positive
control, and the calibration property: random adapters of matched norm rarely trip them).
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import stats
from sway_engine.backends.base import CONTINUATION, NULL_VIEWS, ROLLING
from sway_engine.calibration import NullPlan, calibrate
from sway_engine.errors import SpecError
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.base import Context, Measurement
from sway_engine.probes.calibration_drift import (
    PACK_SIZE,
    CalibrationDrift,
    CalibrationDriftSpec,
    PackItem,
    builtin_pack,
)
from sway_engine.probes.common.corpus import chunk_text, clean_corpus, load_corpus
from sway_engine.probes.external_perplexity import ExternalPerplexity, ExternalPerplexitySpec
from sway_engine.probes.registry import PROBES
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
)
from sway_engine.result import Verdict
from sway_engine.runner import run_entry
from sway_engine.suite import parse_spec
from sway_engine.views import BASE, FINETUNED, Base, Finetuned, Null, View
from tests.conftest import entry_for as shared_entry
from tests.conftest import show

DATA = Path(__file__).parents[1] / "data"
CAPS = frozenset({ROLLING, CONTINUATION, NULL_VIEWS})


def fake_ctx(answer: Callable[[Request], Result]) -> Context:
    """A Context whose executor answers each request with `answer` (no model involved)."""

    def execute(reqs: Sequence[Request]) -> list[Result]:
        return [answer(r) for r in reqs]

    return Context(execute=execute, capabilities=CAPS)


def rolling(*lps: float) -> RollingResult:
    return RollingResult(token_ids=np.arange(len(lps) + 1), logprobs=np.asarray(lps, dtype=float))


def entry_for(kind: str, **fields: Any) -> Any:
    return shared_entry(kind, "g", **fields)


def null_of(*samples: float) -> stats.NullStats:
    return stats.null_stats(samples)


# ---------------------------------------------------------------- calibration_drift, by hand

# (prompt, gold, base summed log-prob, ft summed log-prob, gold tokens)
DRIFT_ITEMS = [
    ("The capital of France is", " Paris", -2.0, -4.0, 1),  # -2.0/token: regressed
    ("Water is made of", " hydrogen and oxygen", -8.0, -11.0, 4),  # -0.75/token: not regressed
    ("Two plus two equals", " four", -5.0, -4.5, 1),  # +0.5/token
]


def drift_answer(null_ft: dict[int, list[float]] | None = None) -> Callable[[Request], Result]:
    """Base/ft summed log-probs from DRIFT_ITEMS; Null(seed) views read `null_ft[seed]`."""
    index = {(p, g): i for i, (p, g, *_rest) in enumerate(DRIFT_ITEMS)}

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        i = index[(r.prompt, r.completion)]
        _, _, base, ft, tokens = DRIFT_ITEMS[i]
        if isinstance(r.view, Base):
            return ContinuationResult(base, tokens)
        if isinstance(r.view, Finetuned):
            return ContinuationResult(ft, tokens)
        assert isinstance(r.view, Null) and null_ft is not None
        return ContinuationResult(null_ft[r.view.seed][i], tokens)

    return answer


def test_drift_hand_computed_fraction_and_length_normalisation() -> None:
    spec = CalibrationDriftSpec(
        name="drift", items=tuple((p, g) for p, g, *_ in DRIFT_ITEMS), regression_nats=1.0
    )
    (m,) = CalibrationDrift().measure(spec, fake_ctx(drift_answer()), [FINETUNED])
    # Item 2 lost 3 nats in total but 0.75 per gold token (4 tokens, as the backend counted
    # them): not regressed, where a summed delta would have regressed it.
    assert m.raw == pytest.approx(1 / 3)
    assert m.values == (1.0, 0.0, 0.0)
    assert m.evidence["mean_delta"] == pytest.approx((-2.0 - 0.75 + 0.5) / 3)
    assert m.evidence["regressed"] == 1 and m.evidence["total"] == 3
    row = m.items[1]
    assert row["tokens"] == 4 and row["base"] == -2.0 and row["ft"] == -2.75
    assert row["delta"] == pytest.approx(-0.75) and row["regressed"] is False
    assert set(m.items[0]) >= {"prompt", "gold", "base", "ft", "delta", "regressed"}
    assert m.evidence["worst"][0]["gold"] == " Paris"


def test_drift_items_limit_and_inline_mappings() -> None:
    spec = CalibrationDriftSpec(
        name="drift",
        items=tuple(PackItem(prompt=p, gold=g) for p, g, *_ in DRIFT_ITEMS),
        items_limit=2,
    )
    (m,) = CalibrationDrift().measure(spec, fake_ctx(drift_answer()), [FINETUNED])
    assert m.evidence["total"] == 2 and m.raw == pytest.approx(0.5)
    full = CalibrationDriftSpec(name="drift", items_limit=50)
    seen: list[Request] = []

    def answer(r: Request) -> Result:
        seen.append(r)
        return ContinuationResult(-3.0, 1)

    (m,) = CalibrationDrift().measure(full, fake_ctx(answer), [FINETUNED])
    assert m.evidence["total"] == 50 and m.raw == 0.0 and len(seen) == 100


def test_drift_uncalibrated_fallback() -> None:
    probe = CalibrationDrift()
    spec = CalibrationDriftSpec(name="drift", items=tuple((p, g) for p, g, *_ in DRIFT_ITEMS))
    (m,) = probe.measure(spec, fake_ctx(drift_answer()), [FINETUNED])
    j = probe.judge(spec, m, None)
    # 1/3 >= 0.15 and mean delta -0.75 < -0.5: FAIL; harm ratio max(2.22, 1.5) -> score 0
    assert j.verdict == Verdict.FAIL and j.z is None and j.score == 0.0
    assert "no null calibration" in j.message and "beyond tolerance" in j.message
    lenient = spec.model_copy(
        update={"assert_fraction_regressed_lt": 0.5, "assert_mean_delta_gte": -1.0}
    )
    j = probe.judge(lenient, m, None)
    # ratio max(0.333/0.5, 0.75/1.0) = 0.75 -> score 1 - 0.375
    assert j.verdict == Verdict.PASS and j.score == pytest.approx(0.625)
    # the mean-delta gate alone can fail it: no regressed item, but -0.6 nats/token on average
    flat = {"regressed": 0, "total": 3, "mean_delta": -0.6}
    m0 = Measurement(raw=0.0, values=(0.0, 0.0, 0.0), evidence=flat)
    assert probe.judge(spec, m0, None).verdict == Verdict.FAIL
    # every null regressed nothing: a fraction still calibrates (beta-binomial), and 1 of 3
    # items is within what 3 items can show by chance, so no harm is claimed
    j = probe.judge(spec, m, null_of(0.0, 0.0, 0.0, 0.0))
    assert j.sig is not None and j.sig.calibrated and j.sig.scale == "fraction"
    assert j.verdict == Verdict.PASS and j.p is not None and j.p > 0.05
    assert "not worse than null" in j.message


def drift_measurement(raw: float, mean_delta: float = 0.0) -> Measurement:
    n = 200
    k = round(raw * n)
    return Measurement(
        raw=raw,
        values=tuple([1.0] * k + [0.0] * (n - k)),
        evidence={"regressed": k, "total": n, "mean_delta": mean_delta},
        trials=n,
    )


NULL_FRACTIONS = (0.02, 0.03, 0.025, 0.04, 0.03, 0.02, 0.035, 0.025)  # mean 0.028125


def test_drift_verdict_direction_against_the_null() -> None:
    probe, spec = CalibrationDrift(), CalibrationDriftSpec(name="drift")
    null = null_of(*NULL_FRACTIONS)
    # much worse than the nulls: more regressions -> negative z -> FAIL
    worse = probe.judge(spec, drift_measurement(0.30), null)
    assert worse.z is not None and worse.z < -3
    assert worse.verdict == Verdict.FAIL and "significantly worse" in worse.message
    # p is the guard rail's claim: the chance a null regresses 60 of 200 items (nulls ~6)
    assert worse.p is not None and worse.p < 1e-10
    assert worse.score is not None and worse.score < 0.5
    # equal to the nulls: PASS, nothing claimed
    equal = probe.judge(spec, drift_measurement(null.mean), null)
    assert equal.verdict == Verdict.PASS and equal.z is not None and abs(equal.z) < 0.5
    assert equal.p is not None and equal.p > 0.3 and "not worse than null" in equal.message
    # better than the nulls: positive z, PASS, and no "better" claim
    better = probe.judge(spec, drift_measurement(0.0), null)
    assert better.z is not None and better.z > 1 and better.verdict == Verdict.PASS
    assert "better" not in better.message and "significantly" not in better.message
    assert better.score == 1.0 and better.p == pytest.approx(1.0)


def test_drift_significant_but_within_tolerance_passes() -> None:
    """5% regressed against nulls at ~0%: significant, but under the 15% gate -> PASS."""
    probe, spec = CalibrationDrift(), CalibrationDriftSpec(name="drift")
    j = probe.judge(spec, drift_measurement(0.05), null_of(0.0, 0.005, 0.0, 0.005, 0.0, 0.005))
    assert j.z is not None and j.z < -3
    assert j.verdict == Verdict.PASS and "within tolerance" in j.message
    assert j.score is not None and j.score >= 0.5


def test_drift_paired_nulls_through_calibrate_and_run_entry() -> None:
    """The runner's own path: each Null view gets the same items; z and p from the pairs."""
    # Null(seed) summed log-probs: seed 1 regresses item 0, the others nothing.
    null_ft = {s: [-2.5, -8.5, -5.0] for s in range(1, 6)}
    null_ft[1] = [-3.5, -8.5, -5.0]
    entry = entry_for(
        "calibration_drift",
        items=[[p, g] for p, g, *_ in DRIFT_ITEMS],
        assert_fraction_regressed_lt=0.3,
    )
    ctx = fake_ctx(drift_answer(null_ft))
    plan = NullPlan(seeds=(1, 2, 3, 4, 5), rank_multipliers=(1.0,), mode="matched", init_scale=0)
    matrix = calibrate([entry], ctx, plan)
    assert [c.raw for c in matrix.cells] == pytest.approx([1 / 3, 0, 0, 0, 0])
    result = run_entry(entry, ctx, matrix)
    null = matrix.stats("g")
    assert null is not None and not null.degenerate
    # 1 of 3 items regressed, as one null of five did: worse than their mean, not significant
    assert result.z is not None and result.z < 0
    assert result.verdict == Verdict.PASS and "not worse than null" in result.message
    assert result.p is not None and result.p > 0.1
    assert result.evidence["significance"]["scale"] == "fraction"
    assert result.ci_95 is not None and result.raw is not None
    assert result.ci_95[0] <= result.raw <= result.ci_95[1]


def test_treatment_order_is_kept() -> None:
    """measure returns one measurement per treatment, in order (base scored once)."""
    calls: list[int] = []

    def answer(r: Request) -> Result:
        assert isinstance(r, ContinuationLogprob)
        shift = {"base": 0.0, "ft": -2.0}.get(r.view.key, -0.5 * getattr(r.view, "seed", 0))
        return ContinuationResult(-1.0 + shift, 1)

    def execute(reqs: Sequence[Request]) -> list[Result]:
        calls.append(len(reqs))
        return [answer(r) for r in reqs]

    ctx = Context(execute=execute, capabilities=CAPS)
    spec = CalibrationDriftSpec(name="drift", items=(("a", " b"), ("c", " d")))
    views: list[View] = [FINETUNED, Null(1), Null(3), BASE]
    ms = CalibrationDrift().measure(spec, ctx, views)
    assert [m.raw for m in ms] == [1.0, 0.0, 1.0, 0.0] and calls == [2 + 2 * 4]


def test_drift_pack_has_200_items() -> None:
    pack = builtin_pack()
    assert len(pack) == PACK_SIZE == 200
    assert all(gold.startswith(" ") and gold.strip() for _, gold, _ in pack)
    assert len({p for p, _, _ in pack}) == 200
    counts = collections.Counter(c for _, _, c in pack)
    assert counts == {
        "geography": 30,
        "science": 30,
        "arithmetic": 20,
        "language": 30,
        "history": 25,
        "biology": 20,
        "technology": 20,
        "misc": 25,
    }


# ---------------------------------------------------------------- external_perplexity, by hand


def test_corpus_is_long_enough_for_the_default_chunks() -> None:
    text = load_corpus("public_domain_en")
    spec = ExternalPerplexitySpec(name="ppl")
    assert len(text) >= spec.max_chunks * spec.chunk_chars and "#" not in text
    chunks = chunk_text(text, spec.chunk_chars, spec.max_chunks)
    assert len(chunks) == spec.max_chunks == 16
    assert all(1024 < len(c) <= 2048 and c == c.strip() for c in chunks)
    # cut at whitespace: the chunks' words are the text's first words, none split
    words = [w for c in chunks for w in c.split()]
    assert words == text.split()[: len(words)]


def test_chunking_and_cleaning() -> None:
    raw = "# provenance\nalpha beta\ngamma\n\n\n# note\ndelta epsilon\n"
    assert clean_corpus(raw) == "alpha beta gamma\n\ndelta epsilon"
    words = " ".join(f"w{i:03d}" for i in range(100))  # 499 chars
    chunks = chunk_text(words, 128, 10)
    assert [len(c) for c in chunks] == [124, 124, 124, 124]  # 25 words each, cut at a space
    assert " ".join(chunks) == words
    assert chunk_text(words, 128, 2) == chunks[:2]
    # no whitespace: a hard cut at 128; the 44-char tail is dropped
    assert chunk_text("x" * 300, 128, 10) == ["x" * 128, "x" * 128]


def test_perplexity_uniform_shift_like_upstream() -> None:
    """Base -2.0 and ft -1.9 nats/token everywhere: delta 0.1 on every chunk."""

    def answer(r: Request) -> Result:
        assert isinstance(r, RollingLogprob)
        n = max(2, len(r.text.split()))
        return rolling(*([-2.0] * n if isinstance(r.view, Base) else [-1.9] * n))

    probe, spec = ExternalPerplexity(), ExternalPerplexitySpec(name="ppl")
    (m,) = probe.measure(spec, fake_ctx(answer), [FINETUNED])
    assert len(m.values) == 16 and all(v == pytest.approx(0.1, abs=1e-9) for v in m.values)
    j = probe.judge(spec, m, None)
    assert j.verdict == Verdict.PASS and j.score == 1.0 and "no null calibration" in j.message


def test_perplexity_hand_computed_uses_backend_token_counts(tmp_path: Path) -> None:
    corpus = tmp_path / "c.txt"
    corpus.write_text("# mine\n" + " ".join(f"w{i:03d}" for i in range(75)) + "\n")
    chunks = chunk_text(load_corpus(str(corpus)), 128, 8)
    assert len(chunks) == 3
    # per chunk: (base log-probs, ft log-probs); token counts differ on purpose
    table = {
        chunks[0]: ((-2.0, -4.0), (-2.0, -3.0)),  # means -3 -> -2.5: +0.5
        chunks[1]: ((-1.0, -1.0, -1.0, -1.0), (-1.0, -1.0, -1.0, -3.0)),  # -1 -> -1.5: -0.5
        chunks[2]: ((-5.0,), (-5.45,)),  # -0.45
    }

    def answer(r: Request) -> Result:
        assert isinstance(r, RollingLogprob)
        base, ft = table[r.text]
        return rolling(*(base if isinstance(r.view, Base) else ft))

    probe = ExternalPerplexity()
    spec = ExternalPerplexitySpec(name="ppl", corpus=str(corpus), chunk_chars=128)
    (m,) = probe.measure(spec, fake_ctx(answer), [FINETUNED])
    assert m.values == pytest.approx((0.5, -0.5, -0.45))
    assert m.raw == pytest.approx(-0.15)
    assert [row["tokens"] for row in m.items] == [2, 4, 1]
    assert m.items[0]["ppl_base"] == pytest.approx(math.exp(3.0))
    # pooled, token-weighted: base -15/7, ft -16.45/7
    assert m.evidence["pooled_delta"] == pytest.approx(-1.45 / 7)
    assert m.evidence["worst_chunk"] == {"chunk": 1, "delta": pytest.approx(-0.5)}
    j = probe.judge(spec, m, None)
    # -0.15 < -0.1: FAIL; harm ratio 1.5 -> score 1 - 0.75
    assert j.verdict == Verdict.FAIL and j.score == pytest.approx(0.25)


def ppl_measurement(raw: float) -> Measurement:
    return Measurement(raw=raw, values=(raw, raw))


def test_perplexity_verdict_direction_against_the_null() -> None:
    probe, spec = ExternalPerplexity(), ExternalPerplexitySpec(name="ppl")
    null = null_of(0.01, -0.01, 0.0, 0.02, -0.02, 0.005, -0.005, 0.0)
    worse = probe.judge(spec, ppl_measurement(-0.5), null)
    assert worse.z is not None and worse.z == pytest.approx((-0.5 - null.mean) / null.std)
    assert worse.z < -3 and worse.verdict == Verdict.FAIL
    assert "significantly worse" in worse.message and worse.p is not None and worse.p < 1e-6
    equal = probe.judge(spec, ppl_measurement(null.mean), null)
    assert equal.verdict == Verdict.PASS and equal.score == 1.0
    assert "not worse than null (z=+0.00" in equal.message and equal.p == pytest.approx(0.5)
    better = probe.judge(spec, ppl_measurement(0.3), null)
    assert better.z is not None and better.z > 3 and better.verdict == Verdict.PASS
    assert "better" not in better.message and "significantly" not in better.message
    assert better.p is not None and better.p > 0.999  # nothing claimed in the good direction


def test_perplexity_less_improvement_than_null_is_not_harm() -> None:
    """On the tiny fixture every adapter *raises* general-text log-prob (nulls +0.52): an
    adapter at +0.30 is far below its nulls (z = -11) but did no harm, so it PASSes."""
    probe, spec = ExternalPerplexity(), ExternalPerplexitySpec(name="ppl")
    null = null_of(0.50, 0.52, 0.54, 0.51, 0.53, 0.49, 0.55, 0.52)
    j = probe.judge(spec, ppl_measurement(0.30), null)
    assert j.z is not None and j.z < -3 and j.verdict == Verdict.PASS
    assert "within tolerance" in j.message and j.score == 1.0
    # a real loss beyond tolerance that random adapters do not cause: FAIL
    assert probe.judge(spec, ppl_measurement(-0.2), null).verdict == Verdict.FAIL


def test_perplexity_uncalibrated_threshold_and_score() -> None:
    probe, spec = ExternalPerplexity(), ExternalPerplexitySpec(name="ppl")
    ok = probe.judge(spec, ppl_measurement(-0.05), None)
    assert ok.verdict == Verdict.PASS and ok.score == pytest.approx(0.75)
    bad = probe.judge(spec, ppl_measurement(-0.5), None)  # upstream: -2.5 vs -2.0 -> FAIL
    assert bad.verdict == Verdict.FAIL and bad.score == 0.0
    assert probe.judge(spec, ppl_measurement(0.0), null_of(0.0, 0.0)).message.endswith(
        "(fixed threshold; only 2 null draw(s); need at least 4)"
    )
    # four equal draws and a raw equal to them: calibrated, no harm, p = 1
    same = probe.judge(spec, ppl_measurement(0.0), null_of(0.0, 0.0, 0.0, 0.0))
    assert same.sig is not None and same.sig.calibrated and same.p == 1.0
    # ... and a raw that differs from a degenerate null cannot be judged: uncalibrated
    off = probe.judge(spec, ppl_measurement(-0.05), null_of(0.0, 0.0, 0.0, 0.0))
    assert off.sig is not None and "null is degenerate" in off.sig.uncalibrated


def test_perplexity_unknown_corpus_is_an_error_row() -> None:
    entry = entry_for("external_perplexity", corpus="no_such_corpus")
    result = run_entry(entry, fake_ctx(lambda r: rolling(-1.0, -1.0)), None)
    assert result.verdict == Verdict.ERROR and "unknown corpus 'no_such_corpus'" in result.message


def test_non_finite_log_prob_is_an_error_row() -> None:
    entry = entry_for("external_perplexity", max_chunks=2)
    result = run_entry(entry, fake_ctx(lambda r: rolling(-1.0, math.nan)), None)
    assert result.verdict == Verdict.ERROR and "non-finite" in result.message


# ---------------------------------------------------------------- specs


def test_upstream_field_names_load() -> None:
    drift = entry_for(
        "calibration_drift",
        pack="builtin",
        items_limit=50,
        assert_fraction_regressed_lt=0.15,
        assert_mean_delta_gte=-0.5,
        assert_z_gte=3.0,
        regression_nats=1.0,
        items=[["The capital of France is", " Paris"]],
    )
    assert drift.category == "calibration" and isinstance(drift.probe, CalibrationDrift)
    ppl = entry_for(
        "external_perplexity",
        corpus="public_domain_en",
        chunk_chars=2048,
        max_chunks=8,
        assert_mean_delta_gte=-0.1,
        assert_z_gte=3.0,
    )
    assert ppl.category == "calibration" and isinstance(ppl.probe, ExternalPerplexity)
    # the upstream README's full-suite entries for these kinds, as written there
    data = yaml.safe_load((DATA / "upstream_full_suite.yaml").read_text())
    mine = {"null_adapter", "calibration_drift", "external_perplexity"}
    data["suite"] = [e for e in data["suite"] if e["kind"] in mine]
    _, entries = parse_spec(data)
    by_kind = {e.spec.kind: e for e in entries}
    assert by_kind["calibration_drift"].spec.items_limit == 50
    assert by_kind["external_perplexity"].spec.max_chunks == 8
    assert {"calibration_drift", "external_perplexity"} <= set(PROBES)


@pytest.mark.parametrize(
    ("kind", "fields", "path"),
    [
        ("calibration_drift", {"bogus": 1}, "suite[0].bogus"),
        ("calibration_drift", {"pack": "mine"}, "suite[0].pack"),
        ("calibration_drift", {"items_limit": 0}, "suite[0].items_limit"),
        ("calibration_drift", {"items": [{"prompt": "p", "gold": ""}]}, "suite[0].items"),
        ("external_perplexity", {"bogus": 1}, "suite[0].bogus"),
        ("external_perplexity", {"chunk_chars": 64}, "suite[0].chunk_chars"),
        ("external_perplexity", {"max_chunks": 0}, "suite[0].max_chunks"),
        ("external_perplexity", {"assert_mean_delta_gte": 0.2}, "suite[0].assert_mean_delta_gte"),
    ],
)
def test_bad_fields_rejected(kind: str, fields: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as info:
        entry_for(kind, **fields)
    assert any(p.startswith(path) for p, _ in info.value.problems), info.value.problems


# ---------------------------------------------------------------- the real fixtures

# Lighter than the defaults to keep the module fast on 2 CPU cores; the pack is complete.
PPL = {"name": "ppl", "kind": "external_perplexity", "max_chunks": 4, "chunk_chars": 1024}
DRIFT = {"name": "drift", "kind": "calibration_drift"}


@pytest.fixture(scope="module")
def session(fx: FixturePaths) -> Iterator[Any]:
    """One loaded base for every fixture test; torch on one thread (on a busy 2-core box,
    two intra-op threads made these forwards ~15x slower), restored afterwards."""
    import torch

    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    backend = HFBackend(str(fx.base))
    try:
        yield backend, Instrumented(backend)
    finally:
        backend.close()
        torch.set_num_threads(threads)


def guard_suite(fx: FixturePaths, *entries: dict[str, Any]) -> tuple[Any, list[Any]]:
    data = yaml.safe_load(Path(fx.suite).read_text())
    null_entry = next(e for e in data["suite"] if e["kind"] == "null_adapter")
    data["suite"] = [null_entry, *entries]
    return parse_spec(data, base_dir=Path(fx.suite).parent)


def run_adapter(session: Any, suite: tuple[Any, list[Any]], adapter: Path) -> Any:
    from sway_engine.runner import run_suite

    backend, inst = session
    backend.load_adapter(str(adapter))
    inst.reset()
    return run_suite(suite[0], suite[1], inst)


def test_fixture_adapters(fx: FixturePaths, session: Any) -> None:
    suite = guard_suite(fx, PPL, DRIFT)
    seen = {}
    for name in ("doc-strong", "noise", "zero"):
        result = run_adapter(session, suite, fx.adapters[name])
        for probe in ("ppl", "drift"):
            r = result.probe(probe)
            seen[name, probe] = r
            z = "none" if r.z is None else f"{r.z:+.2f}"
            print(f"{name:10s} {probe:5s} raw={r.raw:+.5f} z={z} {r.verdict.value}: {r.message}")
    for probe in ("ppl", "drift"):
        zero = seen["zero", probe]
        assert zero.raw is not None and abs(zero.raw) < 1e-4
        # zero nulls, all equal to the zero adapter: calibrated, nothing claimed
        assert zero.verdict == Verdict.PASS and zero.p == 1.0, show(zero)
    assert seen["doc-strong", "drift"].evidence["total"] == 200
    # Positive control: doc-strong regresses far more general items than random directions
    # of its size (measured: 56/200 vs null 0.029 +- 0.018, z = -13.6).
    strong = seen["doc-strong", "drift"]
    assert strong.verdict == Verdict.FAIL and strong.p is not None and strong.p < 1e-3, show(strong)
