"""Pydantic models of `sway.yaml` version 1 (upstream dlm-sway compatible) plus our additions.

Plain models: loading and validating a file is `sway_engine.suite`. Our additions live under
`defaults` (null, divergence_mode, alpha, allow_uncalibrated, score, mlflow) and a few model fields;
everything else matches upstream, unknown keys rejected.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

CATEGORIES = ("adherence", "attribution", "calibration", "ablation", "baseline", "weights")
# `weights` (the adapter-native diagnostics) informs and gates but earns no score by default;
# a suite may give it a weight (defaults.score_weights).
DEFAULT_WEIGHTS = {
    "adherence": 0.30,
    "attribution": 0.35,
    "calibration": 0.20,
    "ablation": 0.15,
    "baseline": 0.0,
    "weights": 0.0,
}


# Every model of a sway.yaml: unknown keys refused, values frozen, and no NaN or infinity in a
# number (`.nan` or `.inf` in YAML turned thresholds into comparisons that never hold).
STRICT = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class _Strict(BaseModel):
    model_config = STRICT


class ModelSpec(_Strict):
    kind: Literal["hf", "mlx", "api", "dummy", "custom"] = "hf"
    base: str
    adapter: str | None = None
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    entry_point: str | None = None
    endpoint: str | None = None
    # Ours: let kind api send its key over plain http to a non-loopback host (trusted networks).
    allow_insecure_http: bool = False
    # Ours, kind api: each HTTP attempt's deadline and the retries of one request (all of them
    # end within api.RETRY_BUDGET x timeout_s). How to reach a server, not what is measured:
    # left out of the spec hash.
    timeout_s: float = Field(default=60.0, gt=0, exclude=True)
    max_retries: int = Field(default=3, ge=0, le=10, exclude=True)
    # Ours: kinds tried after `kind` when it cannot load (e.g. kind: mlx, fallback: [hf]).
    fallback: tuple[Literal["hf", "mlx", "api", "custom"], ...] = ()

    @model_validator(mode="after")
    def _kinds_tried(self) -> ModelSpec:
        """Every kind tried is distinct and has the fields it needs."""
        kinds = (self.kind, *self.fallback)
        repeated = sorted({k for k in kinds if kinds.count(k) > 1})
        if repeated:
            raise ValueError(f"fallback repeats kind(s) {repeated}; list each kind once")
        if self.fallback and self.kind == "dummy":
            raise ValueError("kind dummy takes no fallback")
        if "api" in kinds and not self.endpoint:
            raise ValueError("kind api needs `endpoint` (the server's base URL)")
        if "custom" in kinds and not self.entry_point:
            raise ValueError("kind custom needs `entry_point` ('pkg.module:Class')")
        return self


class Models(_Strict):
    base: ModelSpec
    ft: ModelSpec


class NullConfig(_Strict):
    """How null adapters are drawn (ours). `matched`: same per-module update norm."""

    mode: Literal["matched", "spectrum", "fixed"] = "matched"
    seeds: int = Field(8, ge=2, le=64)
    init_scale: float = Field(0.02, gt=0)
    rank_multipliers: tuple[float, ...] = (1.0,)
    seed_base: int = 1000

    @field_validator("rank_multipliers")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(not (m > 0) for m in v):
            raise ValueError("rank_multipliers must be a non-empty list of positive numbers")
        return v


class MlflowOptions(_Strict):
    """What the MLflow copy adds (ours): with `register`, an adapter that passes the gate becomes
    a version of the registered model `model_name` (default: the experiment, `sway-<suite
    stem>`) and the alias `gate-passed` points at the newest pass."""

    # `register` in the file; named apart because pydantic models inherit ABC's `register`.
    register_adapters: bool = Field(default=False, alias="register")
    # MLflow refuses '/' and ':' in registered model names.
    model_name: str | None = Field(default=None, min_length=1, pattern=r"^[^/:]+$")


class Defaults(_Strict):
    seed: int = 0
    top_k: int = Field(256, ge=1)
    differential: bool = True
    coverage_threshold: float = Field(0.6, ge=0, le=1)
    score_weights: dict[str, float] | None = None
    concurrent_probes: int = Field(1, ge=1)
    null: NullConfig = NullConfig()
    divergence_mode: Literal["exact", "topk_tail"] = "exact"
    # Ours: significance level of each probe's claim, after Benjamini-Hochberg (PROBES.md).
    alpha: float = Field(0.01, gt=0, lt=1)
    # Ours: a calibrated probe without a usable null is WARN "uncalibrated", and fails the
    # gate unless this is true.
    allow_uncalibrated: bool = False
    # Ours: "evidence" ranks by significant effects (PROBES.md); "upstream" is dlm-sway's.
    score: Literal["evidence", "upstream"] = "evidence"
    # Ours: what the MLflow copy registers. Where results go, not what is measured: left out of
    # the spec hash.
    mlflow: MlflowOptions = Field(default=MlflowOptions(), exclude=True)

    @field_validator("score_weights")
    @classmethod
    def _weights(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        return None if v is None else merge_weights(v)


class SuiteSpec(_Strict):
    version: int = 1
    dlm_source: str | None = None
    models: Models
    defaults: Defaults = Defaults()
    suite: tuple[dict[str, Any], ...] = Field(min_length=1)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != 1:
            raise ValueError(f"unsupported sway spec version {v}; this sway reads version 1")
        return v

    def weights(self) -> dict[str, float]:
        return dict(self.defaults.score_weights or DEFAULT_WEIGHTS)

    def spec_hash(self) -> str:
        """Content hash of the validated spec (keys sorted), 16 hex."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def merge_weights(partial: dict[str, float]) -> dict[str, float]:
    """Merge a partial category->weight map over the defaults, validating keys and values."""
    unknown = sorted(set(partial) - set(CATEGORIES))
    if unknown:
        raise ValueError(f"unknown score weight categories {unknown}; known: {list(CATEGORIES)}")
    negative = sorted(k for k, w in partial.items() if not w >= 0)
    if negative:
        raise ValueError(f"score weights must be >= 0: {negative}")
    merged = {**DEFAULT_WEIGHTS, **{k: float(w) for k, w in partial.items()}}
    if sum(merged.values()) <= 0:
        raise ValueError("score weights must not all be zero")
    return merged


def parse_weights(text: str) -> dict[str, float]:
    """Parse the CLI's `k=v,k=v` weights override and merge it over the defaults."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep:
            raise ValueError(f"weights entry {part!r} needs the form category=number")
        try:
            out[key.strip()] = float(value)
        except ValueError as exc:
            raise ValueError(f"weights entry {part!r}: {value!r} is not a number") from exc
    return merge_weights(out)


def _loc(loc: tuple[Any, ...], prefix: str = "") -> str:
    path = prefix
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "<root>"


def problems_of(exc: ValidationError, prefix: str = "") -> list[tuple[str, str]]:
    return [(_loc(tuple(e["loc"]), prefix), e["msg"]) for e in exc.errors()]
