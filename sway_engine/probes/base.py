"""The probe contract and the one place a measurement becomes a verdict-bearing result.

A probe measures its raw metric for each *treatment* view against the base on the same
inputs: the trained adapter and the null adapters go through the same code (paired nulls).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, Field

from sway_engine import stats
from sway_engine.dlm import Document
from sway_engine.requests import Request, Result
from sway_engine.result import NullStats, ProbeResult, Verdict
from sway_engine.spec import STRICT
from sway_engine.views import View


def has_text(prompt: str) -> str:
    """A prompt must hold more than whitespace: an empty one scores the model on nothing."""
    if not prompt.strip():
        raise ValueError("empty prompt: every prompt needs text (remove it or write one)")
    return prompt


# A prompt written in a spec; the backends refuse empty ones too (they also come from documents).
Prompt = Annotated[str, AfterValidator(has_text)]


class ProbeSpec(BaseModel):
    """Fields every suite entry has; each probe subclasses it with its own knobs."""

    model_config = STRICT
    name: str
    kind: str
    enabled: bool = True
    weight: float = Field(1.0, ge=0)
    # Ours: the significance level of this probe's claim; None: the suite's defaults.alpha.
    alpha: float | None = Field(None, gt=0, lt=1)

    def z_floor(self) -> float | None:
        """An `assert_z_gte` the spec wrote explicitly: then z must reach it as well as p."""
        if "assert_z_gte" in self.model_fields_set:
            return getattr(self, "assert_z_gte", None)
        return None


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
    # The persistent cache for values derived from unstored requests (`Instrumented.remember`:
    # parts, views, compute -> bytes); None: computed every time.
    remember: Callable[[Sequence[str], Sequence[View], Callable[[], bytes]], bytes] | None = None


@dataclass(frozen=True)
class Measurement:
    """A probe's raw metric for one treatment, with per-item values and table rows."""

    raw: float
    values: tuple[float, ...] = ()
    items: tuple[dict[str, Any], ...] = ()
    evidence: dict[str, Any] = field(default_factory=dict)
    # For a raw that is a fraction k / trials: the trials, so significance is exact (discrete).
    trials: int | None = None
    # Where raw is the weighted mean of `values` (token counts): the weights, so the bootstrap
    # interval is of the same statistic.
    weights: tuple[float, ...] = ()


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    message: str
    score: float | None
    z: float | None = None
    p: float | None = None
    # The significance the verdict used (calibrated probes); finalize reads it.
    sig: stats.Significance | None = None


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
    # The scale the null calibrates on (stats.significance): log for positive divergences.
    scale: ClassVar[stats.Scale] = "linear"
    # "effect": PASS claims the adapter moved beyond the nulls (corrected for multiplicity
    # across the suite); "harm": a guard rail, FAIL claims it is worse than the nulls.
    claim: ClassVar[Literal["effect", "harm"]] = "effect"
    # False: the probe runs no forward pass (it reads weights and computes on its own), so the
    # null calibration measures it apart from the shared batches, which it would hold up.
    forwards: ClassVar[bool] = True
    # Bump when the metric or verdict rule changes: Dagster marks stored results stale.
    version: ClassVar[str] = "1"

    @abstractmethod
    def measure(self, spec: Any, ctx: Context, treatments: Sequence[View]) -> list[Measurement]:
        """The raw metric of each treatment against the base, in treatment order."""

    @abstractmethod
    def judge(self, spec: Any, m: Measurement, null: NullStats | None) -> Judgement:
        """Verdict, score, z and p from the adapter's measurement and the null stats."""

    def significance(
        self, spec: ProbeSpec, m: Measurement, null: NullStats | None, *, harm: bool = False
    ) -> stats.Significance:
        """The adapter's significance against `null`, oriented toward the probe's good
        direction (or, `harm`, toward its bad one: a guard rail's claim)."""
        return stats.significance(
            m.raw,
            null,
            sign=-self.z_sign if harm else self.z_sign,
            scale=self.scale,
            trials=m.trials,
            alpha=spec.alpha or stats.DEFAULT_ALPHA,
            z_floor=spec.z_floor(),
        )


def finalize(
    probe: Probe,
    spec: ProbeSpec,
    m: Measurement,
    null: NullStats | None,
    ci: Any,
    null_problem: str = "",
) -> ProbeResult:
    """Build the result; a non-finite raw metric is an ERROR, never a PASS. A calibrated
    probe without a usable null never PASSes: WARN "uncalibrated" with the reason
    (`null_problem` says why there is no null, when the caller knows)."""
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
    verdict, message, evidence = j.verdict, j.message, dict(m.evidence)
    if j.sig is not None:
        evidence["significance"] = {
            "p": j.sig.p,
            "p_rank": j.sig.p_rank,
            "scale": j.sig.scale,
            "alpha": j.sig.alpha,
            "nulls": j.sig.n,
        }
    if probe.calibrated:
        why = (
            j.sig.uncalibrated
            if j.sig is not None
            else stats.calibration_problem(null) or "the probe reported no significance"
        )
        if why and null is None and null_problem:
            why = null_problem
        if why:
            evidence["uncalibrated"] = why
            if verdict == Verdict.PASS:
                verdict, message = Verdict.WARN, f"uncalibrated ({why}): {message}"
    return ProbeResult(
        name=spec.name,
        kind=spec.kind,
        category=probe.category,
        verdict=verdict,
        message=message,
        score=j.score,
        raw=m.raw,
        z=j.z,
        p=j.p,
        ci_95=ci,
        weight=spec.weight,
        null=null,
        items=m.items,
        evidence=evidence,
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
