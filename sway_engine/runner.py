"""Run a suite for one adapter: preflight, null matrix, each probe, composite score.

The CLI and the Dagster assets call the same pieces: `calibrate_suite`, `run_entry`,
`score_suite`; `run_suite` composes them in declaration order.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from sway_engine import __version__, score, stats
from sway_engine.backends import deferred
from sway_engine.backends.base import NULL_VIEWS
from sway_engine.backends.build import build_backend, check_one_model
from sway_engine.backends.instrumentation import Instrumented, session
from sway_engine.calibration import NullMatrix, NullPlan, calibrate, calibrates, plan_for
from sway_engine.errors import ProbeSkip, SwayError
from sway_engine.probes.base import Context, finalize, skipped
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry
from sway_engine.progress import Progress, Step
from sway_engine.requests import NextToken, Request, Result
from sway_engine.result import ProbeResult, SuiteResult, Verdict
from sway_engine.spec import SuiteSpec
from sway_engine.suite import Suite, document_of, null_entry
from sway_engine.views import BASE, FINETUNED, Finetuned

log = logging.getLogger(__name__)
# The trace's label for the null calibration's batches (every calibrated probe's requests,
# under the nulls and the trained adapter, together).
CALIBRATION_LABEL = "null calibration (all probes, nulls + adapter)"


def context_for(spec: SuiteSpec, backend: Instrumented) -> Context:
    return Context(
        execute=backend.execute,
        capabilities=backend.capabilities,
        seed=spec.defaults.seed,
        top_k=spec.defaults.top_k,
        divergence_mode=spec.defaults.divergence_mode,
        document=document_of(spec),
        adapter_path=backend.adapter_path or spec.models.ft.adapter,
        remember=backend.remember,
    )


def preflight(backend: Instrumented) -> None:
    """One forward per view on a fixed prompt; raises if any output is non-finite."""
    backend.execute([NextToken("hello", BASE, 8), NextToken("hello", FINETUNED, 8)])


def null_plan(spec: SuiteSpec, entries: list[Entry], ctx: Context) -> NullPlan | None:
    """The suite's null plan, or None when it has no (enabled) null_adapter entry or the
    backend cannot build null views."""
    entry = null_entry(entries)
    if entry is None or NULL_VIEWS not in ctx.capabilities:
        return None
    assert isinstance(entry.spec, NullAdapterSpec)
    return plan_for(entry.spec, spec.defaults.null)


def calibrate_suite(
    spec: SuiteSpec,
    entries: list[Entry],
    ctx: Context,
    on_entry: Callable[[Entry], None] | None = None,
) -> NullMatrix | None:
    """The null matrix, or None when the suite has no (enabled) null_adapter entry."""
    plan = null_plan(spec, entries, ctx)
    return None if plan is None else calibrate(entries, ctx, plan, on_entry)


def null_result(entry: Entry, matrix: NullMatrix | None, duration_s: float) -> ProbeResult:
    if matrix is None:
        return skipped(entry.spec, entry.category, "null views unavailable on this backend")
    plan = matrix.plan
    probes = matrix.probes()
    evidence = {
        "mode": plan.mode,
        "seeds": list(plan.seeds),
        "rank_multipliers": list(plan.rank_multipliers),
        "null_stats": {p: s.to_dict() for p in probes if (s := matrix.stats(p)) is not None},
        "skipped": [list(s) for s in matrix.skipped],
    }
    items = tuple(
        {"probe": c.probe, "seed": c.seed, "rank_scale": c.rank_scale, "raw": c.raw}
        for c in matrix.cells
    )
    msg = (
        f"null calibration ({plan.mode}): {len(probes)} probe(s) x {len(plan.seeds)} seeds"
        + (f" x {len(plan.rank_multipliers)} ranks" if len(plan.rank_multipliers) > 1 else "")
        + (f"; {len(matrix.skipped)} skipped" if matrix.skipped else "")
    )
    return ProbeResult(
        name=entry.spec.name,
        kind=entry.spec.kind,
        category=entry.category,
        verdict=Verdict.PASS,
        message=msg,
        score=1.0,
        weight=entry.spec.weight,
        items=items,
        evidence=evidence,
        duration_s=duration_s,
    )


def run_entry(entry: Entry, ctx: Context, matrix: NullMatrix | None) -> ProbeResult:
    """One probe on the trained adapter, judged against its null stats; never raises.
    Prompts the backend cut to fit the model's context are counted in its evidence."""
    start = time.perf_counter()
    counting, cut = counting_cuts(ctx)
    result = _run_entry(entry, counting, matrix)
    if cut:
        result = _with_cuts(result, len(cut))
    return _timed(result, time.perf_counter() - start)


