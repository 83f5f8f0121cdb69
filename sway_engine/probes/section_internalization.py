"""section_internalization: did the document's sections become more likely, beyond a random
adapter of the same size, and which sections moved?

Per eligible section s, m_T(s) is the per-token NLL under view T (tokens counted by the
tokenizer): prose = rolling NLL of its first `max_prose_chars` characters; instruction =
mean over Q/A of NLL(answer | question); preference = mean over triples of
NLL(chosen | prompt). own(s) = (m_base - m_T) / m_base (relative lift; the plain difference
when m_base <= 0). raw = mean own lift over sections, z-scored against the null adapters'
mean own lift on the same sections. Upstream z-scored mean(own - leak), which is identically
zero; own - leak (leak = mean own lift of the other sections) stays as per-section evidence.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import AliasChoices, Field

from sway_engine import stats
from sway_engine.backends.base import CONTINUATION, ROLLING
from sway_engine.dlm import Section
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.requests import (
    ContinuationLogprob,
    ContinuationResult,
    Request,
    RollingLogprob,
    RollingResult,
)
from sway_engine.result import NullStats, Verdict
from sway_engine.views import BASE, View

Kind = Literal["prose", "instruction", "preference"]


class SectionSpec(ProbeSpec):
    kind: Literal["section_internalization"] = "section_internalization"
    include_kinds: tuple[Kind, ...] = ("prose", "instruction", "preference")
    # upstream autogen writes `threshold`; its spec names it per_section_threshold
    per_section_threshold: float = Field(
        0.05, ge=0, validation_alias=AliasChoices("per_section_threshold", "threshold")
    )
    assert_passing_section_frac: float = Field(0.5, ge=0, le=1)
    assert_z_gte: float = 3.0
    max_prose_chars: int = Field(2000, ge=1)


def _requests(section: Section, view: View, max_chars: int) -> list[Request]:
    if section.kind == "instruction" and section.qa:
        return [ContinuationLogprob(q.question + "\n", q.answer, view) for q in section.qa]
    if section.kind == "preference" and section.preferences:
        return [ContinuationLogprob(p.prompt + "\n", p.chosen, view) for p in section.preferences]
    return [RollingLogprob(section.content[:max_chars], view)]


def _nll(results: Sequence[object]) -> float:
    """Mean per-token negative log-likelihood over a section's requests."""
    per_item = [-r.mean for r in results if isinstance(r, ContinuationResult | RollingResult)]
    return sum(per_item) / len(per_item) if per_item else 0.0


def lift(base_nll: float, view_nll: float) -> float:
    """Relative drop in NLL, or the plain drop when the base NLL is not positive."""
    return (base_nll - view_nll) / base_nll if base_nll > 0 else base_nll - view_nll


class SectionInternalization(Probe):
    kind = "section_internalization"
    category = "attribution"
    spec_cls = SectionSpec
    needs = frozenset({ROLLING, CONTINUATION})

    def measure(
        self, spec: SectionSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        if ctx.document is None:
            raise ProbeError(spec.name, "needs the suite's dlm_source document")
        sections = [s for s in ctx.document.sections if s.kind in spec.include_kinds]
        if len(sections) < 2:
            raise ProbeError(spec.name, f"needs >= 2 eligible sections, found {len(sections)}")
        views = [BASE, *treatments]
        plan = [(v, s, _requests(s, v, spec.max_prose_chars)) for v in views for s in sections]
        results = ctx.execute([r for _, _, reqs in plan for r in reqs])
        nll: dict[tuple[View, str], float] = {}
        cursor = 0
        for view, section, reqs in plan:
            nll[(view, section.id)] = _nll(results[cursor : cursor + len(reqs)])
            cursor += len(reqs)
        out = []
        for view in treatments:
            own = [lift(nll[(BASE, s.id)], nll[(view, s.id)]) for s in sections]
            items = []
            for i, s in enumerate(sections):
                others = [o for j, o in enumerate(own) if j != i]
                leak = sum(others) / len(others)
                items.append(
                    {
                        "section": s.id,
                        "kind": s.kind,
                        "line": s.line,
                        "base_nll": nll[(BASE, s.id)],
                        "nll": nll[(view, s.id)],
                        "own": own[i],
                        "leak": leak,
                        "effective": own[i] - leak,
                        "passed": own[i] >= spec.per_section_threshold,
                    }
                )
            passing = sum(bool(it["passed"]) for it in items) / len(items)
            out.append(
                Measurement(
                    raw=sum(own) / len(own),
                    values=tuple(own),
                    items=tuple(items),
                    evidence={"num_sections": len(sections), "passing_frac": passing},
                )
            )
        return out

    def judge(self, spec: SectionSpec, m: Measurement, null: NullStats | None) -> Judgement:
        passing = float(m.evidence["passing_frac"])
        enough = passing >= spec.assert_passing_section_frac
        shape = (
            f"mean own lift {m.raw:+.3f}; {passing:.0%} of sections lifted >= "
            f"{spec.per_section_threshold}"
        )
        sig = self.significance(spec, m, null)
        if not sig.calibrated:
            verdict = Verdict.PASS if enough else Verdict.FAIL
            msg = f"{shape}; fixed threshold ({sig.uncalibrated})"
            return Judgement(verdict, msg, passing, sig=sig)
        score = stats.score_from_z(sig.z) or 0.0
        if sig.significant and enough:
            return Judgement(Verdict.PASS, f"{shape}; {sig.describe()}", score, sig.z, sig.p, sig)
        why = "too few sections lifted" if sig.significant else "not above random adapters"
        msg = f"{why}: {shape}; {sig.describe()}"
        return Judgement(Verdict.FAIL, msg, score * passing, sig.z, sig.p, sig)
