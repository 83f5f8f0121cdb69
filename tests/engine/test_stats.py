"""stats.py: divergences, z, p-values and CIs, with hand-computed numbers."""

import math

import numpy as np
import pytest

from sway_engine import stats


def logs(*p: float) -> np.ndarray:
    return np.log(np.asarray(p))


def test_js_matches_hand_computation() -> None:
    # p = (0.9, 0.05, 0.05), q = (0.3, 0.35, 0.35): m = (0.6, 0.2, 0.2)
    p, q = logs(0.9, 0.05, 0.05), logs(0.3, 0.35, 0.35)
    kl_pm = 0.9 * math.log(0.9 / 0.6) + 2 * 0.05 * math.log(0.05 / 0.2)
    kl_qm = 0.3 * math.log(0.3 / 0.6) + 2 * 0.35 * math.log(0.35 / 0.2)
    assert stats.js(p, q) == pytest.approx(0.5 * (kl_pm + kl_qm), abs=1e-12)
    assert stats.js(p, q) == pytest.approx(0.2050, abs=1e-4)


def test_js_bounds_and_symmetry() -> None:
    p, q = logs(1.0, 1e-300), logs(1e-300, 1.0)
    assert stats.js(p, q) == pytest.approx(math.log(2), abs=1e-9)
    a, b = logs(0.8, 0.2), logs(0.4, 0.6)
    assert stats.js(a, b) == pytest.approx(stats.js(b, a))
    assert stats.js(a, a) == 0.0


def test_kl_direction() -> None:
    base, ft = logs(0.8, 0.2), logs(0.4, 0.6)
    expected = 0.4 * math.log(0.4 / 0.8) + 0.6 * math.log(0.6 / 0.2)
    assert stats.kl(ft, base) == pytest.approx(expected)


def test_topk_tail_aligns_by_token_not_rank() -> None:
    # Same two tokens, listed in opposite rank order on each side: identical distributions.
    js = stats.topk_tail_js(("a", "b"), logs(0.7, 0.3), ("b", "a"), logs(0.3, 0.7))
    assert js == pytest.approx(0.0, abs=1e-12)


def test_topk_tail_spreads_missing_mass_over_unreported_ids() -> None:
    # a reports {x: .5}, tail .5 lands on y (reported only by b).
    js = stats.topk_tail_js(("x",), logs(0.5), ("y",), logs(0.5))
    assert js == pytest.approx(stats.js(logs(0.5, 0.5), logs(0.5, 0.5)), abs=1e-12)


def test_null_stats_sample_std_and_degenerate() -> None:
    s = stats.null_stats([1.0, 2.0, 3.0])
    assert (s.mean, s.std, s.n, s.degenerate) == (2.0, 1.0, 3, False)
    assert stats.null_stats([0.5]).degenerate
    assert stats.null_stats([0.0, 0.0, 0.0]).degenerate
    assert stats.null_stats([]).n == 0


def test_z_and_empirical_p() -> None:
    s = stats.null_stats([0.0, 0.01, 0.02])  # mean .01, std .01
    assert stats.z_score(0.08, s) == pytest.approx(7.0)
    assert stats.z_score(0.08, stats.null_stats([1.0])) is None
    # raw above all 3 nulls: p = 1/4; raw below all: p = 4/4
    assert stats.empirical_p(0.08, s) == pytest.approx(0.25)
    assert stats.empirical_p(-1.0, s) == pytest.approx(1.0)
    # lower-is-better direction
    assert stats.empirical_p(-1.0, s, sign=-1) == pytest.approx(0.25)


def test_bootstrap_ci() -> None:
    assert stats.bootstrap_ci([0.3, 0.3]) == (0.3, 0.3)
    assert stats.bootstrap_ci([]) is None
    assert stats.bootstrap_ci([1.0, float("nan")]) is None
    lo, hi = stats.bootstrap_ci(list(np.linspace(0, 1, 32)), seed=0)  # type: ignore[misc]
    assert lo < 0.5 < hi and hi - lo < 0.25


