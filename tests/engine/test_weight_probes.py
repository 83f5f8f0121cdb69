"""weight_spectrum and intruder_dimensions: the spectral math on hand-built matrices, the
AdapterWeights request on the hf and mlx backends (never cached, never a forward pass), and the
acceptance on the real fixtures against matched and spectrum nulls."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import nulls
from sway_engine.backends.base import ADAPTER_WEIGHTS, GENERATE, NEXT_TOKEN, NULL_VIEWS
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.errors import ProbeSkip
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.base import Context
from sway_engine.probes.common import spectra
from sway_engine.probes.intruder_dimensions import IntruderDimensions
from sway_engine.probes.weight_spectrum import WeightSpectrum
from sway_engine.requests import AdapterWeights, AdapterWeightsResult, ModuleWeights, Request
from sway_engine.result import Verdict
from sway_engine.runner import run_entry
from sway_engine.score_cache import Identity, ScoreCache, request_key
from sway_engine.suite import parse_spec
from sway_engine.views import FINETUNED, Finetuned, Null, Scaled, View
from tests.conftest import entry_for, like_a_null, show

ZERO_MESSAGE = "the adapter's update is zero in every module"

# ---- the math on hand-built matrices ----


def test_effective_and_stable_rank_of_known_spectra() -> None:
    assert spectra.effective_rank(np.ones(8)) == pytest.approx(8.0)
    assert spectra.effective_rank(np.array([5.0, 0.0, 0.0])) == pytest.approx(1.0)
    # entropy of (3/4, 1/4): exp(-(0.75 ln 0.75 + 0.25 ln 0.25)) = 1.7548
    assert spectra.effective_rank(np.array([3.0, 1.0])) == pytest.approx(1.75476, abs=1e-5)
    assert spectra.stable_rank(np.array([4.0, 3.0])) == pytest.approx(25 / 16)
    assert spectra.stable_rank(np.array([2.0, 2.0, 2.0])) == pytest.approx(3.0)
    assert spectra.effective_rank(np.zeros(4)) is None
    assert spectra.stable_rank(np.zeros(4)) is None


def test_update_stats_of_a_zero_update_divide_by_nothing() -> None:
    a, b = np.ones((4, 6), np.float32), np.zeros((5, 4), np.float32)
    st = spectra.update_stats(a, b, 2.0, base_norm=3.0)
    assert st.zero and st.norm == 0.0 and st.relative_norm == 0.0
    assert st.effective_rank is None and st.stable_rank is None
    rank1 = spectra.update_stats(np.ones((1, 6), np.float32), np.ones((5, 1), np.float32), 2.0, 3.0)
    assert rank1.effective_rank == pytest.approx(1.0) and rank1.stable_rank == pytest.approx(1.0)
    assert rank1.norm == pytest.approx(2.0 * np.sqrt(30)) and rank1.relative_norm > 0


def new_direction(size: float, out: int = 20, inp: int = 20) -> tuple[np.ndarray, ...]:
    """W with distinct singular values 20..1 on the first coordinates, and a rank-1 update of
    singular value `size` along a direction spread evenly over coordinates 11-20 (orthogonal
    to W's top ten singular vectors, cosine 1/sqrt(10) = 0.32 with each of the rest)."""
    n = min(out, inp)
    w = np.zeros((out, inp), np.float32)
    w[np.arange(n), np.arange(n)] = np.arange(n, 0, -1)
    b = np.zeros((out, 1), np.float32)
    b[10:20, 0] = 1 / np.sqrt(10)
    a = np.zeros((1, inp), np.float32)
    a[0, 10:20] = 1 / np.sqrt(10)
    return w, a, b * size


@pytest.mark.parametrize("dense", [True, False])
def test_a_large_new_orthogonal_direction_is_exactly_one_intruder(
    dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spectra, "DENSE_LIMIT", 10_000 if dense else 0)
    w, a, b = new_direction(100.0)
    found = spectra.intruders(spectra.base_spectrum(w), a, b, 1.0, 10, 0.5)
    assert found.count == 1
    # W's own 10..1 on those coordinates tilt it a little: sigma 105.6, overlap just above 0.32
    assert 100.0 <= found.sigma[0] <= 110.0
    assert 1 / np.sqrt(10) - 1e-6 <= found.overlap[0] < 0.4
    assert np.all(found.overlap[1:] > 0.999)  # W's own top directions, kept
    w, a, b = new_direction(0.01)  # the same direction, too small to reach the top 10
    assert spectra.intruders(spectra.base_spectrum(w), a, b, 1.0, 10, 0.5).count == 0


@pytest.mark.parametrize("shape", [(40, 24), (24, 40), (300, 180), (180, 300)])
@pytest.mark.parametrize("dense", [True, False])
def test_top_singular_vectors_match_a_dense_svd_of_w_plus_the_update(
    shape: tuple[int, int], dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(spectra, "DENSE_LIMIT", 10_000 if dense else 0)
    rng = np.random.default_rng(7)
    out, inp = shape
    n = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((out, n)))
    v, _ = np.linalg.qr(rng.standard_normal((inp, n)))
    w = ((u / (1 + np.arange(n)) ** 0.5) @ v.T).astype(np.float32)
    a = (0.3 * rng.standard_normal((4, inp))).astype(np.float32)
    b = (0.3 * rng.standard_normal((out, 4))).astype(np.float32)
    found = spectra.intruders(spectra.base_spectrum(w), a, b, 2.0, 10, 0.5)
    uw = np.linalg.svd(w.astype(np.float64), full_matrices=False)[0]
    up, sp, _ = np.linalg.svd(w + 2.0 * b.astype(np.float64) @ a, full_matrices=False)
    overlap = np.abs(uw.T @ up[:, :10]).max(axis=0)
    assert np.allclose(found.sigma, sp[:10], rtol=1e-4)
    assert np.allclose(found.overlap, overlap, atol=2e-3)
    assert found.count == int((overlap < 0.5).sum())


def test_layer_of_module_names() -> None:
    assert spectra.layer_of("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert spectra.layer_of("transformer.h.11.attn.c_attn") == (11, "attn.c_attn")
    assert spectra.layer_of("lm_head") == (None, "lm_head")


# ---- probes on a fake executor ----


def fake_ctx(
    modules: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, float]],
    caps: frozenset[str] = frozenset({ADAPTER_WEIGHTS, NULL_VIEWS}),
) -> Context:
    """Answers AdapterWeights with the given (W, A, B, scaling) per module for every view."""

    def execute(reqs: Sequence[Request]) -> list[Any]:
        out = []
        for req in reqs:
            assert isinstance(req, AdapterWeights)
            out.append(
                AdapterWeightsResult(
                    tuple(ModuleWeights(k, *v) for k, v in sorted(modules.items()))
                )
            )
        return out

    return Context(execute=execute, capabilities=caps)


