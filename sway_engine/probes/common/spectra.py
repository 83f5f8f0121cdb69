"""Spectra of LoRA updates and of the weights they change, for the `weights` probes.

A module's update is dW = s·B·A (B: out × r, A: r × in). Its r singular values come from two
thin QRs and an r × r SVD (`nulls.singular_values`). The top singular vectors of W + dW come
from W's thin SVD W = U diag(σ) Vᵀ, computed once per module and shared by every view: in the
bases [U, Q_B] and [V, Q_A] (sB − UUᵀsB = Q_B R_B and Aᵀ − VVᵀAᵀ = Q_A R_A: the parts outside
W's singular vectors, present only when W is not square)

    W + dW = [U Q_B] · (diag(σ) + L Rᵀ) · [V Q_A]ᵀ,    L = [Uᵀ·sB; R_B],  R = [Vᵀ·Aᵀ; R_A]

so the singular vectors of W + dW are those of a diagonal plus a rank-r matrix, and the
cosine of a left singular vector with W's i-th left singular vector u_i is its i-th
coordinate. A view then costs O(n·r·k) per iteration, never a dense SVD of W + dW.
"""

from __future__ import annotations

import math
import re
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from sway_engine import nulls

# Up to this size (n + r) the small matrix is decomposed densely (exact); above, by subspace
# iteration started from W's top directions and the update's.
DENSE_LIMIT = 160
OVERSAMPLE = 8
ITERATIONS = 8

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.(.+)$")


def layer_of(module: str) -> tuple[int | None, str]:
    """(block index, module path inside the block) of a module name; (None, name) without one.
    `model.layers.3.self_attn.q_proj` -> (3, "self_attn.q_proj")."""
    m = _LAYER.search(module)
    return (int(m.group(1)), m.group(2)) if m else (None, module)


def effective_rank(sigma: np.ndarray) -> float | None:
    """exp of the entropy of the normalised singular values (Roy & Vetterli 2007), in [1, r];
    None for a zero matrix."""
    s = np.asarray(sigma, dtype=np.float64)
    total = float(s.sum())
    if not total > 0:
        return None
    p = s[s > 0] / total
    return math.exp(float(-(p * np.log(p)).sum()))


def stable_rank(sigma: np.ndarray) -> float | None:
    """||M||_F² / ||M||_2² = Σσ² / σ_max², in [1, r]; None for a zero matrix."""
    s = np.asarray(sigma, dtype=np.float64)
    top = float(s.max()) if s.size else 0.0
    if not top > 0:
        return None
    return float(((s / top) ** 2).sum())


@dataclass(frozen=True)
class UpdateStats:
    """One module's update: its singular values and the statistics of `weight_spectrum`."""

    sigma: np.ndarray
    norm: float
    relative_norm: float
    effective_rank: float | None
    stable_rank: float | None

    @property
    def zero(self) -> bool:
        return not self.norm > 0


def update_stats(a: np.ndarray, b: np.ndarray, scaling: float, base_norm: float) -> UpdateStats:
    """||s·B·A||_F, that over ||W||_F (`base_norm`), effective and stable rank of the update
    (None where the update is zero; a zero W makes the relative norm infinite, never NaN)."""
    sigma = nulls.singular_values(a, b, scaling)
    norm = float(np.sqrt((sigma**2).sum()))
    return UpdateStats(
        sigma=sigma,
        norm=norm,
        relative_norm=norm / base_norm if base_norm > 0 else math.inf if norm > 0 else 0.0,
        effective_rank=effective_rank(sigma),
        stable_rank=stable_rank(sigma),
    )


@dataclass(frozen=True)
class BaseSpectrum:
    """W's thin SVD: U (out × n) and V (in × n) float32, σ (n, descending) float64,
    n = min(out, in)."""

    u: np.ndarray
    sigma: np.ndarray
    v: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.u.nbytes + self.sigma.nbytes + self.v.nbytes)


# W's SVDs kept between measure calls (the null matrix, then the adapter) while the backend
# holds the weight array (one read-only array per module); least recently used out past this.
MEMO_BYTES = 1 << 30
_memo: OrderedDict[int, tuple[weakref.ref[np.ndarray], BaseSpectrum]] = OrderedDict()


def base_spectrum(weight: np.ndarray) -> BaseSpectrum:
    """The thin SVD of W (LAPACK gesdd in float32, gesvd where gesdd does not converge).
    A read-only W (as backends return it) is decomposed once and remembered while it lives."""
    key = id(weight)
    hit = _memo.get(key)
    if hit is not None and hit[0]() is weight:
        _memo.move_to_end(key)
        return hit[1]
    w = np.asarray(weight, dtype=np.float32)
    try:
        u, s, vt = scipy.linalg.svd(w, full_matrices=False, check_finite=False)
    except np.linalg.LinAlgError:
        u, s, vt = scipy.linalg.svd(
            w, full_matrices=False, check_finite=False, lapack_driver="gesvd"
        )
    spectrum = BaseSpectrum(u, s.astype(np.float64), np.ascontiguousarray(vt.T))
    if not weight.flags.writeable and spectrum.nbytes <= MEMO_BYTES:
        _memo[key] = (weakref.ref(weight), spectrum)
        weakref.finalize(weight, _memo.pop, key, None)
        while sum(kept.nbytes for _, kept in _memo.values()) > MEMO_BYTES:
            _memo.popitem(last=False)
    return spectrum


