"""The one implementation of sway's statistics: divergences, z, p-values, bootstrap CIs.

All natural-log (nats). Every function rejects non-finite input instead of propagating it.
Significance against the null adapters is `significance()`; docs/PROBES.md gives the rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sway_engine.result import NullStats

Scale = Literal["linear", "log", "fraction"]
# The significance level of a per-probe claim (after Benjamini-Hochberg across a suite).
DEFAULT_ALPHA = 0.01
# Fewer null draws than this cannot estimate a spread: the probe is uncalibrated.
MIN_NULLS = 4

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
    """Mean, sample std (ddof=1) and a degenerate flag for a null distribution; non-finite
    draws are left out and counted (`non_finite`), so a probe can refuse to calibrate on them."""
    all_xs = np.asarray(list(samples), dtype=float)
    xs = all_xs[np.isfinite(all_xs)]
    dropped = int(all_xs.size - xs.size)
    n = int(xs.size)
    if n == 0:
        return NullStats(math.nan, math.nan, 0, (), True, non_finite=dropped)
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    degenerate = n < 2 or std < max(MIN_STD, DEGENERATE_REL_STD * abs(mean))
    return NullStats(mean, std, n, tuple(float(x) for x in xs), degenerate, non_finite=dropped)


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


def calibration_problem(null: NullStats | None, *, min_nulls: int = MIN_NULLS) -> str:
    """Why `null` cannot calibrate a probe ("" when it can): missing, too few finite draws, or
    any draw non-finite (a NaN null must never lead to a PASS)."""
    if null is None:
        return "no null calibration"
    if null.non_finite:
        return f"{null.non_finite} of {null.n + null.non_finite} null draws are not finite"
    if null.n < min_nulls:
        return f"only {null.n} null draw(s); need at least {min_nulls}"
    return ""


@dataclass(frozen=True)
class Significance:
    """How unusual the adapter's raw is for one more draw of the null family.

    `p`: one-sided predictive p (oriented: small = beyond the nulls in the probe's good
    direction); `z`: the same distance in null sds on the calibration scale; `p_rank`: the
    empirical rank p, reported beside. `uncalibrated` says why there is no p ("" if there is).
    """

    z: float | None
    p: float | None
    p_rank: float | None
    scale: str
    n: int
    alpha: float = DEFAULT_ALPHA
    z_floor: float | None = None
    uncalibrated: str = ""

    @property
    def calibrated(self) -> bool:
        return not self.uncalibrated

    @property
    def significant(self) -> bool:
        """p <= alpha, and z >= z_floor when a spec set an explicit z threshold."""
        if self.p is None or self.p > self.alpha:
            return False
        return self.z_floor is None or (self.z is not None and self.z >= self.z_floor)

    def describe(self) -> str:
        if not self.calibrated:
            return f"uncalibrated: {self.uncalibrated}"
        z = "" if self.z is None else f"z={self.z:+.2f}, "
        return f"{z}p={self.p:.2g} ({self.scale} scale, {self.n} nulls)"


def significance(
    raw: float,
    null: NullStats | None,
    *,
    sign: int = 1,
    scale: Scale = "linear",
    trials: int | None = None,
    alpha: float = DEFAULT_ALPHA,
    z_floor: float | None = None,
    min_nulls: int = MIN_NULLS,
) -> Significance:
    """The one significance rule for calibrated probes (docs/PROBES.md, "Significance").

    Continuous statistics: the predictive distribution of one more null draw, Student t with
    n-1 df and scale sd*sqrt(1+1/n), on log(x) for `log` (positive, right-skewed divergences)
    and x for `linear`. Fractions k/`trials`: a beta-binomial predictive fitted to the null
    fractions (Jeffreys-smoothed rate, overdispersion by moments), exact in the tail, so
    near-degenerate discrete nulls neither explode nor vanish. A null whose draws are all
    equal gives p = 1 for a raw equal to them or on the side nothing is claimed on, and is
    uncalibrated otherwise (its spread is unknown).
    """
    why = calibration_problem(null, min_nulls=min_nulls)
    if null is None or why or not math.isfinite(raw):
        why = why or f"non-finite raw {raw}"
        return Significance(
            None, None, None, scale, 0 if null is None else null.n, alpha, z_floor, why
        )
    p_rank = empirical_p(raw, null, sign=sign)
    xs = np.asarray(null.samples, dtype=float)
    n = int(xs.size)
    if scale == "fraction" and trials:
        z, p = _beta_binomial(raw, xs, trials, sign)
        return Significance(z, p, p_rank, scale, n, alpha, z_floor)
    # Degeneracy is judged on the raw scale: fp32 noise around zero (a zero adapter's nulls)
    # is no spread, however far apart its logarithms are.
    mean, sd = float(xs.mean()), float(xs.std(ddof=1))
    floor = max(MIN_STD, DEGENERATE_REL_STD * abs(mean))
    if sd < floor:
        if sign * (raw - mean) <= floor:  # at the null, or on the side nothing is claimed on
            z0 = 0.0 if abs(raw - mean) <= floor else None
            return Significance(z0, 1.0, p_rank, "linear", n, alpha, z_floor)
        why = f"null is degenerate (every draw {mean:.4g}), the raw is not"
        return Significance(None, None, p_rank, "linear", n, alpha, z_floor, why)
    used: str = scale if scale != "fraction" else "linear"
    x = raw
    if used == "log":
        if raw > 0 and np.all(xs > 0):
            x, xs = math.log(raw), np.log(xs)
            mean, sd = float(xs.mean()), float(xs.std(ddof=1))
        else:
            used = "linear"
    z = sign * (x - mean) / sd
    p = student_t_sf(z / math.sqrt(1.0 + 1.0 / n), n - 1)
    return Significance(z, p, p_rank, used, n, alpha, z_floor)


def student_t_sf(t: float, df: int) -> float:
    """P(T >= t) for Student's t with `df` degrees of freedom."""
    from scipy.special import stdtr

    return float(stdtr(df, -t))


