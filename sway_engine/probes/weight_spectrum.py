"""weight_spectrum: is the adapter's update concentrated in fewer directions than a random one?

Per adapted module, from the weights alone (no forward pass): the update dW = s·B·A, its norm
||dW||_F, its norm relative to the base weight ||dW||_F / ||W||_F, its effective rank
exp(H(σ/Σσ)) and its stable rank Σσ²/σ_max² (σ: dW's singular values; both ranks lie in
[1, r]). raw = the mean over modules with a non-zero update of `statistic` (effective rank by
default), lower is the effect (z_sign -1): a trained update concentrates where a random one of
the same size spreads. Calibrated by matched nulls only: a spectrum null copies each module's
singular values, so both ranks (and the norms, under any null that matches them) equal the
adapter's by construction and are reported, never calibrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from sway_engine import stats
from sway_engine.backends.base import ADAPTER_WEIGHTS
from sway_engine.errors import ProbeSkip
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.probes.common.adapter_weights import (
    ZERO,
    per_layer,
    spectrum_nulls,
    weights_of,
)
from sway_engine.probes.common.spectra import layer_of, update_stats
from sway_engine.probes.common.stored import stored_measure
from sway_engine.result import NullStats, Verdict
from sway_engine.views import View


class WeightSpectrumSpec(ProbeSpec):
    kind: Literal["weight_spectrum"] = "weight_spectrum"
    statistic: Literal["effective_rank", "stable_rank"] = "effective_rank"
    # A PASS also needs the nulls' mean to exceed the adapter's raw by this much (in rank units).
    min_rank_drop: float = Field(0.25, ge=0)


class WeightSpectrum(Probe):
    kind = "weight_spectrum"
    category = "weights"
    spec_cls = WeightSpectrumSpec
    needs = frozenset({ADAPTER_WEIGHTS})
    forwards = False
    z_sign = -1

    def measure(
        self, spec: WeightSpectrumSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        return stored_measure(ctx, spec, treatments, lambda: self._measure(spec, ctx, treatments))

    def _measure(
        self, spec: WeightSpectrumSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        if spectrum_nulls(treatments):
            raise ProbeSkip(
                spec.name,
                f"a spectrum null copies each module's singular values, so its {spec.statistic} "
                "equals the adapter's by construction; calibrate weight_spectrum with matched "
                "nulls (null_adapter mode: matched)",
            )
        base_norms: dict[str, float] = {}
        out = []
        for modules in weights_of(ctx, spec.name, treatments):
            rows: list[dict[str, Any]] = []
            for m in modules:
                if m.name not in base_norms:
                    base_norms[m.name] = float(np.linalg.norm(m.weight))
                st = update_stats(m.a, m.b, m.scaling, base_norms[m.name])
                layer, where = layer_of(m.name)
                rows.append(
                    {
                        "layer": layer,
                        "module": where,
                        "rank": int(m.a.shape[0]),
                        "update_norm": st.norm,
                        "relative_norm": st.relative_norm,
                        "effective_rank": st.effective_rank,
                        "stable_rank": st.stable_rank,
                    }
                )
            out.append(self._summary(spec, rows))
        return out

    def _summary(self, spec: WeightSpectrumSpec, rows: list[dict[str, Any]]) -> Measurement:
        live = [r for r in rows if r["update_norm"] > 0]
        total = float(np.sqrt(sum(r["update_norm"] ** 2 for r in rows)))
        evidence: dict[str, Any] = {
            "statistic": spec.statistic,
            "modules": len(rows),
            "zero_modules": len(rows) - len(live),
            "update_norm": total,
            "max_rank": max(r["rank"] for r in rows),
        }
        if not live:
            return Measurement(raw=0.0, items=tuple(rows), evidence={**evidence, "zero": True})
        if all(r["rank"] == 1 for r in live):
            raise ProbeSkip(
                spec.name,
                "every module's update has rank 1: its effective and stable rank are 1 by "
                "construction (for the adapter and every null of its rank)",
            )
        values = [float(r[spec.statistic]) for r in live]
        evidence |= {
            "mean_relative_norm": float(np.mean([r["relative_norm"] for r in live])),
            "mean_effective_rank": float(np.mean([r["effective_rank"] for r in live])),
            "mean_stable_rank": float(np.mean([r["stable_rank"] for r in live])),
            "per_layer": per_layer(live, spec.statistic),
            "per_layer_label": f"mean {spec.statistic.replace('_', ' ')}",
        }
        return Measurement(
            raw=float(np.mean(values)), values=tuple(values), items=tuple(rows), evidence=evidence
        )

    def judge(self, spec: WeightSpectrumSpec, m: Measurement, null: NullStats | None) -> Judgement:
        if m.evidence.get("zero"):
            return Judgement(Verdict.FAIL, ZERO, 0.0)
        stat = spec.statistic.replace("_", " ")
        size = (
            f"mean {stat} {m.raw:.3f} over {m.evidence['modules'] - m.evidence['zero_modules']} "
            f"module(s) (rank {m.evidence['max_rank']}; mean ||dW||/||W|| "
            f"{m.evidence['mean_relative_norm']:.3g})"
        )
        sig = self.significance(spec, m, null)
        if not sig.calibrated or null is None:
            # finalize turns this into WARN "uncalibrated (why)": no null, no verdict
            return Judgement(Verdict.PASS, f"{size}; no null to compare with", None, sig=sig)
        drop = null.mean - m.raw
        score = stats.score_from_z(sig.z) or 0.0
        vs = f"nulls {null.mean:.3f} ± {null.std:.3f}; {sig.describe()}"
        if sig.significant and drop >= spec.min_rank_drop:
            msg = f"{size}: more concentrated than a random update of its size ({vs})"
            return Judgement(Verdict.PASS, msg, score, sig.z, sig.p, sig)
        if sig.significant:
            small = f"drop {drop:.3f} < {spec.min_rank_drop:g}"
            msg = f"significant but too small ({small}): {size}; {vs}"
            return Judgement(Verdict.FAIL, msg, score, sig.z, sig.p, sig)
        msg = f"indistinguishable from a random adapter: {size}; {vs}"
        return Judgement(Verdict.FAIL, msg, score, sig.z, sig.p, sig)
