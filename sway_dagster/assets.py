"""The per-adapter asset graph, built from the suite the code location is configured with:

adapter_files -> adapter_manifest -> null_calibration -> sway/<probe> (one per entry)
-> sway_score (+ gate check) -> leaderboard (all adapters). Each probe's asset (null_calibration
for the null_adapter entry) has a verdict check, recorded by sway_score once the verdict is final.
"""

import json
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
from dagster import AssetExecutionContext

from sway_dagster.adapter_store import AdapterStoreResource
from sway_dagster.evaluation import Session, adapter_tags, num, per_adapter, png_markdown
from sway_dagster.partitions import adapters
from sway_dagster.resources import MlflowResource, ModelResource, ResultStoreResource
from sway_engine import evaluations
from sway_engine.calibration import NullMatrix
from sway_engine.errors import AdapterError, SwayError
from sway_engine.history import mlflow_params, registered_model
from sway_engine.probes.null_adapter import NullAdapterSpec
from sway_engine.probes.registry import Entry
from sway_engine.report import plots
from sway_engine.report.html import Gate, write_page
from sway_engine.report.plots import plot_of
from sway_engine.result import ProbeResult, Verdict
from sway_engine.runner import calibrate_suite, error_results, run_entry
from sway_engine.score import blocker
from sway_engine.store import AdapterRecord
from sway_engine.store.exports import export_run, run_folder
from sway_engine.suite import Suite

OWNERS = ["team:ml-eval"]
# Bump when the math behind an asset changes, so Dagster marks old materializations stale.
CODE_VERSIONS = {"adapter_manifest": "1", "null_calibration": "1", "sway_score": "1"}
adapter_files = dg.AssetSpec(
    "adapter_files",
    partitions_def=adapters,
    group_name="adapters",
    kinds={"file"},
    owners=OWNERS,
    description="An adapter directory (PEFT LoRA), observed by the adapter sensor.",
)


@contextmanager
def pinned_preview_apis() -> Iterator[None]:
    """Silence Dagster's beta/preview notices for the two APIs we rely on, pinned at 1.13.27:
    `backfill_policy` and partitioned asset checks (docs/DESIGN.md). One notice per asset
    would otherwise flood every code-location load; any other beta or preview API still warns."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message="Parameter `backfill_policy`", category=dg.BetaWarning
        )
        warnings.filterwarnings(
            "ignore",
            message="Specifying a partitions_def on an AssetCheck",
            category=dg.PreviewWarning,
        )
        yield


# Model assets take every partition of a backfill in one run (one base load, adapters in turn);
# sway_score runs one partition per run because its gate check is per partition.
MODEL_BACKFILL = dg.BackfillPolicy.single_run()
SCORE_BACKFILL = dg.BackfillPolicy.multi_run(1)


VERDICT = "verdict"


def verdict_check(asset: dg.AssetKey) -> dg.AssetCheckSpec:
    return dg.AssetCheckSpec(
        VERDICT,
        asset=asset,
        blocking=False,
        partitions_def=adapters,
        description="The probe's final verdict for this adapter (after Benjamini-Hochberg).",
    )


def verdict_pending(context: AssetExecutionContext) -> Iterator[dg.Output[None]]:
    """The verdict check's output without a result: sway_score records the result once
    Benjamini-Hochberg has made the verdict final, for every partition (docs/DESIGN.md)."""
    for check in context.selected_asset_check_keys:
        yield dg.Output(
            None, output_name=context.assets_def.get_output_name_for_asset_check_key(check)
        )


def publish(
    context: AssetExecutionContext, per_key: dict[str, dict[str, Any]]
) -> dg.MaterializeResult:
    """Each partition's own metadata on its materialization (a ranged run has one per key)."""
    for key, metadata in per_key.items():
        context.add_asset_metadata(metadata, partition_key=key)
    if len(per_key) == 1:
        return dg.MaterializeResult()
    return dg.MaterializeResult(metadata={"adapters_in_run": len(per_key)})


