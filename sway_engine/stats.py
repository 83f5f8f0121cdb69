"""The one implementation of sway's statistics: divergences, z, p-values, bootstrap CIs.

All natural-log (nats). Every function rejects non-finite input instead of propagating it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from sway_engine.result import NullStats

LN2 = math.log(2.0)
# Raw metrics are nats (or fractions) computed from fp32 log-probabilities, whose rounding
# noise is ~1e-7: a null spread below 1e-6 is rounding, not a distribution (a zero adapter's
# nulls gave std ~1e-9 and z = -178 on float noise under the old 1e-9 floor).
MIN_STD = 1e-6
# A null whose spread is below this fraction of its mean magnitude cannot calibrate.
DEGENERATE_REL_STD = 1e-6


# ---- divergences on full distributions (log-probabilities over one vocabulary) ----


def kl(logp: np.ndarray, logq: np.ndarray) -> float:
    """KL(p || q) = sum_i p_i (log p_i - log q_i), for full log-prob vectors."""
    p = np.exp(logp)
    terms = np.where(p > 0, p * (logp - logq), 0.0)
    return float(max(terms.sum(), 0.0))


def js(logp: np.ndarray, logq: np.ndarray) -> float:
    """Jensen-Shannon divergence in nats, in [0, ln 2]."""
    logm = np.logaddexp(logp, logq) - LN2
    value = 0.5 * kl(logp, logm) + 0.5 * kl(logq, logm)
    return float(min(max(value, 0.0), LN2))


# ---- the upstream top-k + uniform-tail approximation (API backends, parity mode) ----


def topk_tail_js(
    ids_a: Sequence[object] | np.ndarray,
    logp_a: np.ndarray,
    ids_b: Sequence[object] | np.ndarray,
    logp_b: np.ndarray,
) -> float:
    """JS between two top-k slices, aligned by token identity (id or text, never rank).

    Each side's missing mass 1 - sum(top-k) is spread evenly over the union entries that side
    did not report; then both are renormalised (upstream dlm-sway's formula).
    """
    p, q = _aligned(ids_a, logp_a, ids_b, logp_b)
    return js(np.log(np.maximum(p, 1e-300)), np.log(np.maximum(q, 1e-300)))


def topk_tail_kl(
    ids_a: Sequence[object] | np.ndarray,
    logp_a: np.ndarray,
    ids_b: Sequence[object] | np.ndarray,
    logp_b: np.ndarray,
) -> float:
    """KL(b || a) on aligned top-k slices (q floored at 1e-12 as upstream)."""
    p, q = _aligned(ids_a, logp_a, ids_b, logp_b)
    return kl(np.log(np.maximum(q, 1e-300)), np.log(np.maximum(p, 1e-12)))


def _aligned(
    ids_a: Sequence[object] | np.ndarray,
    logp_a: np.ndarray,
    ids_b: Sequence[object] | np.ndarray,
    logp_b: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    for side, lp in (("a", logp_a), ("b", logp_b)):
        if not np.all(np.isfinite(lp)):
            raise ValueError(f"non-finite log-prob in top-k slice {side}")
    if isinstance(ids_a, np.ndarray) and isinstance(ids_b, np.ndarray):
        return _aligned_ids(ids_a, logp_a, ids_b, logp_b)
    support = list(dict.fromkeys([*ids_a, *ids_b]))
    index = {tok: i for i, tok in enumerate(support)}

    def place(ids: Sequence[object] | np.ndarray, lp: np.ndarray) -> np.ndarray:
        vec = np.zeros(len(support))
        known = np.zeros(len(support), dtype=bool)
        for tok, v in zip(ids, lp, strict=True):
            vec[index[tok]] = math.exp(float(v))
            known[index[tok]] = True
        tail = max(0.0, 1.0 - vec.sum())
        if (~known).any():
            vec[~known] = tail / (~known).sum()
        total = vec.sum()
        if not (math.isfinite(total) and total > 0):
            raise ValueError("top-k slice has no probability mass")
        return vec / total

    return place(ids_a, logp_a), place(ids_b, logp_b)


def _aligned_ids(
    ids_a: np.ndarray, logp_a: np.ndarray, ids_b: np.ndarray, logp_b: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`_aligned` for integer id arrays, vectorised (the same vectors, in sorted-id order)."""
    support, inverse = np.unique(np.concatenate([ids_a, ids_b]), return_inverse=True)
    where_a, where_b = inverse[: len(ids_a)], inverse[len(ids_a) :]

    def place(where: np.ndarray, lp: np.ndarray) -> np.ndarray:
        vec = np.zeros(len(support))
        vec[where] = np.exp(lp.astype(np.float64))
        known = np.zeros(len(support), dtype=bool)
        known[where] = True
        if (~known).any():
            vec[~known] = max(0.0, 1.0 - float(vec.sum())) / int((~known).sum())
        total = float(vec.sum())
        if not (math.isfinite(total) and total > 0):
            raise ValueError("top-k slice has no probability mass")
        return vec / total

    return place(where_a, logp_a), place(where_b, logp_b)


# ---- calibration against the null ----


def null_stats(samples: Sequence[float]) -> NullStats:
    """Mean, sample std (ddof=1) and a degenerate flag for a null distribution."""
    xs = np.asarray([s for s in samples if math.isfinite(s)], dtype=float)
    n = int(xs.size)
    if n == 0:
        return NullStats(mean=math.nan, std=math.nan, n=0, samples=(), degenerate=True)
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    degenerate = n < 2 or std < max(MIN_STD, DEGENERATE_REL_STD * abs(mean))
    return NullStats(
        mean=mean, std=std, n=n, samples=tuple(float(x) for x in xs), degenerate=degenerate
    )


def z_score(raw: float, stats: NullStats | None, *, sign: int = 1) -> float | None:
    """sign * (raw - mean) / std; None when the null cannot calibrate (degenerate, n < 2)."""
    if stats is None or stats.degenerate or not math.isfinite(raw):
        return None
    return sign * (raw - stats.mean) / stats.std


def log_z_score(raw: float, stats: NullStats | None) -> float | None:
    """z of log(raw) against the logs of the null samples, for positive scale statistics.

    A divergence of a random direction is right-skewed across directions (it grows with the
    square of a Gaussian logit change), so a few nulls understate the tail and a linear z >= 3
    is reached by chance far more often than 0.13%. On the log scale the null is close to
    symmetric. Falls back to the linear z when a value is not positive or the samples are not
    at hand; None whenever the linear null is degenerate.
    """
    if stats is None or stats.degenerate or not math.isfinite(raw):
        return None
    xs = np.asarray(stats.samples, dtype=float)
    if raw <= 0 or xs.size < 2 or np.any(xs <= 0):
        return z_score(raw, stats)
    return z_score(math.log(raw), null_stats(np.log(xs).tolist()))


def empirical_p(raw: float, stats: NullStats | None, *, sign: int = 1) -> float | None:
    """One-sided p = (1 + #{null at least as extreme}) / (1 + n), extreme in `sign`'s direction."""
    if stats is None or stats.n == 0 or not math.isfinite(raw):
        return None
    xs = np.asarray(stats.samples)
    extreme = int(np.sum(sign * xs >= sign * raw))
    return (1 + extreme) / (1 + stats.n)


def bootstrap_ci(
    samples: Sequence[float], *, n_boot: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean; None for empty or non-finite input."""
    xs = np.asarray(samples, dtype=float)
    if xs.size == 0 or not np.all(np.isfinite(xs)) or not 0 < confidence < 1:
        return None
    if np.all(xs == xs[0]):
        return (float(xs[0]), float(xs[0]))
    rng = np.random.default_rng(seed)
    means = xs[rng.integers(0, xs.size, size=(n_boot, xs.size))].mean(axis=1)
    alpha = 1 - confidence
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def score_from_z(z: float | None) -> float | None:
    """Upstream's logistic(z / 3): z=0 -> 0.5, z=3 -> 0.73."""
    if z is None:
        return None
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z / 3.0))))
