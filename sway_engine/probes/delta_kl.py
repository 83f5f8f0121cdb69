"""delta_kl: does the adapter move the next-token distribution, beyond a random adapter?

raw = mean over prompts of JS(base, treatment) (or KL(treatment || base)), in nats.
PASS needs significance (predictive p <= alpha against the null on log(raw): the divergence of
a random direction is right-skewed) and size (raw >= assert_mean_gte).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from sway_engine import stats
from sway_engine.backends.base import NEXT_TOKEN
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec, Prompt
from sway_engine.probes.common.divergence import divergences
from sway_engine.result import NullStats, Verdict
from sway_engine.views import BASE, View


class DeltaKLSpec(ProbeSpec):
    kind: Literal["delta_kl"] = "delta_kl"
    prompts: tuple[Prompt, ...] = ()
    divergence: Literal["js", "kl"] = "js"
    top_k: int | None = Field(None, ge=1)
    assert_mean_gte: float = Field(0.02, ge=0)
    assert_z_gte: float = 3.0  # upstream's rule; used only when written (then z must reach it)


class DeltaKL(Probe):
    kind = "delta_kl"
    category = "adherence"
    spec_cls = DeltaKLSpec
    needs = frozenset({NEXT_TOKEN})
    scale = "log"

    def measure(
        self, spec: DeltaKLSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        if not spec.prompts:
            raise ProbeError(spec.name, "no prompts: give delta_kl a non-empty `prompts` list")
        d = divergences(ctx, spec.prompts, BASE, treatments, kind=spec.divergence, top_k=spec.top_k)
        out = []
        for row in d:
            items = tuple(
                {"prompt": p, spec.divergence: float(v)}
                for p, v in zip(spec.prompts, row, strict=True)
            )
            out.append(
                Measurement(
                    raw=float(row.mean()),
                    values=tuple(float(v) for v in row),
                    items=items,
                    evidence={"divergence": spec.divergence, "max": float(row.max())},
                )
            )
        return out

    def judge(self, spec: DeltaKLSpec, m: Measurement, null: NullStats | None) -> Judgement:
        sig = self.significance(spec, m, null)
        big = m.raw >= spec.assert_mean_gte
        size = f"mean {spec.divergence} {m.raw:.4f} (min {spec.assert_mean_gte})"
        if not sig.calibrated:
            unit = math.log(2) if spec.divergence == "js" else 1.0
            verdict = Verdict.PASS if big else Verdict.FAIL
            msg = f"{size}; fixed threshold ({sig.uncalibrated})"
            return Judgement(verdict, msg, min(1.0, m.raw / unit), sig=sig)
        effect = min(1.0, m.raw / spec.assert_mean_gte) if spec.assert_mean_gte > 0 else 1.0
        score = stats.score_from_z(sig.z) or 0.0
        vs = sig.describe()
        if sig.significant and big:
            return Judgement(Verdict.PASS, f"{size}; {vs}", score, sig.z, sig.p, sig)
        if sig.significant:
            msg = f"significant but too small: {size}; {vs}"
            return Judgement(Verdict.FAIL, msg, score * effect, sig.z, sig.p, sig)
        msg = f"indistinguishable from a random adapter: {vs} > alpha {sig.alpha:g}; {size}"
        return Judgement(Verdict.FAIL, msg, score * effect, sig.z, sig.p, sig)
