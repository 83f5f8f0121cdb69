"""calibration_drift: did the adapter lose general knowledge it did not set out to change?

A guard rail (category calibration). For each (prompt, gold) item of a general-knowledge pack,
delta = (log p_ft(gold | prompt) - log p_base(gold | prompt)) / gold tokens (nats/token; the
token count comes from the backend's tokenizer); an item regressed when delta <
-regression_nats. raw = fraction of items regressed, in [0, 1], lower is better.

Verdict: one-sided (see probes/common/guard_rail.py). FAIL only when significantly
more items regressed than under the null adapters (z = -(raw - null mean)/null std <=
-assert_z_gte) *and* the fixed gate fails (fraction >= assert_fraction_regressed_lt or mean
delta < assert_mean_delta_gte); the fixed gate alone without a usable null.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from importlib import resources
from typing import ClassVar, Literal

import numpy as np
from pydantic import BaseModel, Field, field_validator

from sway_engine.backends.base import CONTINUATION
from sway_engine.errors import ProbeError
from sway_engine.probes.base import Context, Judgement, Measurement, Probe, ProbeSpec
from sway_engine.probes.common.guard_rail import guard_rail, harm_score
from sway_engine.requests import ContinuationLogprob, ContinuationResult
from sway_engine.result import NullStats
from sway_engine.spec import STRICT
from sway_engine.views import BASE, View

PACK_FILE = "calibration_pack.jsonl"
PACK_SIZE = 200
WORST_SHOWN = 5


class PackItem(BaseModel):
    """One inline item: a prompt and its gold continuation (start it with a space)."""

    model_config = STRICT
    prompt: str  # checked with the pairs (CalibrationDriftSpec._texts)
    gold: str = Field(min_length=1)


class CalibrationDriftSpec(ProbeSpec):
    kind: Literal["calibration_drift"] = "calibration_drift"
    pack: Literal["builtin"] = "builtin"
    items_limit: int | None = Field(None, ge=1)  # the first N items (the pack order is curated)
    assert_fraction_regressed_lt: float = Field(0.15, gt=0, le=1)
    assert_mean_delta_gte: float = Field(-0.5, le=0)  # nats/token, mean over items
    assert_z_gte: float = Field(3.0, gt=0)
    regression_nats: float = Field(1.0, ge=0)  # nats/token an item must lose to regress
    # Inline override of the pack: [prompt, gold] pairs (upstream) or {prompt, gold} mappings.
    items: tuple[tuple[str, str] | PackItem, ...] = ()

    @field_validator("items")
    @classmethod
    def _texts(
        cls, v: tuple[tuple[str, str] | PackItem, ...]
    ) -> tuple[tuple[str, str] | PackItem, ...]:
        for i, item in enumerate(v):
            prompt, gold = (item.prompt, item.gold) if isinstance(item, PackItem) else item
            if not prompt.strip():
                raise ValueError(f"item {i} has an empty prompt; every prompt needs text")
            if not gold:
                raise ValueError(f"item {i} has an empty gold continuation")
        return v


@functools.cache
def builtin_pack() -> tuple[tuple[str, str, str], ...]:
    """(prompt, gold, category) of every item of the packaged pack, in file order."""
    ref = resources.files("sway_engine.probes").joinpath("data", PACK_FILE)
    rows = []
    for line in ref.read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            rows.append((row["prompt"], row["gold"], row.get("category", "")))
    return tuple(rows)


def pack_items(spec: CalibrationDriftSpec) -> list[tuple[str, str, str]]:
    """(prompt, gold, category) the spec scores: inline items or the pack, then items_limit."""
    if spec.items:
        items = [
            (it.prompt, it.gold, "inline") if isinstance(it, PackItem) else (*it, "inline")
            for it in spec.items
        ]
    else:
        items = list(builtin_pack())
    return items[: spec.items_limit] if spec.items_limit is not None else items


class CalibrationDrift(Probe):
    kind = "calibration_drift"
    category = "calibration"
    spec_cls = CalibrationDriftSpec
    needs = frozenset({CONTINUATION})
    # Orientation of z (lower raw is better). The runner's z_by_rank should use it too.
    z_sign: ClassVar[int] = -1
    claim = "harm"
    scale = "fraction"

    def measure(
        self, spec: CalibrationDriftSpec, ctx: Context, treatments: Sequence[View]
    ) -> list[Measurement]:
        items = pack_items(spec)
        if not items:
            raise ProbeError(spec.name, "no calibration items to score")
        n = len(items)
        reqs = [ContinuationLogprob(p, g, BASE) for p, g, _ in items]
        reqs += [ContinuationLogprob(p, g, t) for t in treatments for p, g, _ in items]
        res = ctx.execute(reqs)
        base = [_per_token(spec.name, r, items[i], BASE) for i, r in enumerate(res[:n])]
        out = []
        for k, view in enumerate(treatments):
            rows = res[n * (k + 1) : n * (k + 2)]
            treated = [_per_token(spec.name, r, items[i], view) for i, r in enumerate(rows)]
            out.append(_measurement(spec, items, base, treated))
        return out

    def judge(
        self, spec: CalibrationDriftSpec, m: Measurement, null: NullStats | None
    ) -> Judgement:
        thr, tol = spec.assert_fraction_regressed_lt, spec.assert_mean_delta_gte
        mean_delta = float(m.evidence["mean_delta"])
        within = m.raw < thr and mean_delta >= tol
        ratio = max(m.raw / thr, max(0.0, -mean_delta) / max(-tol, 1e-9))
        summary = (
            f"{m.evidence['regressed']}/{m.evidence['total']} items regressed by more than "
            f"{spec.regression_nats:g} nats/token (fraction {m.raw:.3f}, max {thr:g}); "
            f"mean delta {mean_delta:+.4f} nats/token (min {tol:+g})"
        )
        return guard_rail(
            harm=self.significance(spec, m, null, harm=True),
            null=null,
            within_tolerance=within,
            fixed_score=harm_score(ratio),
            summary=summary,
            unit="fraction regressed",
        )


def _per_token(probe: str, r: object, item: tuple[str, str, str], view: View) -> tuple[float, int]:
    """(log-prob per gold token, gold tokens) of one item under one view."""
    if not isinstance(r, ContinuationResult):
        raise ProbeError(probe, f"expected a continuation log-prob, got {type(r).__name__}")
    if r.num_tokens < 1:
        raise ProbeError(probe, f"gold {item[1]!r} has no scored token under view {view.key}")
    value = r.logprob / r.num_tokens
    if not np.isfinite(value):
        raise ProbeError(probe, f"non-finite log-prob of {item[1]!r} under view {view.key}")
    return value, r.num_tokens


def _measurement(
    spec: CalibrationDriftSpec,
    items: list[tuple[str, str, str]],
    base: list[tuple[float, int]],
    treated: list[tuple[float, int]],
) -> Measurement:
    deltas = np.asarray([t - b for (b, _), (t, _) in zip(base, treated, strict=True)])
    flags = deltas < -spec.regression_nats
    rows = tuple(
        {
            "prompt": prompt,
            "gold": gold,
            "category": category,
            "tokens": tokens,
            "base": b,
            "ft": t,
            "delta": float(delta),
            "regressed": bool(flag),
        }
        for (prompt, gold, category), (b, tokens), (t, _), delta, flag in zip(
            items, base, treated, deltas, flags, strict=True
        )
    )
    by_category: dict[str, dict[str, int]] = {}
    for (_, _, category), flag in zip(items, flags, strict=True):
        counts = by_category.setdefault(category, {"regressed": 0, "items": 0})
        counts["regressed"] += int(flag)
        counts["items"] += 1
    worst = sorted(range(len(rows)), key=lambda i: float(deltas[i]))[:WORST_SHOWN]
    return Measurement(
        raw=float(flags.mean()),
        values=tuple(float(f) for f in flags),
        items=rows,
        trials=len(rows),
        evidence={
            "regressed": int(flags.sum()),
            "total": len(rows),
            "mean_delta": float(deltas.mean()),
            "regression_nats": spec.regression_nats,
            "source": "inline" if spec.items else spec.pack,
            "by_category": by_category,
            "worst": [
                {"prompt": items[i][0], "gold": items[i][1], "delta": float(deltas[i])}
                for i in worst
            ],
        },
    )