def two_modules(b_scale: float = 1.0, r: int = 4) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out = {}
    for i in range(2):
        w = rng.standard_normal((12, 16)).astype(np.float32)
        a = rng.standard_normal((r, 16)).astype(np.float32)
        b = (b_scale * rng.standard_normal((12, r))).astype(np.float32)
        out[f"model.layers.{i}.mlp.up_proj"] = (w, a, b, 2.0)
    return out


@pytest.mark.parametrize("kind", ["weight_spectrum", "intruder_dimensions"])
def test_a_zero_update_says_so_with_no_nan(kind: str) -> None:
    """weight_spectrum claims an effect: a zero update FAILs it. intruder_dimensions guards
    against harm: a zero update does none (PASS, WARN without a null to calibrate it)."""
    entry: Any = entry_for(kind)
    result = run_entry(entry, fake_ctx(two_modules(b_scale=0.0)), None)
    expected = Verdict.FAIL if kind == "weight_spectrum" else Verdict.WARN
    assert result.verdict == expected and ZERO_MESSAGE in result.message
    assert result.raw == 0.0
    assert all(
        v is None or np.isfinite(v)
        for row in result.items
        for v in row.values()
        if not isinstance(v, str)
    )


def test_spectrum_nulls_do_not_calibrate_the_ranks_and_rank_one_updates_skip() -> None:
    entry: Any = entry_for("weight_spectrum")
    with pytest.raises(ProbeSkip, match="equals the adapter's by construction"):
        WeightSpectrum().measure(entry.spec, fake_ctx(two_modules()), [Null(1, mode="spectrum")])
    with pytest.raises(ProbeSkip, match="rank 1"):
        WeightSpectrum().measure(entry.spec, fake_ctx(two_modules(r=1)), [FINETUNED])
    # intruders stay meaningful under spectrum nulls
    intr: Any = entry_for("intruder_dimensions")
    (m,) = IntruderDimensions().measure(
        intr.spec, fake_ctx(two_modules()), [Null(1, mode="spectrum")]
    )
    assert m.trials == 20 and 0 <= m.raw <= 1


@pytest.mark.parametrize("kind", ["weight_spectrum", "intruder_dimensions"])
def test_a_backend_without_adapter_weights_skips(kind: str) -> None:
    api_caps = frozenset({NEXT_TOKEN, GENERATE})  # what the API backend declares at most
    result = run_entry(entry_for(kind), fake_ctx(two_modules(), caps=api_caps), None)  # type: ignore[arg-type]
    assert result.verdict == Verdict.SKIP and "adapter_weights" in result.message


# ---- the request on the real backends ----


