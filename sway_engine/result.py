"""Results of probes and suites: plain frozen values, serialisable to JSON."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    WARN = "warn"
    SKIP = "skip"
    ERROR = "error"


@dataclass(frozen=True)
class NullStats:
    """Summary of one probe's raw metric over the null adapters (paired, same inputs)."""

    mean: float
    std: float
    n: int
    samples: tuple[float, ...]
    degenerate: bool
    non_finite: int = 0  # draws left out because they were NaN or infinite

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ProbeResult:
    """One probe's outcome. `raw` is in the probe's own units (docs/PROBES.md).

    `z` is oriented so that larger means "more than the null" in the probe's good direction;
    `p` is the empirical one-sided p-value against the null samples.
    """

    name: str
    kind: str
    category: str
    verdict: Verdict
    message: str
    score: float | None = None
    raw: float | None = None
    z: float | None = None
    p: float | None = None
    ci_95: tuple[float, float] | None = None
    weight: float = 1.0
    null: NullStats | None = None
    items: tuple[dict[str, Any], ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    duration_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["verdict"] = self.verdict.value
        d["ci_95"] = list(self.ci_95) if self.ci_95 else None
        d["items"] = list(self.items)
        d["z_score"] = d["z"]  # upstream dlm-sway's name (UPSTREAM_NAMES)
        return json_safe(d)


@dataclass(frozen=True)
class SwayScore:
    overall: float
    band: str
    components: dict[str, float]
    weights: dict[str, float]
    findings: tuple[str, ...]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["findings"] = list(self.findings)
        return d


@dataclass(frozen=True)
class SuiteResult:
    spec_path: str
    spec_hash: str
    base_model: str
    adapter: str
    started_at: str
    finished_at: str
    wall_s: float
    sway_version: str
    probes: tuple[ProbeResult, ...]
    score: SwayScore
    backend_stats: dict[str, float] = field(default_factory=dict)
    backend_kind: str = "hf"

    def probe(self, name: str) -> ProbeResult:
        for r in self.probes:
            if r.name == name:
                return r
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema_version": 1,
            "spec_path": self.spec_path,
            "spec_hash": self.spec_hash,
            "base_model": self.base_model,
            "adapter": self.adapter,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "wall_s": self.wall_s,
            "sway_version": self.sway_version,
            "backend_kind": self.backend_kind,
            "backend_stats": self.backend_stats,
            "score": self.score.to_dict(),
            "probes": [p.to_dict() for p in self.probes],
            # upstream dlm-sway's names for the same values, so its consumers read ours
            **{theirs: getattr(self, ours) for theirs, ours in UPSTREAM_NAMES.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SuiteResult:
        """A suite result from its JSON (`sway run --json`), or from upstream dlm-sway's
        (`adapter_id`, `base_model_id`, `wall_seconds`, per probe `z_score`); fields upstream
        lacks get neutral values. Raises ValueError naming what is missing."""
        try:
            got = dict(data)
            for theirs, ours in UPSTREAM_NAMES.items():
                got.setdefault(ours, got.get(theirs))
            score = got.get("score") or {}
            return cls(
                spec_path=str(got.get("spec_path") or ""),
                spec_hash=str(got.get("spec_hash") or ""),
                base_model=str(got.get("base_model") or ""),
                adapter=str(got.get("adapter") or ""),
                started_at=str(got.get("started_at") or ""),
                finished_at=str(got.get("finished_at") or ""),
                wall_s=float(got.get("wall_s") or 0.0),
                sway_version=str(got.get("sway_version") or ""),
                probes=tuple(_probe_from_dict(p) for p in got["probes"]),
                score=SwayScore(
                    overall=float(score.get("overall") or 0.0),
                    band=str(score.get("band") or ""),
                    components=dict(score.get("components") or {}),
                    weights=dict(score.get("weights") or {}),
                    findings=tuple(score.get("findings") or ()),
                ),
                backend_stats=dict(got.get("backend_stats") or {}),
                backend_kind=str(got.get("backend_kind") or ""),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"not a sway result ({type(exc).__name__}: {exc}); give the JSON that "
                "`sway run --json` (or upstream dlm-sway) wrote"
            ) from exc


# Upstream dlm-sway's JSON names for fields sway names differently (ours -> written beside).
UPSTREAM_NAMES = {"adapter_id": "adapter", "base_model_id": "base_model", "wall_seconds": "wall_s"}


def _probe_from_dict(d: Mapping[str, Any]) -> ProbeResult:
    null = d.get("null")
    ci = d.get("ci_95")
    return ProbeResult(
        name=str(d["name"]),
        kind=str(d["kind"]),
        category=str(d.get("category") or ""),
        verdict=Verdict(d["verdict"]),
        message=str(d.get("message") or ""),
        score=finite(d.get("score")),
        raw=finite(d.get("raw")),
        z=finite(d["z"] if "z" in d else d.get("z_score")),
        p=finite(d.get("p")),
        ci_95=(float(ci[0]), float(ci[1]))
        if isinstance(ci, list | tuple) and len(ci) == 2
        else None,
        weight=float(d.get("weight", 1.0)),
        null=NullStats(
            mean=float(null["mean"]),
            std=float(null["std"]),
            n=int(null["n"]),
            samples=tuple(float(x) for x in null.get("samples") or ()),
            degenerate=bool(null.get("degenerate", False)),
            non_finite=int(null.get("non_finite", 0)),
        )
        if isinstance(null, Mapping)
        else None,
        items=tuple(d.get("items") or ()),
        evidence=dict(d.get("evidence") or {}),
        duration_s=float(d.get("duration_s") or 0.0),
    )


def finite(value: float | int | None) -> float | None:
    """A float, or None for None, NaN and +-inf (stored as NULL, shown as a dash)."""
    if value is None:
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def json_safe(value: Any) -> Any:
    """Replace non-finite floats by None recursively; tuples and sets become lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [json_safe(v) for v in value]
    return value