def counting_cuts(ctx: Context) -> tuple[Context, set[str]]:
    """`ctx` with an execute that records each distinct prompt whose result says the backend
    cut it to fit the context (`prompt_cut`; docs/PROBES.md "Prompt length")."""
    cut: set[str] = set()

    def execute(requests: Sequence[Request]) -> list[Result]:
        results = ctx.execute(requests)
        for req, res in zip(requests, results, strict=True):
            if getattr(res, "prompt_cut", 0):
                cut.add(getattr(req, "prompt", ""))
        return results

    return replace(ctx, execute=execute), cut


def _with_cuts(result: ProbeResult, n: int) -> ProbeResult:
    note = f"{n} prompt(s) longer than the model's context were cut to their last tokens"
    log.warning("%s: %s", result.name, note)
    return replace(
        result,
        message=f"{result.message}; {note}",
        evidence={**result.evidence, "prompts_truncated": n},
    )


def _run_entry(entry: Entry, ctx: Context, matrix: NullMatrix | None) -> ProbeResult:
    spec, probe = entry.spec, entry.probe
    if not spec.enabled:
        return skipped(spec, entry.category, "disabled in spec")
    if isinstance(spec, NullAdapterSpec):
        return null_result(entry, matrix, 0.0)
    missing = probe.needs - ctx.capabilities
    if missing:
        return skipped(spec, entry.category, f"backend lacks {sorted(missing)}")
    try:
        (m,) = probe.measure(spec, ctx, [Finetuned()])
    except ProbeSkip as exc:
        return skipped(spec, entry.category, str(exc))
    except SwayError as exc:
        return skipped(spec, entry.category, str(exc), Verdict.ERROR)
    except Exception as exc:  # noqa: BLE001 - per-probe isolation: the suite goes on
        return skipped(spec, entry.category, f"{type(exc).__name__}: {exc}", Verdict.ERROR)
    null = matrix.stats(spec.name) if matrix is not None else None
    problem = matrix.problem(spec.name) if matrix is not None else ""
    ci = (
        stats.bootstrap_ci(m.values, seed=ctx.seed, weights=m.weights or None) if m.values else None
    )
    result = finalize(probe, spec, m, null, ci, problem)
    if matrix is not None and len(matrix.plan.rank_multipliers) > 1 and result.raw is not None:
        by_rank = {
            f"{r:g}x": stats.z_score(result.raw, matrix.stats(spec.name, r), sign=probe.z_sign)
            for r in matrix.plan.rank_multipliers
        }
        result = _with_evidence(result, z_by_rank=by_rank)
    return result


def error_results(entries: list[Entry], message: str) -> list[ProbeResult]:
    """Every entry as ERROR (preflight or load failed): the gate must fail, never pass."""
    return [skipped(e.spec, e.category, message, Verdict.ERROR) for e in entries]


def score_suite(spec: SuiteSpec, results: list[ProbeResult]) -> score.SwayScore:
    d = spec.defaults
    return score.compute(results, spec.weights(), mode=d.score, alpha=d.alpha)


def finish(spec: SuiteSpec, results: Sequence[ProbeResult]) -> list[ProbeResult]:
    """The suite-level step after every probe ran: Benjamini-Hochberg over the effect claims."""
    return score.adjust_for_multiplicity(results, spec.defaults.alpha)