@pytest.fixture(scope="module")
def hf(fx: FixturePaths) -> Any:
    from sway_engine.backends.hf import HFBackend

    backend = HFBackend(str(fx.base), fx.adapters["doc-strong"])
    backend.add_adapter(fx.adapters["doc-weak"], "weak")
    yield backend
    backend.close()


def by_name(res: Any) -> dict[str, ModuleWeights]:
    return {m.name: m for m in res.modules}


def test_hf_answers_adapter_weights_with_the_factors_the_model_uses(hf: Any) -> None:
    before = hf.counters()["forward_passes"]
    ft, half, null, weak, weak_null = (
        by_name(r)
        for r in hf.execute(
            [
                AdapterWeights(FINETUNED),
                AdapterWeights(Scaled(0.5)),
                AdapterWeights(Null(3)),
                AdapterWeights(Finetuned("weak")),
                AdapterWeights(Null(3, adapter="weak")),
            ]
        )
    )
    assert hf.counters()["forward_passes"] == before  # read, never forwarded
    assert len(ft) == 28 and "model.layers.0.self_attn.q_proj" in ft
    q = ft["model.layers.0.self_attn.q_proj"]
    assert q.weight.shape == (128, 128) and q.a.shape == (8, 128) and q.b.shape == (128, 8)
    assert q.weight is null["model.layers.0.self_attn.q_proj"].weight  # one W for every view
    for name, m in ft.items():
        assert np.allclose(half[name].scaling * half[name].b, 0.5 * m.scaling * m.b)
        want = nulls.null_lora(m.a, m.b, m.scaling, Null(3), name)
        assert np.array_equal(null[name].a, want.a) and np.array_equal(null[name].b, want.b)
        w = weak[name]
        assert not np.array_equal(w.b, m.b)  # the other adapter's factors
        want = nulls.null_lora(w.a, w.b, w.scaling, Null(3), name)
        assert np.array_equal(weak_null[name].b, want.b)


def test_adapter_weights_are_never_stored_in_the_score_cache(hf: Any, tmp_path: Path) -> None:
    identity = Identity(backend="b", view=lambda v: v.key)
    assert request_key(identity, AdapterWeights(FINETUNED)) is None
    store = ScoreCache(tmp_path / "scores.sqlite")
    session = Instrumented(hf, store=store)
    before = hf.counters()["forward_passes"]
    (res,) = session.execute([AdapterWeights(FINETUNED)])
    assert isinstance(res, AdapterWeightsResult)
    assert store.stats["stored"] == 0 and store.stats["misses"] == 0
    assert hf.counters()["forward_passes"] == before
    session.execute([AdapterWeights(FINETUNED)])  # this run's cache answers the repeat
    assert session.stats["cache_hits"] == 1
    store.close()


def test_mlx_reads_the_same_weights_and_gives_the_same_statistics(
    fx: FixturePaths, hf: Any, tmp_path: Path
) -> None:
    from sway_engine.backends.mlx import MLXBackend

    mlx = MLXBackend(str(fx.base), str(fx.adapters["doc-strong"]), cache_dir=tmp_path)
    try:
        views: list[View] = [FINETUNED, Null(5)]
        for view in views:
            (a,) = hf.execute([AdapterWeights(view)])
            (b,) = mlx.execute([AdapterWeights(view)])
            ha, mb = by_name(a), by_name(b)
            assert sorted(ha) == sorted(mb)
            for name in ha:
                assert np.array_equal(ha[name].weight, mb[name].weight)
                assert np.allclose(ha[name].a, mb[name].a, atol=1e-6)
                assert np.allclose(ha[name].b, mb[name].b, atol=1e-6)
                assert ha[name].scaling == pytest.approx(mb[name].scaling)
        for kind in ("weight_spectrum", "intruder_dimensions"):
            entry: Any = entry_for(kind)
            on = [
                entry.probe.measure(entry.spec, Context(b.execute, b.capabilities), views)
                for b in (hf, mlx)
            ]
            assert [m.raw for m in on[0]] == pytest.approx([m.raw for m in on[1]], rel=1e-5)
    finally:
        mlx.close()


# ---- the acceptance on the fixtures ----


def suite_results(fx: FixturePaths, mode: str, names: Sequence[str]) -> dict[tuple[str, str], Any]:
    from sway_engine.backends.hf import HFBackend
    from sway_engine.runner import run_suite

    data = yaml.safe_load(Path(fx.suite).read_text())
    null = next(e for e in data["suite"] if e["kind"] == "null_adapter")
    data["suite"] = [
        {**null, "mode": mode},
        {"name": "spectrum", "kind": "weight_spectrum"},
        {"name": "intruders", "kind": "intruder_dimensions"},
    ]
    spec, entries = parse_spec(data, base_dir=Path(fx.suite).parent)
    out = {}
    for name in names:
        backend = HFBackend(str(fx.base), fx.adapters[name])
        try:
            result = run_suite(spec, entries, Instrumented(backend))
        finally:
            backend.close()
        for r in result.probes[1:]:
            out[name, r.name] = r
    return out


