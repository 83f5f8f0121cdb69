"""Null LoRA weights for one adapted module, the same on every backend.

A null view replaces each module's trained update `s·B·A` by a random update of the same
structure. The draw is seeded by (view seed, module name) alone, so a module's null does not
depend on which other modules exist or on the order a backend visits them, and the HF and
MLX backends build bit-identical nulls from the same trained weights.

Layout is PEFT's: A is (r, in), B is (out, r); the update is `scaling * B @ A`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

from sway_engine.views import Null

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraWeights:
    """One module's LoRA factors (float32, PEFT layout) and the scaling applied to B @ A."""

    a: np.ndarray
    b: np.ndarray
    scaling: float

    def update(self) -> np.ndarray:
        """The dense update scaling * B @ A, in float64."""
        return self.scaling * (self.b.astype(np.float64) @ self.a.astype(np.float64))


def module_key(name: str) -> str:
    """A backend-neutral module name: PEFT's wrapper prefix removed.

    PEFT names `base_model.model.model.layers.0.self_attn.q_proj`; mlx-lm names the same
    module `model.layers.0.self_attn.q_proj`.
    """
    return name[len(PEFT_PREFIX) :] if name.startswith(PEFT_PREFIX) else name


def module_rng(seed: int, module: str) -> np.random.Generator:
    """A generator seeded from a stable hash of (seed, module name)."""
    digest = hashlib.sha256(f"sway-null\0{seed}\0{module_key(module)}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:16], "little"))


def null_rank(rank: int, rank_scale: float) -> int:
    """The null's real rank: round(r * rank_scale), at least 1 (as the PEFT config does)."""
    return max(1, round(rank * rank_scale))


def rescaled(scaling: float, rank: int, new_rank: int, *, rslora: bool = False) -> float:
    """The scaling a LoRA of `new_rank` gets with the same alpha: alpha/r, or alpha/sqrt(r)."""
    ratio = rank / new_rank
    return scaling * (math.sqrt(ratio) if rslora else ratio)


def null_lora(
    a: np.ndarray,
    b: np.ndarray,
    scaling: float,
    view: Null,
    module: str,
    *,
    rslora: bool = False,
) -> LoraWeights:
    """The null weights of `module` for `view`, given its trained A (r, in) and B (out, r).

    `matched`: a Gaussian direction rescaled so ||s'·B'A'||_F equals the trained ||s·B·A||_F.
    `spectrum`: the trained update's singular values on random orthonormal singular vectors.
    `fixed`: A' and B' entries drawn from N(0, init_scale^2) (upstream's null).
    The update is then multiplied by `view.lam` (1 except on an ablation curve).
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"module {module}: LoRA factors must be A (r, in) and B (out, r), "
            f"got A {a.shape} and B {b.shape}"
        )
    rank = int(a.shape[0])
    r_new = null_rank(rank, view.rank_scale)
    s_new = rescaled(float(scaling), rank, r_new, rslora=rslora)
    rng = module_rng(view.seed, module)
    if view.mode == "spectrum":
        a_new, b_new = _spectrum_factors(a, b, float(scaling), s_new, r_new, rng)
    else:
        a_new = rng.standard_normal((r_new, a.shape[1]))
        b_new = rng.standard_normal((b.shape[0], r_new))
        if view.mode == "fixed":
            c = view.init_scale
        else:
            target = abs(float(scaling)) * update_norm(a.astype(np.float64), b.astype(np.float64))
            have = abs(s_new) * update_norm(a_new, b_new)
            c = math.sqrt(target / have) if have > 0 else 0.0
        a_new, b_new = a_new * c, b_new * c
    return LoraWeights(
        a=a_new.astype(np.float32),
        b=(b_new * view.lam).astype(np.float32),
        scaling=s_new,
    )


def singular_values(a: np.ndarray, b: np.ndarray, scaling: float) -> np.ndarray:
    """Singular values of scaling * B @ A (descending) from two thin QRs and an r x r SVD."""
    qb, rb = np.linalg.qr(b.astype(np.float64))
    qa, ra = np.linalg.qr(a.astype(np.float64).T)
    del qb, qa  # orthonormal: they do not change the singular values
    return abs(scaling) * np.linalg.svd(rb @ ra.T, compute_uv=False)


def _spectrum_factors(
    a: np.ndarray,
    b: np.ndarray,
    scaling: float,
    s_new: float,
    r_new: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray]:
    """A', B' with s'·B'A' = U diag(sigma') V^T: the trained singular values (resampled to
    r_new values, Frobenius norm kept) on Haar-random orthonormal U (out x r'), V (in x r')."""
    sigma = singular_values(a, b, scaling)
    if r_new != sigma.size:
        grid = np.linspace(0.0, 1.0, sigma.size) if sigma.size > 1 else np.zeros(1)
        resampled = np.interp(np.linspace(0.0, 1.0, r_new), grid, sigma)
        norm = float(np.linalg.norm(resampled))
        sigma = resampled * (float(np.linalg.norm(sigma)) / norm) if norm > 0 else resampled
    u = _orthonormal(rng, b.shape[0], r_new)
    v = _orthonormal(rng, a.shape[1], r_new)
    root = np.sqrt(sigma / abs(s_new)) if s_new else np.zeros_like(sigma)
    sign = 1.0 if s_new >= 0 else -1.0
    return (v * root).T, u * root * sign


def _orthonormal(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """`cols` Haar-random orthonormal columns in R^rows (QR of a Gaussian, signs fixed)."""
    q, r = np.linalg.qr(rng.standard_normal((rows, cols)))
    return q * np.sign(np.where(np.diag(r) == 0, 1.0, np.diag(r)))


def update_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||B A||_F without forming B A: sqrt(trace((B^T B)(A A^T))), two r x r products."""
    value = float(np.einsum("ij,ji->", b.T @ b, a @ a.T))
    return math.sqrt(max(value, 0.0))