def gate_threshold(spec: SuiteSpec, threshold: float | None = None) -> float:
    """The gate's minimum overall: the explicit one; upstream's coverage_threshold under the
    upstream score; else 0 (the evidence score's gate is the AND of the verdicts)."""
    d = spec.defaults
    if threshold is not None:
        return threshold
    if d.score == "upstream" or "coverage_threshold" in d.model_fields_set:
        return d.coverage_threshold
    return 0.0


def gate(spec: SuiteSpec, result: SuiteResult, threshold: float | None = None) -> tuple[bool, str]:
    """The suite's gate on a finished result (CLI, Dagster check and reports alike)."""
    return score.gate(
        result.probes,
        result.score,
        gate_threshold(spec, threshold),
        allow_uncalibrated=spec.defaults.allow_uncalibrated,
    )


def run_suite(
    spec: SuiteSpec,
    entries: list[Entry],
    backend: Instrumented,
    *,
    spec_path: str = "<memory>",
    adapter: str = "",
    progress: Progress | None = None,
) -> SuiteResult:
    """Preflight, calibrate, run every entry in declaration order, score. `progress` hears of
    each step: every calibrated probe under the nulls, then every entry."""
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    ctx = context_for(spec, backend)
    plan = null_plan(spec, entries, ctx)
    calibrated = [e for e in entries if plan is not None and calibrates(e, plan, ctx.capabilities)]
    steps = iter(range(1, len(calibrated) + len(entries) + 1))
    total = len(calibrated) + len(entries)

    def say(label: str) -> None:
        if progress is not None:
            progress(Step(next(steps), total, label))

    backend.label = "preflight"
    try:
        preflight(backend)
    except SwayError as exc:
        results = error_results(entries, f"preflight failed: {exc}")
        return suite_result(spec, spec_path, adapter, started, t0, results, backend)
    matrix = None
    calibration_s = 0.0
    if (entry := null_entry(entries)) is not None:
        backend.label = entry.spec.name
        t = time.perf_counter()
        nulls = len(plan.views()) if plan is not None else 0

        def calibrating(e: Entry) -> None:
            say(f"{e.spec.name} under {nulls} null adapters")

        # every calibrated probe at once, the adapter beside its nulls: one trace label
        backend.label = CALIBRATION_LABEL
        matrix = calibrate_suite(spec, entries, ctx, calibrating)
        calibration_s = time.perf_counter() - t
    results = []
    for entry in entries:
        say(f"{entry.spec.name} ({entry.spec.kind})")
        backend.label = entry.spec.name
        if isinstance(entry.spec, NullAdapterSpec) and entry.spec.enabled:
            results.append(null_result(entry, matrix, calibration_s))
        else:
            results.append(run_entry(entry, ctx, matrix))
    return suite_result(spec, spec_path, adapter, started, t0, results, backend)


def suite_result(
    spec: SuiteSpec,
    spec_path: str,
    adapter: str,
    started: datetime,
    t0: float,
    results: list[ProbeResult],
    backend: Instrumented | None,
) -> SuiteResult:
    """The suite result of probe results just computed: Benjamini-Hochberg, score, provenance
    and the backend's counters."""
    results = finish(spec, results)
    return SuiteResult(
        spec_path=spec_path,
        spec_hash=spec.spec_hash(),
        base_model=spec.models.ft.base,
        adapter=adapter or (spec.models.ft.adapter or ""),
        started_at=started.isoformat(),
        finished_at=datetime.now(UTC).isoformat(),
        wall_s=time.perf_counter() - t0,
        sway_version=__version__,
        probes=tuple(results),
        score=score_suite(spec, results),
        backend_stats=backend.counters() if backend is not None else {},
        backend_kind=backend.kind if backend is not None else spec.models.ft.kind,
    )


