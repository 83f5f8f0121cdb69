"""The null-calibration matrix: each calibrated probe's raw metric under each null adapter.

Nulls are measured on the probe's own inputs (paired with the adapter's measurement), for
every seed and rank multiplier; they ride in the same batches as everything else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from sway_engine import stats
from sway_engine.gather import Execute, gather
from sway_engine.probes.base import Context
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry
from sway_engine.result import NullStats
from sway_engine.spec import NullConfig
from sway_engine.views import Finetuned, Null, NullMode, View


@dataclass(frozen=True)
class NullPlan:
    seeds: tuple[int, ...]
    rank_multipliers: tuple[float, ...]
    mode: NullMode
    init_scale: float
    kinds: tuple[str, ...] = ()  # empty: every calibrated probe

    def views(self) -> list[Null]:
        return [
            Null(seed, rank_scale=m, mode=self.mode, init_scale=self.init_scale)
            for m in self.rank_multipliers
            for seed in self.seeds
        ]


def plan_for(spec: NullAdapterSpec, defaults: NullConfig) -> NullPlan:
    """The entry's fields override the suite's `defaults.null`."""
    runs = spec.runs or defaults.seeds
    base = defaults.seed_base if spec.seed_base is None else spec.seed_base
    return NullPlan(
        seeds=tuple(base + i for i in range(runs)),
        rank_multipliers=tuple(spec.rank_multipliers or defaults.rank_multipliers),
        mode=spec.mode or defaults.mode,
        init_scale=spec.init_scale or defaults.init_scale,
        kinds=spec.calibrate_kinds,
    )


@dataclass(frozen=True)
class NullCell:
    probe: str
    kind: str
    seed: int
    rank_scale: float
    raw: float


@dataclass(frozen=True)
class NullMatrix:
    plan: NullPlan
    cells: tuple[NullCell, ...]
    skipped: tuple[tuple[str, str], ...] = ()  # (probe name, reason)

    def stats(self, probe: str, rank_scale: float = 1.0) -> NullStats | None:
        raws = [c.raw for c in self.cells if c.probe == probe and c.rank_scale == rank_scale]
        return stats.null_stats(raws) if raws else None

    def probes(self) -> list[str]:
        return list(dict.fromkeys(c.probe for c in self.cells))

    def problem(self, probe: str) -> str:
        """Why `probe` has no null at rank scale 1 ("" when it has one)."""
        for name, reason in self.skipped:
            if name == probe:
                return f"null calibration failed: {reason}"
        if any(c.probe == probe for c in self.cells):
            if not any(c.probe == probe and c.rank_scale == 1.0 for c in self.cells):
                scales = sorted({c.rank_scale for c in self.cells})
                return f"no null at rank scale 1.0 (rank_multipliers {scales}); add 1.0"
            return ""
        if self.plan.kinds:
            return f"its kind is not among null_adapter.calibrate_kinds {list(self.plan.kinds)}"
        return "no null calibration"


def calibrates(entry: Entry, plan: NullPlan, capabilities: frozenset[str]) -> bool:
    probe = entry.probe
    return (
        probe.calibrated
        and entry.spec.enabled
        and probe.needs <= capabilities
        and (not plan.kinds or entry.spec.kind in plan.kinds)
    )


def calibrate(
    entries: list[Entry],
    ctx: Context,
    plan: NullPlan,
    on_entry: Callable[[Entry], None] | None = None,
) -> NullMatrix:
    """Measure every calibrated entry under every null view; failures are recorded, not raised.

    The entries are measured together (`gather`): their requests share batches, and each
    measures the trained adapter beside its nulls, so the adapter's own run afterwards finds
    its results in the run's request cache. `on_entry` hears of each entry as its
    measurement ends, in this thread (progress)."""
    views = plan.views()
    todo = [e for e in entries if calibrates(e, plan, ctx.capabilities)]
    shared = [e for e in todo if e.probe.forwards]

    def ended(i: int) -> None:
        if on_entry is not None:
            on_entry(shared[i])

    gathered = iter(gather([_job(e, ctx, views) for e in shared], ctx.execute, ended))
    outcomes = []
    for entry in todo:
        if entry.probe.forwards:
            outcomes.append(next(gathered))
            continue
        outcomes.append(_outcome(entry, ctx, views))
        if on_entry is not None:
            on_entry(entry)
    cells: list[NullCell] = []
    skipped: list[tuple[str, str]] = []
    for entry, measured in zip(todo, outcomes, strict=True):
        if isinstance(measured, Exception):
            # the adapter's measurement may be what failed: the nulls alone, once more
            measured = _outcome(entry, ctx, views)
        if isinstance(measured, Exception):
            skipped.append((entry.spec.name, f"{type(measured).__name__}: {measured}"))
            continue
        for view, m in zip(views, measured, strict=True):
            cells.append(
                NullCell(entry.spec.name, entry.spec.kind, view.seed, view.rank_scale, m.raw)
            )
    return NullMatrix(plan=plan, cells=tuple(cells), skipped=tuple(skipped))


def _job(entry: Entry, ctx: Context, views: list[Null]) -> Callable[[Execute], Any]:
    """The entry measured under `views` and the trained adapter; the nulls' measurements."""

    def measure(execute: Execute) -> Any:
        treatments: list[View] = [*views, Finetuned()]
        measured = entry.probe.measure(entry.spec, replace(ctx, execute=execute), treatments)
        return measured[: len(views)]

    return measure


def _outcome(entry: Entry, ctx: Context, views: list[Null]) -> Any:
    try:
        return entry.probe.measure(entry.spec, ctx, views)
    except Exception as exc:  # noqa: BLE001 - one probe's failure must not stop the matrix
        return exc