def _manifest_asset() -> dg.AssetsDefinition:
    @dg.asset(
        name="adapter_manifest",
        deps=[adapter_files],
        partitions_def=adapters,
        group_name="adapters",
        kinds={"duckdb"},
        owners=OWNERS,
        code_version=CODE_VERSIONS["adapter_manifest"],
        backfill_policy=MODEL_BACKFILL,
    )
    def adapter_manifest(
        context: AssetExecutionContext,
        adapter_store: AdapterStoreResource,
        results: ResultStoreResource,
    ) -> dg.MaterializeResult:
        """Config, rank, alpha, targets, weights hash and a finiteness preflight."""
        store = results.store()
        return publish(
            context,
            {k: _manifest(context, k, adapter_store, store) for k in context.partition_keys},
        )

    return adapter_manifest


def _manifest(
    context: AssetExecutionContext, key: str, adapter_store: AdapterStoreResource, store: Any
) -> dict[str, Any]:
    try:
        info = adapter_store.verify(key)
        record = AdapterRecord.checked(key, info)
    except AdapterError as exc:
        context.log.error(f"adapter {key} failed preflight: {exc}")
        record = AdapterRecord(
            adapter_id=key, name=key, path="", preflight_ok=False, preflight_message=str(exc)
        )
    store.record_adapter(record)
    return {
        "preflight_ok": bool(record.preflight_ok),
        "preflight": record.preflight_message or "",
        "rank": record.rank or 0,
        "alpha": float(record.alpha or 0),
        "target_modules": ", ".join(record.target_modules),
        "sha256": record.sha256 or "",
        "base_model": record.base_model or "",
    }


def build_assets(suite: Suite) -> list[Any]:
    """Every asset of the graph for this suite (probe assets come from its entries)."""
    null_entry = next((e for e in suite.entries if isinstance(e.spec, NullAdapterSpec)), None)
    probe_entries = [e for e in suite.entries if not isinstance(e.spec, NullAdapterSpec)]
    with pinned_preview_apis():
        manifest = _manifest_asset()
        calibration = _calibration_asset(suite, null_entry)
        probes = [_probe_asset(suite, e) for e in probe_entries]
        checked = {e.spec.name: p.key for e, p in zip(probe_entries, probes, strict=True)}
        if null_entry is not None:
            checked[null_entry.spec.name] = calibration.key
        score_asset = _score_asset(suite, checked)
    return [adapter_files, manifest, calibration, *probes, score_asset, leaderboard]


def _calibration_asset(suite: Suite, null_entry: Entry | None) -> dg.AssetsDefinition:
    @dg.asset(
        name="null_calibration",
        deps=["adapter_manifest"],
        partitions_def=adapters,
        group_name="calibration",
        kinds={"pytorch", "duckdb"},
        owners=OWNERS,
        code_version=CODE_VERSIONS["null_calibration"],
        pool="model",
        backfill_policy=MODEL_BACKFILL,
        check_specs=[verdict_check(dg.AssetKey("null_calibration"))] if null_entry else None,
    )
    def null_calibration(
        context: AssetExecutionContext,
        backend: ModelResource,
        adapter_store: AdapterStoreResource,
        results: ResultStoreResource,
    ) -> Iterator[dg.MaterializeResult | dg.Output[None]]:
        """Each calibrated probe's raw metric under each null adapter (probe x seed x rank)."""
        store = results.store()
        run_id = context.run.run_id

        def compute(session: Session) -> NullMatrix | None:
            if session.error is not None or null_entry is None:
                return None
            assert session.backend is not None
            session.backend.label = null_entry.spec.name

            def step(e: Entry) -> None:
                context.log.info(f"{session.key}: {e.spec.name} under the null adapters")

            ctx = session.context(suite)
            return calibrate_suite(suite.spec, list(suite.entries), ctx, step)

        per_key: dict[str, dict[str, Any]] = {}
        for session, matrix in per_adapter(context.partition_keys, backend, adapter_store, compute):
            run = evaluations.begin(store, run_id, session.key, suite, backend.served_kind())
            per_key[session.key] = _store_calibration(
                context, store, suite, null_entry, session, matrix, run
            )
        yield publish(context, per_key)
        yield from verdict_pending(context)

    return null_calibration