def score_stored(
    suite: Suite,
    results: Sequence[ProbeResult],
    *,
    adapter: str,
    base_model: str,
    backend_kind: str,
    backend_stats: dict[str, float] | None = None,
    started_at: str = "",
) -> SuiteResult:
    """The suite result of probe results computed earlier (read back from the store, e.g. by
    Dagster's score asset): declaration order, Benjamini-Hochberg, score, as `run_suite`."""
    ordered = sorted(results, key=lambda r: suite.order(r.name))
    final = finish(suite.spec, ordered)
    return SuiteResult(
        spec_path=suite.source,
        spec_hash=suite.spec_hash,
        base_model=base_model,
        adapter=adapter,
        started_at=started_at,
        finished_at=datetime.now(UTC).isoformat(),
        wall_s=sum(r.duration_s for r in final),
        sway_version=__version__,
        probes=tuple(final),
        score=score_suite(suite.spec, final),
        backend_stats=dict(backend_stats or {}),
        backend_kind=backend_kind,
    )


def evaluate(
    spec: SuiteSpec,
    entries: list[Entry],
    *,
    spec_path: str = "<memory>",
    adapter: str | None = None,
    trace_path: Path | None = None,
    progress: Progress | None = None,
    cache_dir: Path | None = None,
) -> SuiteResult:
    """Build the backend, run the suite, close the backend (the CLI path). Results come from
    and go to the persistent scoring cache (`cache_dir`, see `ScoreCache.open_default`).

    A load failure (bad adapter, NaN weights, base mismatch) gives ERROR rows, not an exception.
    """
    document_of(spec)  # a missing or malformed .dlm is a bad input: fail before loading a model
    model = spec.models.ft
    if adapter is not None:
        model = model.model_copy(update={"adapter": adapter})
    started = datetime.now(UTC)
    t0 = time.perf_counter()
    if not needs_model(entries):
        results = run_without_model(spec, entries, model.adapter, progress)
        return suite_result(spec, spec_path, model.adapter or "", started, t0, results, None)
    try:
        if spec.defaults.differential:
            check_one_model(model)
            inner = deferred.for_model(model, lambda: build_backend(model))
        else:
            inner = build_backend(model, base=spec.models.base)
    except SwayError as exc:
        results = error_results(entries, f"preflight failed: {exc}")
        return suite_result(spec, spec_path, model.adapter or "", started, t0, results, None)
    backend = session(inner, trace_path=trace_path, cache_dir=cache_dir)
    try:
        return run_suite(
            spec,
            entries,
            backend,
            spec_path=spec_path,
            adapter=model.adapter or "",
            progress=progress,
        )
    finally:
        backend.close()


def needs_model(entries: list[Entry]) -> bool:
    """True when an enabled entry needs the backend: a probe operation or null calibration."""
    return any(
        e.spec.enabled and (bool(e.probe.needs) or isinstance(e.spec, NullAdapterSpec))
        for e in entries
    )


def run_without_model(
    spec: SuiteSpec, entries: list[Entry], adapter: str | None, progress: Progress | None = None
) -> list[ProbeResult]:
    """Run a suite of pre-run probes (training files only): no model is loaded."""

    def no_model(_requests: object) -> list[Result]:
        raise SwayError("this probe asked for a model, but the suite runs without one")

    ctx = Context(
        execute=no_model,
        capabilities=frozenset(),
        seed=spec.defaults.seed,
        document=document_of(spec),
        adapter_path=adapter,
    )
    results = []
    for i, entry in enumerate(entries, 1):
        if progress is not None:
            progress(Step(i, len(entries), f"{entry.spec.name} ({entry.spec.kind})"))
        results.append(run_entry(entry, ctx, None))
    return results


def _timed(result: ProbeResult, seconds: float) -> ProbeResult:
    return replace(result, duration_s=seconds)


def _with_evidence(result: ProbeResult, **extra: object) -> ProbeResult:
    return replace(result, evidence={**result.evidence, **extra})


# ---- many adapters of one base in one run ----
