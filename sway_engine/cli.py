"""The `sway` command: run, gate, validate, check, autogen, doctor, convert-adapter, fixtures build,
list-probes, diff, mine, trace, and over the recorded history (a sway home): leaderboard,
history, compare, report, sync-mlflow.

Exit codes: 0 ok, 1 gate failed (or, for `run` and `check`, a probe errored or the verdict is
not PASS), 2 bad input (spec, adapter, paths, missing extra), 3 internal error (a bug: the
traceback is printed with --debug).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sway_engine import cli_store, cli_tools
from sway_engine.errors import SwayError
from sway_engine.home import Settings

if TYPE_CHECKING:
    from sway_engine.suite import Suite


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sway", description=__doc__)
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of internal errors")
    sub = parser.add_subparsers(dest="command")

    def outputs(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", type=Path, help="sway.yaml")
        p.add_argument("--json", "-j", type=Path, help="write the JSON result here")
        p.add_argument("--markdown", "-m", type=Path, help="write a Markdown report here")
        p.add_argument("--html", type=Path, help="write a self-contained HTML report here")
        p.add_argument("--junit", type=Path, help="write JUnit XML here")
        p.add_argument("--weights", help="category weights, e.g. adherence=0.5,ablation=0")
        p.add_argument("--adapter", help="evaluate this adapter directory instead of models.ft")
        p.add_argument("--trace", type=Path, help="append a JSONL trace of backend calls")
        p.add_argument(
            "--home",
            type=Path,
            help="record into this sway home's DuckDB and MLflow (default: $SWAY_HOME if set)",
        )

    outputs(sub.add_parser("run", help="evaluate an adapter with a suite"))
    gate = sub.add_parser("gate", help="run, then exit 1 unless the gate passes")
    outputs(gate)
    gate.add_argument("--threshold", type=float, help="minimum overall (default: spec)")
    validate = sub.add_parser("validate", help="check suites without loading a model (pre-commit)")
    validate.add_argument("specs", type=Path, nargs="+", help="sway.yaml files")
    check = sub.add_parser("check", help="one-line verdict for an adapter from a default suite")
    check.add_argument("adapter", type=Path)
    check.add_argument("--base", help="base model (default: from adapter_config.json)")
    check.add_argument("--prompts", type=Path, help="file with one prompt per line")
    autogen = sub.add_parser("autogen", help="write a calibrated sway.yaml from a .dlm document")
    autogen.add_argument("document", type=Path, help="the .dlm document")
    autogen.add_argument("-o", "--output", type=Path, default=Path("sway.yaml"))
    autogen.add_argument("--base", help="base model (default: the front matter's base_model)")
    autogen.add_argument("--adapter", help="adapter directory (default: dlm's store pointer)")
    autogen.add_argument("--kind", default="hf", help="backend kind for both models (hf)")
    autogen.add_argument(
        "--prompt-template",
        default="{question}",
        help="how a question becomes a prompt, e.g. 'Q: {question}\\nA:' (\\n is a newline)",
    )
    autogen.add_argument(
        "--null-runs", type=int, help="null adapters per probe (default: defaults.null.seeds)"
    )
    autogen.add_argument("--force", action="store_true", help="overwrite an existing output")
    doctor = sub.add_parser("doctor", help="the tool checks itself")
    dsub = doctor.add_subparsers(dest="doctor_command", required=True)
    cal = dsub.add_parser(
        "calibration", help="false-PASS rate of each calibrated probe on random adapters"
    )
    cal.add_argument("spec", type=Path, help="sway.yaml")
    cal.add_argument("--draws", type=int, default=200, help="null-family adapters to judge")
    cal.add_argument("--adapter", help="audit around this adapter instead of models.ft")
    cal.add_argument("--mode", choices=("matched", "spectrum", "fixed"), help="null mode")
    cal.add_argument("--probe", action="append", default=[], help="only these kinds")
    cal.add_argument("--json", "-j", type=Path, help="write the audit as JSON here")
    self_check = dsub.add_parser(
        "check", help="batch invariance, determinism, cache integrity, hf vs mlx"
    )
    self_check.add_argument("spec", type=Path, help="sway.yaml (its model and prompts)")
    self_check.add_argument("--adapter", help="this adapter instead of models.ft")
    self_check.add_argument("--json", action="store_true", help="print JSON")
    self_check.add_argument(
        "--calibration",
        type=int,
        nargs="?",
        const=50,
        default=0,
        metavar="DRAWS",
        help="also audit false-claim rates on DRAWS random adapters (default 50)",
    )
    convert = sub.add_parser("convert-adapter", help="convert a PEFT LoRA adapter for mlx-lm")
    convert.add_argument("src", type=Path, help="PEFT adapter directory")
    convert.add_argument("dst", type=Path, help="output directory (mlx-lm adapter_path)")
    convert.add_argument("--overwrite", action="store_true", help="replace an mlx-lm adapter there")
    board = sub.add_parser("leaderboard", help="the latest evaluation of each adapter")
    board.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    board.add_argument("--spec-hash", help="rank under this suite (default: the newest's)")
    board.add_argument("--json", action="store_true", help="print JSON")
    history = sub.add_parser("history", help="every evaluation of one adapter, oldest first")
    history.add_argument("adapter", help="an adapter key (name-sha8) or directory name")
    history.add_argument(
        "--lineage",
        action="store_true",
        help="ADAPTER is a name prefix: every adapter whose directory name starts with it",
    )
    history.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    history.add_argument("--json", action="store_true", help="print JSON")
    cmp = sub.add_parser("compare", help="two adapters' latest evaluations, probe by probe")
    cmp.add_argument("a", help="adapter key, directory name or run id (the reference)")
    cmp.add_argument("b", help="adapter key, directory name or run id (the candidate)")
    cmp.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    cmp.add_argument("--json", action="store_true", help="print JSON")
    cli_tools.fail_on_regression(cmp)
    report = sub.add_parser("report", help="the latest recorded evaluation of an adapter")
    report.add_argument(
        "adapter", help="adapter key, directory name or run id, or a result .json file"
    )
    report.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    report.add_argument("--markdown", "-m", type=Path, help="write Markdown here")
    report.add_argument("--html", type=Path, help="write a self-contained HTML page here")
    probes = sub.add_parser("list-probes", help="every probe kind: what it measures, its inputs")
    probes.add_argument("--json", action="store_true", help="print JSON")
    sync = sub.add_parser(
        "sync-mlflow", help="copy evaluations whose MLflow copy is pending (MLflow was down)"
    )
    sync.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    sync.add_argument("--tracking-uri", help="MLflow (default: $MLFLOW_TRACKING_URI or the home's)")
    results = sub.add_parser(
        "results", help="move evaluations between machines as Parquet (docs/DEPLOY.md)"
    )
    rsub = results.add_subparsers(dest="results_command", required=True)
    export = rsub.add_parser("export", help="write completed runs not yet exported under ROOT")
    export.add_argument("root", type=Path, help="shared folder of exported runs")
    export.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    imp = rsub.add_parser("import", help="copy the runs under ROOT this home's store lacks")
    imp.add_argument("root", type=Path, help="shared folder of exported runs")
    imp.add_argument("--home", type=Path, help="sway home (default: $SWAY_HOME or .sway_home)")
    cli_tools.add_parsers(sub)
    fixtures = sub.add_parser("fixtures", help="the tiny local model and adapters")
    fsub = fixtures.add_subparsers(dest="fixtures_command", required=True)
    build = fsub.add_parser("build", help="build (or reuse) the fixtures")
    build.add_argument("dest", type=Path, nargs="?", help="cache folder")
    build.add_argument("--force", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `sway ... | head`: the reader left; nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes exit code 3
        if args.debug:
            raise
        print(
            f"internal error: {type(exc).__name__}: {exc} (a bug in sway: run again with "
            "--debug for the traceback, and report it)",
            file=sys.stderr,
        )
        return 3


def _main(args: argparse.Namespace) -> int:
    if args.version:
        from sway_engine import __version__

        print(f"sway {__version__}")
        return 0
    try:
        if args.command in ("run", "gate"):
            return _run(args, gate=args.command == "gate")
        if args.command == "validate":
            return cli_tools.validate(args.specs)
        if args.command == "check":
            return _check(args)
        if args.command == "fixtures":
            return _fixtures(args)
        if args.command == "convert-adapter":
            return _convert_adapter(args)
        if args.command == "autogen":
            return _autogen(args)
        if args.command == "doctor" and args.doctor_command == "check":
            return cli_tools.doctor_check(args)
        if args.command == "doctor":
            return _doctor_calibration(args)
        if args.command == "sync-mlflow":
            return cli_store.sync_mlflow(args, _home(args.home))
        if args.command in ("leaderboard", "history", "compare"):
            return cli_store.read_history(args, _home(args.home))
        if args.command == "report":
            return cli_store.report(args, _home(args.home))
        if args.command == "results":
            return cli_store.move_results(args, _home(args.home))
        if args.command == "list-probes":
            return cli_tools.list_probes(args)
        if (code := cli_tools.run(args)) is not None:
            return code
    except SwayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(
            f"error: a file is not UTF-8 text ({exc.reason}): re-save it as UTF-8", file=sys.stderr
        )
        return 2
    _parser().print_help()
    return 2


def _writable(paths: Sequence[Path | None]) -> None:
    """Refuse an output path whose folder does not exist before any model loads (the whole
    evaluation was lost at the end, and gate printed no verdict)."""
    for path in paths:
        if path is not None and not Path(path).parent.is_dir():
            raise SwayError(f"{path}: its folder {Path(path).parent} does not exist; create it")


def _run(args: argparse.Namespace, *, gate: bool) -> int:
    from sway_engine.spec import parse_weights
    from sway_engine.suite import Suite, load_spec

    spec, entries = load_spec(args.spec)
    if args.weights:
        try:
            weights = parse_weights(args.weights)
        except ValueError as exc:
            raise SwayError(f"--weights: {exc}") from exc
        spec = spec.model_copy(
            update={"defaults": spec.defaults.model_copy(update={"score_weights": weights})}
        )
    threshold = getattr(args, "threshold", None)
    _writable([args.json, args.markdown, args.html, args.junit, args.trace])
    home = _home(args.home) if args.home is not None or "SWAY_HOME" in os.environ else None
    if home is not None:
        _writable([home.database])
    suite = Suite(spec, tuple(entries), Path(args.spec)) if home is not None else None
    return _evaluate_and_report(
        spec, entries, args, str(args.spec), gate, threshold, record=(home, suite)
    )


def _home(path: Path | None) -> Settings:
    """The sway home: `path`, else $SWAY_HOME, else .sway_home (sway_engine.home)."""
    env = dict(os.environ)
    if path is not None:
        env["SWAY_HOME"] = str(path)
    return Settings.from_env(env)


def _evaluate_and_report(
    spec: Any,
    entries: list[Any],
    args: Any,
    spec_path: str,
    gate: bool,
    threshold: float | None,
    record: tuple[Settings | None, Suite | None] = (None, None),
) -> int:
    from sway_engine.progress import display
    from sway_engine.report.text import print_terminal, to_json, to_junit, to_markdown
    from sway_engine.runner import evaluate
    from sway_engine.runner import gate as runner_gate
    from sway_engine.suite import spec_warnings

    for warning in spec_warnings(entries, spec.defaults):
        print(f"warning: {warning}", file=sys.stderr)

    with display() as progress:
        result = evaluate(
            spec,
            entries,
            spec_path=spec_path,
            adapter=getattr(args, "adapter", None),
            trace_path=getattr(args, "trace", None),
            progress=progress,
            cache_dir=cli_tools.cache_dir(getattr(args, "home", None)),
        )
    print_terminal(result)
    for path, render in (
        (getattr(args, "json", None), to_json),
        (getattr(args, "markdown", None), to_markdown),
        (getattr(args, "junit", None), to_junit),
    ):
        if path is not None:
            Path(path).write_text(render(result), encoding="utf-8")
    passed, why = runner_gate(spec, result, threshold)
    if (page := getattr(args, "html", None)) is not None:
        from sway_engine.report.html import Gate, to_html

        Path(page).write_text(to_html(result, Gate(passed, why)), encoding="utf-8")
    home, suite = record
    if home is not None and suite is not None:
        _record(home, suite, result, passed)
    if gate:
        print(("gate passed — " if passed else "gate FAILED — ") + why)
        return 0 if passed else 1
    errored = [p.name for p in result.probes if p.verdict.value == "error"]
    if errored:
        print(f"{len(errored)} probe(s) errored: {', '.join(errored)}", file=sys.stderr)
        return 1
    return 0


def _record(home: Settings, suite: Suite, result: Any, passed: bool) -> None:
    """Record the evaluation as Dagster would (sway_engine.history); say where it went."""
    from sway_engine.history import record_cli_run

    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    key, run_id, published = record_cli_run(home, suite, result, passed, warn)
    mlflow = "copied to MLflow" if published.synced else "MLflow copy pending (sway sync-mlflow)"
    print(f"recorded {key} as run {run_id} in {home.database}; {mlflow}", file=sys.stderr)


def _doctor_calibration(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    from sway_engine.audit import audit
    from sway_engine.backends.build import build_backend
    from sway_engine.backends.instrumentation import Instrumented
    from sway_engine.suite import load_spec

    spec, entries = load_spec(args.spec)
    if args.draws < 10:
        raise SwayError("--draws must be at least 10")
    if args.mode:
        null = spec.defaults.null.model_copy(update={"mode": args.mode})
        spec = spec.model_copy(update={"defaults": spec.defaults.model_copy(update={"null": null})})
        entries = [
            e
            if e.spec.kind != "null_adapter"
            else type(e)(e.probe, e.spec.model_copy(update={"mode": None}), e.category)
            for e in entries
        ]
    model = spec.models.ft
    if args.adapter:
        model = model.model_copy(update={"adapter": args.adapter})
    backend = Instrumented(build_backend(model))
    try:
        with Console(stderr=True).status(f"auditing with {args.draws} null-family adapters"):
            rows = audit(spec, entries, backend, draws=args.draws, kinds=tuple(args.probe))
    finally:
        backend.close()
    title = (
        f"calibration audit: {args.draws} random adapters, each judged against a fresh set of "
        "null draws (and against the suite's own nulls)"
    )
    table = Table(title=title)
    columns = (
        "probe",
        "false claim",
        "false",
        "rate [95% CI]",
        "mean |z|",
        "KS",
        "vs suite nulls",
        "power 1/.25/.05",
    )
    for col in columns:
        table.add_column(col)
    for r in rows:
        lo, hi = r.interval
        power = " / ".join(v["verdict"] for v in r.power.values())
        table.add_row(
            f"{r.probe} ({r.kind})",
            "FAIL" if r.claim == "harm" else "PASS",
            f"{r.false}/{r.draws}",
            f"{r.rate:.1%} [{lo:.1%}, {hi:.1%}]",
            f"{r.mean_abs_z:.2f}",
            f"{r.ks:.3f}",
            f"{r.false_vs_suite}/{r.draws}",
            power,
        )
    Console(width=160).print(table)
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in rows], indent=2) + "\n")
    from sway_engine.doctor import calibration_checks

    return 0 if all(c.passed for c in calibration_checks(rows)) else 1


def _check(args: argparse.Namespace) -> int:
    from sway_engine.adapters import read_adapter
    from sway_engine.suite import parse_spec

    info = read_adapter(args.adapter, check_finite=False)
    base = args.base or info.base_model
    if not base:
        raise SwayError(f"{args.adapter}: no base_model_name_or_path in its config; pass --base")
    prompts = DEFAULT_CHECK_PROMPTS
    if args.prompts:
        try:
            text = args.prompts.read_text(encoding="utf-8")
        except OSError as exc:
            raise SwayError(
                f"--prompts {args.prompts}: cannot read: {exc.strerror or exc}"
            ) from exc
        prompts = [ln.strip() for ln in text.splitlines() if ln.strip()]
        if not prompts:
            raise SwayError(f"--prompts {args.prompts}: no prompts (one per line)")
    data = {
        "version": 1,
        "models": {
            "base": {"kind": "hf", "base": base},
            "ft": {"kind": "hf", "base": base, "adapter": str(info.path)},
        },
        "suite": [
            {"name": "null_baseline", "kind": "null_adapter"},
            {"name": "delta_kl", "kind": "delta_kl", "prompts": prompts, "assert_mean_gte": 0.01},
        ],
    }
    spec, entries = parse_spec(data, source="sway check")
    from sway_engine.runner import evaluate

    result = evaluate(spec, entries, spec_path="sway check")
    dkl = result.probe("delta_kl")
    z = f"{dkl.z:+.2f}σ" if dkl.z is not None else "uncalibrated"
    print(f"{info.path.name}: delta_kl {dkl.verdict.value.upper()} (z={z}): {dkl.message}")
    return 0 if dkl.verdict.value == "pass" else 1


DEFAULT_CHECK_PROMPTS = [
    "The capital of",
    "Once upon a time",
    "An interesting fact is",
    "The next step is to",
    "In my opinion,",
    "The most important thing",
    "Here is a short answer:",
    "Q: What is this about?\nA:",
]


def _autogen(args: argparse.Namespace) -> int:
    from sway_engine.autogen import Options, write_suite

    opts = Options(
        document=args.document,
        output=args.output,
        base=args.base,
        adapter=args.adapter,
        kind=args.kind,
        prompt_template=args.prompt_template.replace("\\n", "\n"),
        force=args.force,
        null_runs=args.null_runs,
    )
    path = write_suite(opts)
    print(f"wrote {path}")
    return 0


def _convert_adapter(args: argparse.Namespace) -> int:
    from sway_engine.convert import convert_peft_to_mlx

    done = convert_peft_to_mlx(args.src, args.dst, overwrite=args.overwrite)
    print(
        f"converted {done.source.path} -> {done.path}: rank {done.rank}, scale {done.scale:g}, "
        f"{len(done.modules)} modules, {done.num_tensors} tensors"
    )
    return 0


def _fixtures(args: argparse.Namespace) -> int:
    from sway_engine.fixtures import build_fixtures

    paths = build_fixtures(args.dest, force=args.force)
    print(f"base:     {paths.base}")
    for name, path in paths.adapters.items():
        print(f"adapter:  {name:<10} {path}")
    print(f"document: {paths.document}")
    print(f"suite:    {paths.suite}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
