"""null_adapter: configures the null-calibration matrix; it never judges (baseline, weight 0)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import Field

from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.result import NullStats, Verdict
from sway_engine.views import View


class NullAdapterSpec(ProbeSpec):
    kind: Literal["null_adapter"] = "null_adapter"
    runs: int | None = Field(None, ge=1, le=64)  # None: defaults.null.seeds (8)
    init_scale: float | None = Field(None, gt=0)  # used by mode `fixed` only
    seed_base: int | None = None
    calibrate_kinds: tuple[str, ...] = ()
    rank_multipliers: tuple[float, ...] | None = None
    mode: Literal["matched", "spectrum", "fixed"] | None = None
    cache: bool = True  # upstream's disk cache; our nulls ride in the batch (docs/DESIGN.md)


class NullAdapter(Probe):
    kind = "null_adapter"
    category = "baseline"
    spec_cls = NullAdapterSpec
    calibrated = False

    def measure(
        self, spec: NullAdapterSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        raise NotImplementedError("null_adapter is run by sway_engine.calibration")

    def judge(self, spec: NullAdapterSpec, m: Measurement, null: NullStats | None) -> Judgement:
        return Judgement(Verdict.PASS, "null calibration", 1.0)