def _store_calibration(
    context: AssetExecutionContext,
    store: Any,
    suite: Suite,
    null_entry: Entry | None,
    session: Session,
    matrix: NullMatrix | None,
    run: str,
) -> dict[str, Any]:
    if null_entry is None:
        return {"calibrated_probes": 0, "note": "no null_adapter entry"}
    key, dagster_run = session.key, context.run.run_id
    row, written = evaluations.record_calibration(
        store, run, key, suite, null_entry, matrix, session.error, dagster_run
    )
    if session.error is not None:
        context.log.error(session.error)
        return {"calibrated_probes": 0, "error": session.error}
    if matrix is None:
        return {"calibrated_probes": 0, "note": row.message}
    table = [
        dg.TableRecord({"probe": p, "mean": num(s.mean), "std": num(s.std), "n": s.n})
        for p in matrix.probes()
        if (s := matrix.stats(p)) is not None
    ]
    return {
        "calibrated_probes": len(matrix.probes()),
        "seeds": len(matrix.plan.seeds),
        "mode": matrix.plan.mode,
        "rows_written": written,
        "null_stats": dg.MetadataValue.table(
            table,
            schema=dg.TableSchema(
                columns=[
                    dg.TableColumn("probe", "string"),
                    dg.TableColumn("mean", "float"),
                    dg.TableColumn("std", "float"),
                    dg.TableColumn("n", "int"),
                ]
            ),
        ),
        "skipped": json.dumps([list(s) for s in matrix.skipped]),
    }


def asset_name(probe_name: str) -> str:
    """Probe names become asset names: letters, digits and underscores only."""
    return re.sub(r"[^A-Za-z0-9_]", "_", probe_name)


def _probe_asset(suite: Suite, entry: Entry) -> dg.AssetsDefinition:
    kind = entry.spec.kind
    key = dg.AssetKey(["sway", asset_name(entry.spec.name)])

    @dg.asset(
        key=key,
        deps=["null_calibration"],
        partitions_def=adapters,
        group_name="probes",
        kinds={"pytorch", "duckdb", "mlflow"},
        owners=OWNERS,
        tags={"sway/probe_kind": kind, "sway/category": entry.category},
        code_version=entry.probe.version,
        pool="model",
        description=f"{kind} probe `{entry.spec.name}` (docs/PROBES.md).",
        backfill_policy=MODEL_BACKFILL,
        check_specs=[verdict_check(key)],
    )
    def probe(
        context: AssetExecutionContext,
        backend: ModelResource,
        adapter_store: AdapterStoreResource,
        results: ResultStoreResource,
        mlflow: MlflowResource,
    ) -> Iterator[dg.MaterializeResult | dg.Output[None]]:
        store = results.store()

        def compute(session: Session) -> ProbeResult:
            if session.error is not None:
                (failed,) = error_results([entry], session.error)
                return failed
            assert session.backend is not None
            session.backend.label = entry.spec.name
            matrix = results.null_matrix(session.key, suite, context.run.run_id)
            context.log.info(f"{session.key}: {entry.spec.name} ({entry.spec.kind})")
            return run_entry(entry, session.context(suite), matrix)

        kind = backend.served_kind()
        with plots.kept_in(backend.plot_store()):
            per_key = {
                session.key: _store_probe(context, store, mlflow, session, result, suite, kind)
                for session, result in per_adapter(
                    context.partition_keys, backend, adapter_store, compute
                )
            }
        yield publish(context, per_key)
        yield from verdict_pending(context)

    return probe


