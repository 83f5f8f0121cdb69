"""`sway` commands that compute without recording: diff (two adapters over one base load),
mine (the suite's most telling prompts), trace (a JSONL trace summarised), validate (suites
checked without a model) and list-probes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sway_engine.cli_store import cell
from sway_engine.errors import SwayError
from sway_engine.result import json_safe


def fail_on_regression(parser: argparse.ArgumentParser) -> None:
    """The CI switch `compare` and `diff` share."""
    parser.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 1 when B is worse than A beyond both nulls on any probe, or lost a PASS",
    )


def add_parsers(sub: Any) -> None:
    diff = sub.add_parser(
        "diff", help="one suite on two adapters over one base load, probe by probe"
    )
    diff.add_argument("spec", help="sway.yaml")
    diff.add_argument("a", help="reference adapter directory")
    diff.add_argument("b", help="candidate adapter directory")
    diff.add_argument("--json", action="store_true", help="print JSON")
    fail_on_regression(diff)
    mine = sub.add_parser("mine", help="the suite's prompts where the adapter's effect stands out")
    mine.add_argument("spec", help="sway.yaml")
    mine.add_argument("--adapter", help="mine around this adapter instead of models.ft")
    mine.add_argument("--top", type=int, default=5, help="prompts per group (default 5)")
    mine.add_argument("-o", "--output", help="write the mined suite entries (YAML) here")
    mine.add_argument("--force", action="store_true", help="overwrite --output")
    mine.add_argument("--json", action="store_true", help="print JSON")
    trace = sub.add_parser("trace", help="a JSONL trace summarised per probe and per view")
    trace.add_argument("file", help="trace file (sway run --trace, Dagster's trace.jsonl)")
    trace.add_argument("--views", type=int, default=12, help="views listed (most computed first)")
    trace.add_argument("--json", action="store_true", help="print JSON")
    cache = sub.add_parser("cache", help="the persistent scoring cache: its size, or clear it")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument(
        "--home",
        type=Path,
        help="this sway home's cache (default: $SWAY_HOME's, else ~/.cache/sway)",
    )


def run(args: argparse.Namespace) -> int | None:
    """The command's exit code, or None when the command is not one of these."""
    if args.command == "diff":
        return _diff(args)
    if args.command == "mine":
        return _mine(args)
    if args.command == "trace":
        return _trace(args)
    if args.command == "cache":
        return _cache(args)
    return None


def cache_dir(home: Path | None) -> Path | None:
    """The scoring cache's folder for a command: `home`'s, else $SWAY_HOME's, else None
    (`ScoreCache.open_default` then picks $SWAY_SCORE_CACHE_DIR or ~/.cache/sway)."""
    if home is None and os.environ.get("SWAY_HOME"):
        home = Path(os.environ["SWAY_HOME"])
    return None if home is None else Path(home).expanduser().resolve() / "cache"


def _cache(args: argparse.Namespace) -> int:
    from sway_engine.score_cache import ScoreCache, default_path

    path = default_path(cache_dir(args.home))
    if not path.exists():
        print(f"no score cache at {path} (a run creates it)")
        return 0
    cache = ScoreCache(path)
    if args.action == "clear":
        try:
            n = cache.clear()
        except ValueError as exc:
            raise SwayError(str(exc)) from exc
        print(f"removed {n} stored results from {path}")
        return 0
    info = cache.info()
    if not info["usable"]:
        print(f"{cache.path}: not usable (see the warning above); `sway cache clear` removes it")
        return 1
    print(
        f"{info['path']}: {info['entries']} stored results, {info['size_mb']} MiB of "
        f"{info['capacity_mb']} MiB (SWAY_SCORE_CACHE_MB)"
    )
    return 0


def _diff(args: argparse.Namespace) -> int:
    from sway_engine.diff import compare_probes
    from sway_engine.multi import evaluate_each
    from sway_engine.progress import display
    from sway_engine.suite import load_spec

    spec, entries = load_spec(args.spec)
    with display() as progress:
        result_a, result_b = evaluate_each(
            spec,
            entries,
            [args.a, args.b],
            spec_path=str(args.spec),
            progress=progress,
            cache_dir=cache_dir(None),
        )
    rows = compare_probes(result_a.probes, result_b.probes)
    failed = int(args.fail_on_regression and any(r["regression"] for r in rows))
    if args.json:
        print(
            json.dumps(
                json_safe(
                    {
                        "a": {"adapter": args.a, "overall": result_a.score.overall},
                        "b": {"adapter": args.b, "overall": result_b.score.overall},
                        "base_loads": result_b.backend_stats.get("base_loads"),
                        "probes": rows,
                    }
                ),
                indent=2,
            )
        )
        return failed
    columns = ["probe", "verdict_a", "verdict_b", "raw_a", "raw_b", "delta"]
    _table(rows, [*columns, "beyond_nulls", "regression"])
    print(f"overall: {result_a.score.overall:.3f} (A) -> {result_b.score.overall:.3f} (B)")
    return failed


