"""`sway` commands over a sway home's recorded history: leaderboard, history, compare, report
and sync-mlflow. They read the DuckDB store (sync-mlflow also writes MLflow), never a model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sway_engine.errors import SwayError
from sway_engine.home import Settings

if TYPE_CHECKING:
    from sway_engine.result import SuiteResult
    from sway_engine.store import ResultStore


def open_store(home: Settings) -> ResultStore:
    """The home's result store; a clear error where there is none."""
    from sway_engine.store import ResultStore

    if not home.database.is_file():
        raise SwayError(f"{home.database}: no result store there (set --home or SWAY_HOME)")
    return ResultStore(home.database)


def read_history(args: argparse.Namespace, home: Settings) -> int:
    """`sway leaderboard`, `history ADAPTER` and `compare A B`: read the store, never a model."""
    from sway_engine.history import lineage
    from sway_engine.result import json_safe

    store = open_store(home)
    failed = 0
    if args.command == "leaderboard":
        rows = store.leaderboard(args.spec_hash)
        columns = ["rank", "adapter_id", "overall", "band", "gate_passed", "n_fail", "n_error"]
    elif args.command == "compare":
        from sway_engine.history import compare

        rows = compare(store, args.a, args.b)
        columns = ["probe", "verdict_a", "verdict_b", "raw_a", "raw_b", "delta"]
        columns += ["beyond_nulls", "regression"]
        failed = int(args.fail_on_regression and any(r["regression"] for r in rows))
    else:
        from sway_engine.history import spending

        rows = lineage(store, args.adapter, prefix=getattr(args, "lineage", False))
        if not rows:
            raise SwayError(f"no evaluation of {args.adapter!r} in {home.database}")
        columns = ["started_at", "adapter_id", "origin", "status", "overall", "band"]
        columns += ["gate_passed", "spec_hash"]
        if any(r.get("nats_per_token") is not None for r in rows):
            columns.append("nats_per_token")  # forgetting_budget's spending, with its interval
            if not args.json:
                rows = [{**r, "nats_per_token": spending(r)} for r in rows]
    if args.json:
        print(json.dumps(json_safe(rows), indent=2, default=str))
        return failed
    print("  ".join(columns))
    for row in rows:
        print("  ".join(cell(row.get(c)) for c in columns))
    return failed


def report(args: argparse.Namespace, home: Settings) -> int:
    """A recorded evaluation as a terminal report, Markdown or HTML (from the store alone)."""
    from sway_engine.history import latest_run_of
    from sway_engine.report.html import recorded_gate, to_html
    from sway_engine.report.text import print_terminal, to_markdown

    for path in (args.markdown, args.html):
        if path is not None and not path.parent.is_dir():
            raise SwayError(f"{path}: its folder {path.parent} does not exist; create it")
    saved = Path(args.adapter)
    passed: bool | None = None
    if saved.suffix == ".json" and saved.is_file():  # a saved result (ours or dlm-sway's)
        result = read_result(saved)
    else:
        store = open_store(home)
        run_id = latest_run_of(store, args.adapter)["run_id"]
        result, passed = store.suite_of(run_id), store.gate_passed(run_id)
    print_terminal(result)
    if args.markdown is not None:
        args.markdown.write_text(to_markdown(result), encoding="utf-8")
    if args.html is not None:
        args.html.write_text(to_html(result, recorded_gate(result, passed)), encoding="utf-8")
    return 0


def read_result(path: Path) -> SuiteResult:
    """A result JSON written by `sway run --json` or by upstream dlm-sway."""
    from sway_engine.result import SuiteResult

    try:
        return SuiteResult.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, AttributeError) as exc:
        raise SwayError(f"{path}: {exc}") from exc


def sync_mlflow(args: argparse.Namespace, settings: Settings) -> int:
    """Copy every pending evaluation of the home's store to MLflow, grouped by the experiment
    each was meant for; exit 1 while any stays pending."""
    from collections import Counter

    from sway_engine.mirror import Mirror
    from sway_engine.tracking import MlflowTracking

    store = open_store(settings)
    pending = store.mlflow_pending()
    experiments = Counter((r.get("mlflow_params") or {}).get("experiment", "sway") for r in pending)
    left = 0
    for experiment in sorted(experiments):
        tracking = MlflowTracking(
            args.tracking_uri or settings.mlflow_uri,
            experiment,
            artifact_root=settings.mlflow_artifacts,
        )
        mirror = Mirror(tracking, store, lambda m: print(m, file=sys.stderr), settings.dagster_ui)
        done = mirror.catch_up(None)
        copied = sum(p.synced for p in done)
        left += experiments[experiment] - copied
        print(f"{experiment}: {copied} of {experiments[experiment]} evaluation(s) copied")
    if not pending:
        print("nothing pending: every evaluation in the store is in MLflow")
    return 1 if left else 0


def move_results(args: argparse.Namespace, settings: Settings) -> int:
    """`sway results export ROOT`: every completed run of the home not yet under ROOT;
    `sway results import ROOT`: every run under ROOT the home's store lacks. Exit 1 when an
    exported folder was refused (it is named, with the reason)."""
    from sway_engine.store import COMPLETE, ResultStore
    from sway_engine.store.exports import export_run, import_runs

    if args.results_command == "export":
        store = open_store(settings)
        done = [
            r["run_id"]
            for r in store.runs()
            if r["status"] == COMPLETE and export_run(store, r["run_id"], args.root) is not None
        ]
        print(f"exported {len(done)} run(s) to {args.root}")
        return 0
    report = import_runs(ResultStore(settings.database), args.root)
    print(
        f"imported {len(report.imported)} run(s) into {settings.database}; "
        f"{len(report.held)} already there"
    )
    for folder, why in report.refused.items():
        print(f"refused {folder}: {why}", file=sys.stderr)
    return 1 if report.refused else 0


def cell(value: Any) -> str:
    if isinstance(value, float):  # 3 decimals, or 3 significant digits below 0.01
        return f"{value:.3f}" if value == 0 or abs(value) >= 0.01 else f"{value:.2e}"
    return "-" if value is None else str(value)