def _store_probe(
    context: AssetExecutionContext,
    store: Any,
    mlflow: MlflowResource,
    session: Session,
    result: ProbeResult,
    suite: Suite,
    kind: str,
) -> dict[str, Any]:
    key, run_id = session.key, context.run.run_id
    if session.error is not None:
        context.log.error(f"{key}: {session.error}")
    written = evaluations.record_probe(store, run_id, key, suite, result, kind)
    url = mlflow.mirror(store, context.log.warning).preview(
        key, run_id, adapter_tags(key, session.info), result
    )
    metadata: dict[str, Any] = {
        "verdict": result.verdict.value,
        "raw": num(result.raw),
        "z": num(result.z),
        "p": num(result.p),
        "score": num(result.score),
        "message": result.message,
        "rows_written": written,
    }
    if result.items:
        metadata["items"] = _items_table(result)
    png = plot_of(result)
    if png is not None:
        metadata["plot"] = png_markdown(png, result.name)
    if url:
        metadata["mlflow_run"] = dg.MetadataValue.url(url)
    return metadata


def _items_table(result: ProbeResult) -> dg.MetadataValue:
    rows = [dict(item) for item in result.items[:50]]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    records = [
        dg.TableRecord(
            {c: (v if isinstance(v, int | float | str | bool) else str(v)) for c, v in row.items()}
        )
        for row in rows
    ]
    return dg.MetadataValue.table(
        records, schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in columns])
    )


def _score_asset(suite: Suite, checked: dict[str, dg.AssetKey]) -> dg.AssetsDefinition:
    """`checked`: the asset of each probe whose verdict check sway_score records."""
    score_key = dg.AssetKey("sway_score")

    @dg.asset(
        key=score_key,
        deps=["null_calibration", *checked.values()],
        partitions_def=adapters,
        group_name="verdict",
        kinds={"duckdb", "mlflow"},
        owners=OWNERS,
        code_version=CODE_VERSIONS["sway_score"],
        backfill_policy=SCORE_BACKFILL,
        check_specs=[
            dg.AssetCheckSpec(
                "gate",
                asset=score_key,
                blocking=False,
                partitions_def=adapters,
                description="The adapter passes: no FAIL, no ERROR, overall >= threshold.",
            )
        ],
    )
    def sway_score(
        context: AssetExecutionContext,
        backend: ModelResource,
        results: ResultStoreResource,
        mlflow: MlflowResource,
    ) -> Iterator[dg.MaterializeResult | dg.AssetCheckEvaluation]:
        """Composite score and band from the stored probe rows; the gate decision as a check,
        and each probe's final verdict as its asset's check."""
        if len(context.partition_keys) != 1:
            raise dg.Failure(
                f"sway_score scores one adapter per run (its gate check is per partition), "
                f"but this run covers {len(context.partition_keys)}: launch it as a backfill, "
                "which runs the model assets together and sway_score once per adapter"
            )
        key = context.partition_key
        store = results.store()
        try:
            run, passed_over = evaluations.to_complete(store, key, suite)
        except SwayError as exc:
            raise dg.Failure(str(exc)) from exc
        if passed_over is not None:
            context.log.warning(passed_over)
        done = evaluations.complete(
            store,
            suite,
            run,
            key,
            base_model=backend.model_id(),
            backend_kind=backend.served_kind(),
            backend_stats=backend.counters(),
            dagster_run_id=context.run.run_id,
        )
        suite_result, passed, why = done.result, done.passed, done.why
        # DuckDB holds the evaluation now; MLflow gets its copy (and older pending copies),
        # and a failure there leaves the copy pending instead of failing this step.
        mirror = mlflow.mirror(store, context.log.warning)
        trace = Path(backend.trace_dir) / "trace.jsonl" if backend.trace_dir else None
        with plots.kept_in(backend.plot_store()):
            published = mirror.publish(
                run["run_id"], _params(suite, store, key), trace, registered_model(suite)
            )
            if published.synced:
                mirror.catch_up()
        exported = _export(store, run["run_id"], results.export_root)
        probe_results = suite_result.probes
        composite = suite_result.score
        verdicts = {v.value: sum(r.verdict == v for r in probe_results) for v in Verdict}
        warned = verdicts["warn"] > 0
        check = dg.AssetCheckResult(
            check_name="gate",
            asset_key=score_key,
            passed=passed and not warned,
            severity=dg.AssetCheckSeverity.WARN if passed else dg.AssetCheckSeverity.ERROR,
            metadata={"reason": why, "overall": composite.overall, **verdicts},
        )
        metadata: dict[str, Any] = {
            "overall": composite.overall,
            "band": composite.band,
            "gate_passed": passed,
            "gate": why,
            **{f"component.{c}": v for c, v in composite.components.items()},
            **{f"n_{k}": v for k, v in verdicts.items()},
            "findings": "\n".join(composite.findings),
            "mlflow": "copied" if published.synced else f"pending: {published.error}",
        }
        if published.url:
            metadata["mlflow_run"] = dg.MetadataValue.url(published.url)
        if exported is not None:
            metadata["exported"] = dg.MetadataValue.path(str(exported))
        if results.reports:
            with plots.kept_in(backend.plot_store()):
                page = write_page(
                    Path(results.reports),
                    key,
                    run["run_id"],
                    store.suite_of(run["run_id"]),
                    Gate(passed, why),
                )
            metadata["report"] = dg.MetadataValue.path(str(page))
        yield dg.MaterializeResult(metadata=metadata, check_results=[check])
        allow = suite.spec.defaults.allow_uncalibrated
        for r in probe_results:
            if r.name in checked:
                yield verdict_evaluation(r, checked[r.name], key, allow_uncalibrated=allow)

    return sway_score