@pytest.fixture(scope="module")
def matched(fx: FixturePaths) -> dict[tuple[str, str], Any]:
    return suite_results(fx, "matched", ("doc-strong", "noise", "zero"))


def test_doc_strong_is_more_concentrated_than_its_matched_nulls(matched: Any) -> None:
    strong, noise = matched["doc-strong", "spectrum"], matched["noise", "spectrum"]
    numbers = show(strong, noise)
    assert strong.null is not None and strong.null.n >= 8, numbers
    # measured: 7.04 vs nulls 7.88 +- 0.006 (z = +143); a Gaussian rank-8 update sits near 7.9
    assert strong.verdict == Verdict.PASS and strong.z is not None and strong.z >= 10, numbers
    assert strong.raw < strong.null.mean - 0.25, numbers
    assert like_a_null(noise) and noise.verdict == Verdict.FAIL, numbers
    assert len(strong.items) == 28 and strong.evidence["per_layer"][0][0] == 0


def test_doc_strong_has_an_intruder_count_unlike_its_matched_nulls(matched: Any) -> None:
    strong, noise = matched["doc-strong", "intruders"], matched["noise", "intruders"]
    numbers = show(strong, noise)
    # measured: 117 intruders vs nulls 170 +- 6 (z = +6.3, oriented safe: fewer): a random
    # update of the same (large) size replaces more of W's top directions than the trained one
    assert strong.z is not None and strong.z >= 3, numbers
    assert strong.verdict == Verdict.PASS and "fewer than random" in strong.message, numbers
    # a guard rail: the noise adapter is a random update, never worse than its own kind
    assert like_a_null(noise) and noise.verdict == Verdict.PASS, numbers


def test_significantly_more_intruders_than_random_updates_fails_the_guard_rail() -> None:
    """The harm side has power: 40 of 280 directions intruding where random updates of the
    same size make 14 +- 3 is a FAIL; within the nulls' spread it is not."""
    from sway_engine.probes.base import Measurement
    from sway_engine.probes.intruder_dimensions import IntruderDimensionsSpec
    from sway_engine.result import NullStats

    probe, spec = IntruderDimensions(), IntruderDimensionsSpec(name="i")
    samples = tuple(x / 280 for x in (10, 11, 12, 13, 13, 14, 14, 14, 15, 15, 16, 16, 17, 18))
    null = NullStats(
        mean=float(np.mean(samples)),
        std=float(np.std(samples, ddof=1)),
        n=14,
        samples=samples,
        degenerate=False,
    )

    def judged(count: int) -> Any:
        evidence = {"intruders": count, "modules": 28}
        return probe.judge(spec, Measurement(count / 280, evidence=evidence, trials=280), null)

    more, usual = judged(40), judged(15)
    assert more.verdict == Verdict.FAIL and more.z is not None and more.z < -3, more
    assert usual.verdict == Verdict.PASS, usual


def test_the_zero_adapter_says_its_update_is_zero(matched: Any) -> None:
    for probe in ("spectrum", "intruders"):
        zero = matched["zero", probe]
        assert ZERO_MESSAGE in zero.message, show(zero)
        assert zero.raw == 0.0 and all(row.get("update_norm", 0.0) == 0.0 for row in zero.items)
    # no effect to claim; and no harm (a guard rail), though its nulls cannot calibrate it
    assert matched["zero", "spectrum"].verdict == Verdict.FAIL
    assert matched["zero", "intruders"].verdict in (Verdict.PASS, Verdict.WARN)


def test_spectrum_nulls_leave_the_ranks_uncalibrated_but_calibrate_intruders(
    fx: FixturePaths,
) -> None:
    got = suite_results(fx, "spectrum", ("doc-strong",))
    ranks, intr = got["doc-strong", "spectrum"], got["doc-strong", "intruders"]
    assert ranks.verdict == Verdict.WARN and "by construction" in ranks.evidence["uncalibrated"]
    assert intr.null is not None and intr.null.n >= 8 and intr.p is not None, show(intr)


def test_each_weight_probe_draws_its_per_layer_plot(matched: Any) -> None:
    pytest.importorskip("matplotlib")
    from sway_engine.report import plots

    for probe in ("spectrum", "intruders"):
        result = matched["doc-strong", probe]
        assert [layer for layer, _ in result.evidence["per_layer"]] == [0, 1, 2, 3]
        png = plots.plot_of(result)
        assert png is not None and png.startswith(b"\x89PNG") and png == plots.layer_plot(result)
