"""The calibration audit: does a random adapter of the null family get a uniform p?

Draw many more null-family adapters (random directions at the adapter's per-module norms:
just more null views, so they share batches with the suite's own nulls) and judge each as if
it were the trained adapter. Two references:

- resampled (the headline): each draw against as many *other* draws as the suite has nulls,
  a fresh set per draw. This is the procedure's calibration: both the adapter and the nulls
  vary, as they do from one evaluation to the next; a calibrated probe gives uniform p.
- the suite's own nulls: what this suite's fixed null set does to random adapters. With 16
  nulls the set's mean and spread are estimates, so this rate varies around alpha by set.

Counted: what a calibrated probe must keep rare, a false PASS (an effect claim) or a false
FAIL (a guard rail's harm claim). Power is the verdict on the trained adapter scaled to 100%,
25% and 5%, each judged against the suite's nulls scaled alike (a null of the scaled
adapter's size). `sway doctor calibration`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sway_engine import stats
from sway_engine.backends.base import NULL_VIEWS
from sway_engine.backends.instrumentation import Instrumented
from sway_engine.calibration import NullPlan, calibrates, plan_for
from sway_engine.errors import SwayError
from sway_engine.probes.base import Measurement, Probe
from sway_engine.probes.registry import Entry
from sway_engine.result import Verdict
from sway_engine.runner import context_for, preflight
from sway_engine.spec import SuiteSpec
from sway_engine.suite import null_entry
from sway_engine.views import FINETUNED, Null, View, scaled

DRAW_SEED_BASE = 900_000
POWER_SCALES = (1.0, 0.25, 0.05)
DRAWS_PER_BATCH = 32  # views measured together between cache resets


@dataclass(frozen=True)
class ProbeAudit:
    """One calibrated probe's behaviour on `draws` null-family adapters, and its power."""

    probe: str
    kind: str
    claim: str
    draws: int
    false: int
    interval: tuple[float, float]
    mean_abs_z: float
    ks: float
    false_vs_suite: int = 0
    p_values: tuple[float, ...] = ()
    power: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.false / self.draws if self.draws else math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "probe": self.probe,
            "kind": self.kind,
            "claim": self.claim,
            "draws": self.draws,
            "false": self.false,
            "rate": self.rate,
            "interval_95": list(self.interval),
            "mean_abs_z": self.mean_abs_z,
            "ks": self.ks,
            "false_vs_suite_nulls": self.false_vs_suite,
            "power": self.power,
        }


def clopper_pearson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Exact binomial confidence interval of k successes in n trials."""
    from scipy.special import betaincinv

    if n <= 0:
        return (0.0, 1.0)
    tail = (1.0 - confidence) / 2.0
    lo = 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail))
    hi = 1.0 if k == n else float(betaincinv(k + 1, n - k, 1.0 - tail))
    return (lo, hi)


def ks_uniform(ps: Sequence[float]) -> float:
    """Kolmogorov-Smirnov distance of the sample `ps` from Uniform(0, 1)."""
    xs = np.sort(np.asarray(ps, dtype=float))
    n = xs.size
    if n == 0:
        return math.nan
    ranks = np.arange(1, n + 1) / n
    return float(max(np.max(ranks - xs), np.max(xs - (ranks - 1.0 / n))))


def _chunks(views: Sequence[View], size: int) -> list[list[View]]:
    return [list(views[i : i + size]) for i in range(0, len(views), size)]


def audit(
    spec: SuiteSpec,
    entries: list[Entry],
    backend: Instrumented,
    *,
    draws: int = 200,
    seed_base: int = DRAW_SEED_BASE,
    power_scales: Sequence[float] = POWER_SCALES,
    kinds: Sequence[str] = (),
) -> list[ProbeAudit]:
    """Audit every calibrated entry of the suite (or those of `kinds`) on `backend`."""
    ctx = context_for(spec, backend)
    entry = null_entry(entries)
    if entry is None or NULL_VIEWS not in ctx.capabilities:
        raise SwayError("the calibration audit needs a null_adapter entry and a backend with nulls")
    preflight(backend)
    plan = plan_for(entry.spec, spec.defaults.null)  # type: ignore[arg-type]
    out = []
    for e in entries:
        if not calibrates(e, plan, ctx.capabilities) or (kinds and e.spec.kind not in kinds):
            continue
        backend.label = e.spec.name
        out.append(_audit_one(e, e.probe, ctx, plan, draws, seed_base, power_scales, backend.reset))
    return out


def _audit_one(
    entry: Entry,
    probe: Probe,
    ctx: Any,
    plan: NullPlan,
    draws: int,
    seed_base: int,
    power_scales: Sequence[float],
    forget: Callable[[], None],
) -> ProbeAudit:
    """Measure the suite's nulls, the drawn adapters and the scaled views in batches of
    DRAWS_PER_BATCH views, forgetting cached rows after each: memory stays that of a batch."""
    nulls = plan.views()
    drawn = [Null(seed_base + i, mode=plan.mode, init_scale=plan.init_scale) for i in range(draws)]
    power_views: list[View] = []
    for lam in power_scales:
        power_views += [scaled(FINETUNED, lam), *(scaled(v, lam) for v in nulls)]
    measured: list[Measurement] = []
    for batch in _chunks([*nulls, *drawn, *power_views], DRAWS_PER_BATCH):
        measured += probe.measure(entry.spec, ctx, batch)
        forget()  # the request cache kept every view's rows: 22 GB and an OOM kill at 200 draws
    own = measured[: len(nulls)]
    suite_null = stats.null_stats([m.raw for m in own])
    bad = Verdict.FAIL if probe.claim == "harm" else Verdict.PASS
    pool = measured[len(nulls) : len(nulls) + draws]
    raws = np.asarray([m.raw for m in pool])
    rng = np.random.default_rng(seed_base)
    k = min(len(nulls), draws - 1)
    false = false_vs_suite = 0
    ps: list[float] = []
    zs: list[float] = []
    for i, m in enumerate(pool):
        others = np.delete(np.arange(draws), i)
        null = stats.null_stats(raws[rng.choice(others, size=k, replace=False)].tolist())
        j = probe.judge(entry.spec, m, null)
        false += j.verdict == bad
        if j.p is not None:
            ps.append(j.p)
        if j.z is not None and math.isfinite(j.z):
            zs.append(abs(j.z))
        false_vs_suite += probe.judge(entry.spec, m, suite_null).verdict == bad
    power = {}
    rest = measured[len(nulls) + draws :]
    block = 1 + len(nulls)
    for i, lam in enumerate(power_scales):
        chunk = rest[i * block : (i + 1) * block]
        scaled_null = stats.null_stats([m.raw for m in chunk[1:]])
        j = probe.judge(entry.spec, chunk[0], scaled_null)
        power[f"{lam:g}"] = {"verdict": j.verdict.value, "p": j.p, "z": j.z}
    return ProbeAudit(
        probe=entry.spec.name,
        kind=entry.spec.kind,
        claim=probe.claim,
        draws=draws,
        false=false,
        interval=clopper_pearson(false, draws),
        mean_abs_z=float(np.mean(zs)) if zs else math.nan,
        ks=ks_uniform(ps),
        false_vs_suite=false_vs_suite,
        p_values=tuple(ps),
        power=power,
    )
