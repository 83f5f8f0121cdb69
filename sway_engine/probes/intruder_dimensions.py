"""intruder_dimensions: does the update create dominant directions W did not have?

Shuttleworth et al. 2024 ("LoRA vs full fine-tuning: an illusion of equivalence"): a left
singular vector y_j among the top_k of W + s·B·A is an *intruder* when max_i |cos(y_j, u_i)| <
threshold over all min(out, in) left singular vectors u_i of the base weight W. raw = intruders
/ (top_k · modules), a fraction calibrated as one (beta-binomial, `Measurement.trials`).
The paper ties intruders to forgetting, so this is a guard rail (claim "harm"): FAIL only when
the adapter has significantly more intruders than random updates of its size and more than
`tolerance`; fewer than random (an update built on W's own directions) is reported, not
claimed. Matched and spectrum nulls both calibrate it: both keep the update's size, neither its
directions. W's SVD is computed once per module and shared by every view.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from sway_engine.backends.base import ADAPTER_WEIGHTS
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.probes.common.adapter_weights import ZERO, per_layer, weights_of
from sway_engine.probes.common.guard_rail import guard_rail
from sway_engine.probes.common.spectra import base_spectrum, intruders, layer_of
from sway_engine.probes.common.stored import stored_measure
from sway_engine.result import NullStats, Verdict
from sway_engine.views import View


class IntruderDimensionsSpec(ProbeSpec):
    kind: Literal["intruder_dimensions"] = "intruder_dimensions"
    top_k: int = Field(10, ge=1)
    threshold: float = Field(0.5, gt=0, lt=1)
    # Intruders (over all modules) tolerated before a significant excess FAILs.
    tolerance: int = Field(0, ge=0)


class IntruderDimensions(Probe):
    kind = "intruder_dimensions"
    category = "weights"
    spec_cls = IntruderDimensionsSpec
    needs = frozenset({ADAPTER_WEIGHTS})
    forwards = False
    scale = "fraction"
    claim = "harm"
    z_sign = -1  # fewer intruders is the safe side; more is the harm

    def measure(
        self, spec: IntruderDimensionsSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        return stored_measure(ctx, spec, treatments, lambda: self._measure(spec, ctx, treatments))

    def _measure(
        self, spec: IntruderDimensionsSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        per_view = weights_of(ctx, spec.name, treatments)
        rows: list[list[dict[str, Any]]] = [[] for _ in treatments]
        names = sorted({m.name for modules in per_view for m in modules})
        for name in names:  # module by module: W's SVD once, for every view
            spectrum = None
            for i, modules in enumerate(per_view):
                m = next((x for x in modules if x.name == name), None)
                if m is None:
                    continue
                layer, where = layer_of(name)
                k = min(spec.top_k, *m.weight.shape)
                row: dict[str, Any] = {"layer": layer, "module": where, "top_k": k}
                if not (np.any(m.a) and np.any(m.b) and m.scaling):
                    rows[i].append({**row, "intruders": 0, "min_overlap": 1.0, "zero": True})
                    continue
                if spectrum is None:
                    spectrum = base_spectrum(m.weight)
                found = intruders(spectrum, m.a, m.b, m.scaling, k, spec.threshold)
                rows[i].append(
                    {
                        **row,
                        "top_k": int(found.overlap.size),
                        "intruders": found.count,
                        "min_overlap": float(found.overlap.min()),
                    }
                )
        return [self._summary(r) for r in rows]

    def _summary(self, rows: list[dict[str, Any]]) -> Measurement:
        trials = sum(int(r["top_k"]) for r in rows)
        count = sum(int(r["intruders"]) for r in rows)
        zero = all(r.get("zero") for r in rows)
        items = tuple({k: v for k, v in r.items() if k != "zero"} for r in rows)
        fractions = [{**r, "fraction": r["intruders"] / r["top_k"]} for r in rows]
        evidence: dict[str, Any] = {
            "intruders": count,
            "trials": trials,
            "modules": len(rows),
            "modules_with_intruders": sum(1 for r in rows if r["intruders"]),
            "per_layer": per_layer(fractions, "fraction"),
            "per_layer_label": "intruder fraction (top-k)",
        }
        if zero:
            evidence["zero"] = True
        return Measurement(
            raw=count / trials if trials else 0.0,
            values=tuple(float(r["intruders"]) for r in rows),
            items=items,
            evidence=evidence,
            trials=trials,
        )

    def judge(
        self, spec: IntruderDimensionsSpec, m: Measurement, null: NullStats | None
    ) -> Judgement:
        if m.evidence.get("zero"):
            return Judgement(Verdict.PASS, f"no intruders: {ZERO}", 1.0)
        count, modules = m.evidence["intruders"], m.evidence["modules"]
        size = (
            f"{count} intruder(s) among the top-{spec.top_k} singular vectors of {modules} "
            f"module(s) (cosine < {spec.threshold:g} with every singular vector of W)"
        )
        harm = self.significance(spec, m, null, harm=True)
        if not harm.calibrated or null is None:
            # finalize turns this into WARN "uncalibrated (why)": no null, no verdict
            return Judgement(Verdict.PASS, f"{size}; no null to compare with", None, sig=harm)
        trials = m.trials or 1
        if m.raw < null.mean:
            size += (
                f", fewer than random updates of its size ({null.mean * trials:.1f}): it "
                "builds on W's own directions"
            )
        return guard_rail(
            harm=harm,
            null=null,
            within_tolerance=count <= spec.tolerance,
            fixed_score=1.0 if count <= spec.tolerance else 0.5,
            summary=size,
            unit="(intruder fraction)",
        )