def _mine(args: argparse.Namespace) -> int:

    from sway_engine.mine import check_output, mine, mined_yaml, pick, plan_of
    from sway_engine.suite import load_spec

    if args.top < 1:
        raise SwayError(f"--top {args.top}: give at least 1 prompt per group")
    output = Path(args.output) if args.output else None
    if output is not None:
        check_output(output, force=args.force)
    spec, entries = load_spec(args.spec)
    rows = mine(spec, entries, adapter=args.adapter)
    groups = pick(rows, args.top)
    text = mined_yaml(groups, len(plan_of(spec, entries).seeds))
    if output is not None:
        output.write_text(text, encoding="utf-8")
    if args.json:
        print(json.dumps(json_safe({"prompts": rows, **groups}), indent=2))
        return 0
    for group, picked in groups.items():
        print(f"{group}:")
        for r in picked:
            line = f"  z {r['z']:+7.2f}  effect {r['effect']:.4f}  null cv {r['instability']:.2f}"
            print(f"{line}  {r['prompt'][:60]!r}")
    if args.output:
        print(f"wrote {len(groups)} delta_kl entries to {args.output}", file=sys.stderr)
    return 0


def _trace(args: argparse.Namespace) -> int:

    from sway_engine.trace import read_events, summarize

    summary = summarize(read_events(Path(args.file)))
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    print(f"{summary['events']} backend calls")
    columns = ["probe", "wall_s", "requests", "computed", "cache_hits", "rows_forwarded"]
    _table(summary["probes"], [*columns, "forward_passes"])
    print()
    views = summary["views"]
    _table(views[: args.views], ["view", "computed", "hits"])
    if len(views) > args.views:
        print(f"... and {len(views) - args.views} more views (--views N, or --json for all)")
    return 0


def list_probes(args: argparse.Namespace) -> int:
    """Every registered probe kind with what it measures and the inputs it takes."""
    import json

    from sway_engine.probes.base import ProbeSpec
    from sway_engine.probes.registry import PROBES

    common = set(ProbeSpec.model_fields)
    rows: list[dict[str, Any]] = []
    for kind, probe in sorted(PROBES.items()):
        doc = (sys.modules[probe.__module__].__doc__ or "").strip().splitlines()
        summary = doc[0].split(":", 1)[-1].strip() if doc else ""
        rows.append(
            {
                "kind": kind,
                "category": probe.category,
                "measures": summary,
                "direction": "lower is better" if probe.z_sign < 0 else "higher is better",
                "claim": probe.claim,
                "calibrated": probe.calibrated,
                "needs": sorted(probe.needs),
                "inputs": sorted(set(probe.spec_cls.model_fields) - common),
            }
        )
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        inputs = ", ".join(row["inputs"]) or "-"
        print(f"{row['kind']} ({row['category']}, {row['direction']}): {row['measures']}")
        print(f"    inputs: {inputs}; needs: {', '.join(row['needs']) or '-'}")
    return 0


def validate(paths: Sequence[Path]) -> int:
    """Parse and validate each suite as `run` does before loading a model (the spec, each
    probe entry, its .dlm document); report every file, exit 2 if any is invalid."""
    from sway_engine.suite import document_of, load_spec, spec_warnings

    invalid = 0
    for path in paths:
        try:
            spec, entries = load_spec(path)
            document_of(spec)
        except SwayError as exc:
            print(f"error: {exc}", file=sys.stderr)
            invalid += 1
            continue
        for warning in spec_warnings(entries, spec.defaults):
            print(f"warning: {path}: {warning}", file=sys.stderr)
        print(f"ok: {path} ({len(entries)} probes)")
    return 2 if invalid else 0


def doctor_check(args: argparse.Namespace) -> int:
    """`sway doctor check`: 0 when every check holds, 1 on any disagreement."""
    from sway_engine.doctor import run

    if args.calibration and args.calibration < 10:
        raise SwayError("--calibration needs at least 10 draws")
    checks = run(
        str(args.spec),
        adapter=args.adapter,
        cache_dir=cache_dir(None),
        calibration_draws=args.calibration,
    )
    if args.json:
        print(json.dumps([c.to_dict() for c in checks], indent=2))
    else:
        rows = [
            {
                "check": c.name,
                "result": "ok" if c.passed else "FAILED",
                "measured": c.measured,
                "bound": c.bound,
                "what": c.detail,
            }
            for c in checks
        ]
        _table(rows, ["check", "result", "measured", "bound", "what"])
    return 0 if all(c.passed for c in checks) else 1


def _table(rows: Sequence[dict[str, Any]], columns: list[str]) -> None:
    print("  ".join(columns))
    for row in rows:
        print("  ".join(cell(row.get(c)) for c in columns))
