"""The probe contract and the one place a measurement becomes a verdict-bearing result.

A probe measures its raw metric for each *treatment* view against the base on the same
inputs: the trained adapter and the null adapters go through the same code (paired nulls).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from sway_engine.dlm import Document
from sway_engine.requests import Request, Result
from sway_engine.result import NullStats, ProbeResult, Verdict
from sway_engine.views import View


class ProbeSpec(BaseModel):
    """Fields every suite entry has; each probe subclasses it with its own knobs."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    kind: str
    enabled: bool = True
    weight: float = Field(1.0, ge=0)


@dataclass(frozen=True)
class Context:
    """What a probe may use: an executor for requests, run-wide settings, the document."""

    execute: Callable[[Sequence[Request]], list[Result]]
    capabilities: frozenset[str]
    seed: int = 0
    top_k: int = 256
    divergence_mode: str = "exact"
    document: Document | None = None
    # Directory of the trained adapter under test (pre-run probes read training files there).
    adapter_path: str | None = None


@dataclass(frozen=True)
class Measurement:
    """A probe's raw metric for one treatment, with per-item values and table rows."""

    raw: float
    values: tuple[float, ...] = ()
    items: tuple[dict[str, Any], ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    message: str
    score: float | None
    z: float | None = None
    p: float | None = None


class Probe(ABC):
    """Subclasses set the class variables and implement `measure` and `judge`."""

    kind: ClassVar[str]
    category: ClassVar[str] = "adherence"
    spec_cls: ClassVar[type[ProbeSpec]] = ProbeSpec
    needs: ClassVar[frozenset[str]] = frozenset()
    # Whether null adapters calibrate this probe (its metric is defined for a null view).
    calibrated: ClassVar[bool] = True
    # Orientation of z: +1 when a higher raw is better, -1 when lower is better.
    z_sign: ClassVar[int] = 1
    # Bump when the metric or verdict rule changes: Dagster marks stored results stale.
    version: ClassVar[str] = "1"

    @abstractmethod
    def measure(self, spec: Any, ctx: Context, treatments: Sequence[View]) -> list[Measurement]:
        """The raw metric of each treatment against the base, in treatment order."""

    @abstractmethod
    def judge(self, spec: Any, m: Measurement, null: NullStats | None) -> Judgement:
        """Verdict, score, z and p from the adapter's measurement and the null stats."""


def finalize(
    probe: Probe, spec: ProbeSpec, m: Measurement, null: NullStats | None, ci: Any
) -> ProbeResult:
    """Build the result; a non-finite raw metric is an ERROR, never a PASS."""
    if not math.isfinite(m.raw):
        return ProbeResult(
            name=spec.name,
            kind=spec.kind,
            category=probe.category,
            verdict=Verdict.ERROR,
            message=f"non-finite raw metric ({m.raw}); refusing to score",
            weight=spec.weight,
            evidence={**m.evidence, "non_finite_raw": str(m.raw)},
        )
    j = probe.judge(spec, m, null)
    return ProbeResult(
        name=spec.name,
        kind=spec.kind,
        category=probe.category,
        verdict=j.verdict,
        message=j.message,
        score=j.score,
        raw=m.raw,
        z=j.z,
        p=j.p,
        ci_95=ci,
        weight=spec.weight,
        null=null,
        items=m.items,
        evidence=m.evidence,
    )


def skipped(
    spec: ProbeSpec, category: str, message: str, verdict: Verdict = Verdict.SKIP
) -> ProbeResult:
    return ProbeResult(
        name=spec.name,
        kind=spec.kind,
        category=category,
        verdict=verdict,
        message=message,
        weight=spec.weight,
    )