def z_for_alpha(alpha: float, n: int) -> float:
    """The z a continuous statistic needs for predictive p <= alpha with n nulls."""
    from scipy.special import stdtrit

    return float(-stdtrit(n - 1, alpha)) * math.sqrt(1.0 + 1.0 / n)


def _beta_binomial(
    raw: float, fractions: np.ndarray, trials: int, sign: int
) -> tuple[float, float]:
    """(z, p) of k = round(raw * trials) under a beta-binomial fitted to the null fractions."""
    from scipy.special import betaln, gammaln

    n_trials = int(trials)
    ks = np.clip(np.rint(fractions * n_trials), 0, n_trials)
    k = int(np.clip(round(raw * n_trials), 0, n_trials))
    pooled = n_trials * ks.size
    mu = (float(ks.sum()) + 0.5) / (pooled + 1.0)
    binom_var = mu * (1.0 - mu) / n_trials
    spread = float(np.var(ks / n_trials, ddof=1)) if ks.size > 1 else 0.0
    rho = (spread / binom_var - 1.0) / (n_trials - 1) if n_trials > 1 and binom_var > 0 else 0.0
    conc = pooled + 1.0 if rho <= 0 else min(1.0 / rho - 1.0, pooled + 1.0)
    a, b = mu * conc, (1.0 - mu) * conc
    support = np.arange(n_trials + 1)
    log_pmf = (
        gammaln(n_trials + 1)
        - gammaln(support + 1)
        - gammaln(n_trials - support + 1)
        + betaln(support + a, n_trials - support + b)
        - betaln(a, b)
    )
    pmf = np.exp(log_pmf - log_pmf.max())
    pmf /= pmf.sum()
    tail = pmf[support >= k].sum() if sign > 0 else pmf[support <= k].sum()
    sd = math.sqrt(n_trials * mu * (1 - mu) * (a + b + n_trials) / (a + b + 1.0)) / n_trials
    z = sign * (raw - mu) / sd if sd > 0 else 0.0
    return z, float(min(1.0, tail))


def benjamini_hochberg(ps: Sequence[float]) -> list[float]:
    """BH-adjusted p-values (q), in input order: q_(i) = min over j >= i of p_(j) * m / j."""
    m = len(ps)
    if m == 0:
        return []
    order = sorted(range(m), key=lambda i: ps[i])
    qs = [0.0] * m
    running = 1.0
    for rank in range(m, 0, -1):
        i = order[rank - 1]
        running = min(running, ps[i] * m / rank)
        qs[i] = min(1.0, running)
    return qs


def bootstrap_ci(
    samples: Sequence[float],
    *,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    weights: Sequence[float] | None = None,
) -> tuple[float, float] | None:
    """Percentile bootstrap CI of the mean; None for empty or non-finite input.

    With `weights` (one per sample, > 0) the statistic is the weighted mean sum(w x) / sum(w),
    samples and their weights resampled together (a ratio estimator: per-document means
    weighted by token counts give the pooled per-token mean).
    """
    xs = np.asarray(samples, dtype=float)
    if xs.size == 0 or not np.all(np.isfinite(xs)) or not 0 < confidence < 1:
        return None
    ws = np.ones_like(xs) if weights is None else np.asarray(weights, dtype=float)
    if ws.shape != xs.shape or not np.all(np.isfinite(ws)) or not np.all(ws > 0):
        return None
    if np.all(xs == xs[0]):
        return (float(xs[0]), float(xs[0]))
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, xs.size, size=(n_boot, xs.size))
    means = (xs[pick] * ws[pick]).sum(axis=1) / ws[pick].sum(axis=1)
    alpha = 1 - confidence
    lo, hi = np.percentile(means, [100 * alpha / 2, 100 * (1 - alpha / 2)])
    return (float(lo), float(hi))


def score_from_z(z: float | None) -> float | None:
    """Upstream's logistic(z / 3): z=0 -> 0.5, z=3 -> 0.73."""
    if z is None:
        return None
    return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z / 3.0))))