def test_score_from_z() -> None:
    assert stats.score_from_z(0.0) == 0.5
    assert stats.score_from_z(3.0) == pytest.approx(0.731, abs=1e-3)
    assert stats.score_from_z(None) is None


def test_rounding_noise_is_a_degenerate_null() -> None:
    """A zero adapter's nulls differ only by fp32 rounding: no z-score from that spread."""
    noise = [3e-7, -2e-7, 1e-7, -4e-7, 2e-7, 0.0, -1e-7, 3e-7]
    null = stats.null_stats(noise)
    assert null.degenerate and stats.z_score(-3.6e-7, null) is None
    assert not stats.null_stats([0.010, 0.012, 0.011, 0.013]).degenerate


def test_log_z_scores_a_skewed_null_on_the_log_scale() -> None:
    # nulls e^-4, e^-3, e^-2 (log mean -3, log std 1); raw e^0 -> z = 3 exactly
    null = stats.null_stats([math.exp(-4), math.exp(-3), math.exp(-2)])
    assert stats.log_z_score(1.0, null) == pytest.approx(3.0)
    # the linear z of the same raw is larger: the skewed tail made it easy to pass
    linear = stats.z_score(1.0, null)
    assert linear is not None and linear > 10
    # a value or sample that is not positive: the linear z; a degenerate null: no z
    with_zero = stats.null_stats([0.0, 0.1, 0.2])
    assert stats.log_z_score(0.5, with_zero) == stats.z_score(0.5, with_zero)
    assert stats.log_z_score(0.0, null) == stats.z_score(0.0, null)
    assert stats.log_z_score(1.0, stats.null_stats([1e-9, 1e-9])) is None
    assert stats.log_z_score(1.0, None) is None


def test_id_arrays_align_like_the_generic_path() -> None:
    rng = np.random.default_rng(0)
    ids_a, ids_b = np.array([5, 9, 2, 7]), np.array([9, 3, 5, 11])
    lp_a = np.log(rng.dirichlet(np.ones(5))[:4])
    lp_b = np.log(rng.dirichlet(np.ones(5))[:4])
    fast = stats.topk_tail_js(ids_a, lp_a, ids_b, lp_b)
    generic = stats.topk_tail_js(tuple(ids_a.tolist()), lp_a, tuple(ids_b.tolist()), lp_b)
    assert fast == pytest.approx(generic, abs=1e-12)
    kl_fast = stats.topk_tail_kl(ids_a, lp_a, ids_b, lp_b)
    kl_generic = stats.topk_tail_kl(tuple(ids_a.tolist()), lp_a, tuple(ids_b.tolist()), lp_b)
    assert kl_fast == pytest.approx(kl_generic, abs=1e-12)


def test_token_dists_of_one_vocabulary_align_by_id_and_decode_only_on_demand() -> None:
    from sway_engine.probes.common.divergence import topk_divergence
    from sway_engine.requests import TokenDist

    calls: list[list[int]] = []

    def decode(ids: list[int]) -> list[str]:
        calls.append(ids)
        return ["same"] * len(ids)  # a decoder that would merge every token if used

    lp = np.log(np.array([0.6, 0.3]))
    a = TokenDist(np.array([1, 2]), lp, 10, 0.1, vocabulary="tok:10", decode=decode)
    b = TokenDist(np.array([2, 1]), lp, 10, 0.1, vocabulary="tok:10", decode=decode)
    assert topk_divergence(a, b, "js") > 0.01 and calls == []  # by id: ids 1 and 2 differ in mass
    # another vocabulary: decoded text decides (here every token decodes alike)
    c = TokenDist(np.array([2, 1]), lp, 10, 0.1, vocabulary="other:10", decode=decode)
    assert topk_divergence(a, c, "js") == pytest.approx(0.0, abs=1e-12) and len(calls) == 2
    assert a.texts() == ("same", "same")