@dataclass(frozen=True)
class Intruders:
    """The top-k left singular vectors of W + dW against W's: `overlap[j]` = max_i |cos(y_j, u_i)|
    over all n of W's left singular vectors; an intruder has overlap below the threshold."""

    sigma: np.ndarray  # top-k singular values of W + dW
    overlap: np.ndarray
    count: int


def intruders(
    base: BaseSpectrum,
    a: np.ndarray,
    b: np.ndarray,
    scaling: float,
    top_k: int,
    threshold: float,
) -> Intruders:
    """Intruder dimensions of W + s·B·A (Shuttleworth et al. 2024): of its top-k left singular
    vectors, those whose best |cosine| with any left singular vector of W is below
    `threshold`."""
    sigma, left = top_left(base, a, b, scaling, top_k)
    n = base.sigma.size
    overlap = np.abs(left[:n]).max(axis=0) if n else np.zeros(left.shape[1])
    return Intruders(sigma, overlap, int((overlap < threshold).sum()))


def top_left(
    base: BaseSpectrum, a: np.ndarray, b: np.ndarray, scaling: float, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k singular values of W + s·B·A and their left singular vectors in the basis
    [U, Q_B] (first n coordinates: cosines with W's left singular vectors)."""
    u, s, v = base.u, base.sigma, base.v
    n = s.size
    bs = (float(scaling) * b).astype(np.float32)
    at = np.ascontiguousarray(a.T, dtype=np.float32)
    left_in = u.T @ bs  # n × r, float32 products over the long side
    right_in = v.T @ at
    extra_l = _outside(bs - u @ left_in) if u.shape[0] > n else None
    extra_r = _outside(at - v @ right_in) if v.shape[0] > n else None
    left_in, right_in = left_in.astype(np.float64), right_in.astype(np.float64)
    big_l = left_in if extra_l is None else np.vstack([left_in, extra_l])
    big_r = right_in if extra_r is None else np.vstack([right_in, extra_r])
    rows, cols = big_l.shape[0], big_r.shape[0]
    k = min(k, rows, cols)

    def times(x: np.ndarray) -> np.ndarray:  # M x
        y = big_l @ (big_r.T @ x)
        y[:n] += s[:, None] * x[:n]
        return y

    def times_t(y: np.ndarray) -> np.ndarray:  # Mᵀ y
        x = big_r @ (big_l.T @ y)
        x[:n] += s[:, None] * y[:n]
        return x

    if max(rows, cols) <= DENSE_LIMIT:
        m = big_l @ big_r.T
        m[np.arange(n), np.arange(n)] += s
        # the top of the Gram M Mᵀ: a symmetric eigensolve is half an SVD's time (0.9 ms
        # against 1.8-2.0 ms at the fixture's 136 x 128), top singular pairs equal to 1e-14
        eig, vecs = np.linalg.eigh(m @ m.T)
        return np.sqrt(np.maximum(eig[::-1][:k], 0.0)), vecs[:, ::-1][:, :k]
    return _subspace_top(times, times_t, big_r, n, cols, k)


def _outside(residual: np.ndarray) -> np.ndarray:
    """R of the residual's QR: the coordinates of its columns in a basis orthogonal to W's."""
    _, r = np.linalg.qr(residual.astype(np.float64))
    return r


def _subspace_top(
    times: Callable[[np.ndarray], np.ndarray],
    times_t: Callable[[np.ndarray], np.ndarray],
    big_r: np.ndarray,
    n: int,
    cols: int,
    k: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k singular triplets of M by subspace iteration, started from W's top k + p right
    singular directions (unit vectors here) and the update's right directions."""
    width = min(cols, k + OVERSAMPLE + big_r.shape[1])
    start = np.zeros((cols, width))
    top = min(n, width - big_r.shape[1])
    start[np.arange(top), np.arange(top)] = 1.0
    start[:, top:] = big_r[:, : width - top]
    x, _ = np.linalg.qr(start)
    for _ in range(ITERATIONS):
        x, _ = np.linalg.qr(times_t(times(x)))
    q, _ = np.linalg.qr(times(x))
    small = times_t(q).T  # qᵀ M, width × cols
    ul, sv, _ = np.linalg.svd(small, full_matrices=False)
    return sv[:k], (q @ ul)[:, :k]