def verdict_evaluation(
    r: ProbeResult, asset: dg.AssetKey, key: str, *, allow_uncalibrated: bool
) -> dg.AssetCheckEvaluation:
    """A final verdict as its asset's check in this partition. PASS and SKIP pass; a verdict
    that fails the gate on its own (FAIL, ERROR, uncalibrated WARN) is an ERROR, any other WARN
    a WARN."""
    metadata: dict[str, Any] = {"verdict": r.verdict.value, "raw": num(r.raw), "z": num(r.z)}
    if r.p is not None:
        metadata["p"] = float(r.p)
    if "q" in r.evidence:
        metadata["q"] = float(r.evidence["q"])
    metadata["message"] = r.message
    fails_gate = blocker(r, allow_uncalibrated=allow_uncalibrated) is not None
    return dg.AssetCheckEvaluation(
        asset_key=asset,
        check_name=VERDICT,
        passed=r.verdict in (Verdict.PASS, Verdict.SKIP),
        severity=dg.AssetCheckSeverity.ERROR if fails_gate else dg.AssetCheckSeverity.WARN,
        metadata=metadata,
        blocking=False,
        partition=key,
    )


def _export(store: Any, run_id: str, root: str) -> Path | None:
    """Export the completed run to the shared folder, if one is configured. A failure fails the
    step: the run is complete in this worker's store, and `sway results export` retries it."""
    if not root:
        return None
    try:
        return export_run(store, run_id, root) or run_folder(Path(root), run_id)
    except SwayError as exc:
        raise dg.Failure(
            f"run {run_id} is stored here but not exported: {exc}. Fix the folder, then "
            f"`sway results export {root}` on this worker"
        ) from exc


def _params(suite: Suite, store: Any, key: str) -> dict[str, str | int | float]:
    adapter: dict[str, Any] = next((a for a in store.adapters() if a["adapter_id"] == key), {})
    return mlflow_params(suite, adapter)


@dg.asset(
    deps=["sway_score"],
    group_name="leaderboard",
    kinds={"duckdb"},
    owners=OWNERS,
    automation_condition=dg.AutomationCondition.eager(),
)
def leaderboard(results: ResultStoreResource) -> dg.MaterializeResult:
    """Every evaluated adapter, ranked by overall score (latest score per adapter)."""
    rows = results.store().leaderboard()
    columns = [
        "rank",
        "adapter_id",
        "overall",
        "band",
        "gate_passed",
        "n_pass",
        "n_fail",
        "n_error",
    ]
    records = [
        dg.TableRecord({c: (r[c] if r[c] is not None else "") for c in columns}) for r in rows
    ]
    return dg.MaterializeResult(
        metadata={
            "adapters": len(rows),
            "leaderboard": dg.MetadataValue.table(
                records, schema=dg.TableSchema(columns=[dg.TableColumn(c) for c in columns])
            ),
            "best": rows[0]["adapter_id"] if rows else "",
        }
    )
